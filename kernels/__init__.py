"""Kernels for RAT+: each op has a plain PyTorch reference (CPU) and a Triton/Flex path (CUDA).

Installed as ``ratplus_titan.kernels``. Per op, one reference module (imports no fast path),
the fast paths, and one small dispatch module that the model and the decoder call:

==================  ========================  ======================================  ===========================
op                  reference                 fast path                               dispatch
==================  ========================  ======================================  ===========================
pattern attention   ``pattern_attention``     ``pattern_attention_triton``, ``_flex``  ``pattern_attention_dispatch``
top-k attention     ``topk_attention``        ``topk_attention_triton``               ``pattern_attention_dispatch``
gated recurrence    ``recurrence``            ``recurrence_triton``                   ``recurrence_dispatch``
decode attention    ``decode``                ``decode_triton``                       ``decode_dispatch``
==================  ========================  ======================================  ===========================

The top-k fast path is three modules: ``topk_attention_triton`` (the ops), ``topk_select_triton`` (block
selection, prefill and decode) and ``topk_prefill_triton`` (the prefill kernels).

A fast path may import its reference (shared helpers, fallbacks); a reference never imports a fast
path or a dispatch module, and a dispatch module imports its fast paths only inside the branch that
uses them (``tests/kernels/test_import_layout.py``).
"""
