"""``pattern_attention``: attention under any layer pattern, choosing the implementation.

Shapes: ``q, k, v`` are ``[B, H, T, hd]``; output ``[B, H, T, hd]``.

- a pattern that covers every causal key: dense causal SDPA;
- ``Pattern``: the ``backend`` below (references in ``pattern_attention.py``, fused kernel in
  ``pattern_attention_triton.py``, FlexAttention in ``pattern_attention_flex.py``);
- ``TopKPattern``: ``triton`` (``topk_attention_triton.py``; ``auto`` on CUDA), else ``topk_attention.py``;
- ``HeadGroups``: each group of heads under its own pattern, concatenated.

The fast paths are imported inside the branches that use them: importing the model must not
import Triton kernels (CPU machines; the interpreter tests set ``TRITON_INTERPRET`` first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ratplus_titan.head_groups import HeadGroups, LayerPattern
from ratplus_titan.kernels.pattern_attention import pattern_attention_compact, pattern_attention_reference
from ratplus_titan.kernels.topk_attention import topk_attention_reference
from ratplus_titan.pattern import Pattern
from ratplus_titan.topk import TopKPattern


def pattern_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: LayerPattern,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of ``q`` over ``k, v`` under ``pattern``.

    backend: ``auto`` (``triton`` on CUDA, ``sdpa`` elsewhere); ``sdpa`` (explicit boolean mask);
    ``triton`` (one fused kernel, forward and backward; ``pattern_attention_triton.py``);
    ``flex`` (two FlexAttention calls + merge, eager use); ``reference``; ``compact``.
    ``HeadGroups``: each group of heads under its own pattern. ``TopKPattern``: ``triton``
    (``topk_attention_triton.py``; what ``auto`` picks on CUDA), any other backend the plain
    PyTorch reference.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if isinstance(pattern, HeadGroups):
        outs = [pattern_attention(q[:, h], k[:, h], v[:, h], p, scale, backend) for h, p in pattern.slices()]
        return torch.cat(outs, dim=1)  # [B, H, T, hd]
    if pattern.covers_all(q.shape[-2]) and backend != "reference":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if isinstance(pattern, TopKPattern):
        return _topk_attention(q, k, v, pattern, scale, backend)
    return _sparse_attention(q, k, v, pattern, scale, backend)


def _topk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: TopKPattern, scale: float, backend: str
) -> torch.Tensor:
    """Top-k block attention: the Triton kernels for ``triton`` (and ``auto`` on CUDA), else the reference."""
    if backend == "triton" or (backend == "auto" and q.is_cuda and q.shape == k.shape):
        from ratplus_titan.kernels.topk_attention_triton import topk_attention_triton

        return topk_attention_triton(q, k, v, pattern, scale)
    return topk_attention_reference(q, k, v, pattern, scale)


def _sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float, backend: str
) -> torch.Tensor:
    """Dilated + local + sinks attention by ``backend``."""
    if backend == "auto":
        backend = "triton" if q.is_cuda else "sdpa"
    if backend == "sdpa":
        mask = pattern.dense_mask(q.shape[-2], device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if backend == "reference":
        return pattern_attention_reference(q, k, v, pattern, scale)
    if backend == "compact":
        return pattern_attention_compact(q, k, v, pattern, scale)
    if backend == "triton":
        from ratplus_titan.kernels.pattern_attention_triton import pattern_attention_triton

        return pattern_attention_triton(q, k, v, pattern, scale)
    if backend == "flex":
        from ratplus_titan.kernels.pattern_attention_flex import flex_pattern_attention

        return flex_pattern_attention(q, k, v, pattern, scale)
    raise ValueError(
        f"attention backend {backend!r} is unknown: allowed values are auto, sdpa, reference, compact, flex, triton"
    )
