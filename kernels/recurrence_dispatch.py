"""The gated recurrence (``recurrence.py``), choosing the implementation: Triton on CUDA, the reference elsewhere.

``gated_recurrence`` runs the scan over a sequence (training, prefill); ``recurrence_step`` advances
the fp32 states by one token (decode). The Triton module is imported only on CUDA inputs, so
importing the model never imports it.
"""

from __future__ import annotations

import torch

from ratplus_titan.kernels.recurrence import recurrence_reference, recurrence_step_reference


def gated_recurrence(
    gate_logits: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K, V)`` for ``[B, T, ...]`` gate logits, keys and values: the Triton scan on CUDA, the reference elsewhere."""
    if keys.is_cuda:
        from ratplus_titan.kernels.recurrence_triton import recurrence_triton

        return recurrence_triton(gate_logits, keys, values)
    return recurrence_reference(gate_logits, keys, values)


def recurrence_step(
    gate_logits: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_state: torch.Tensor,
    value_state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step (``[B, ...]`` inputs, fp32 states -> new fp32 states): one fused Triton launch on CUDA."""
    if gate_logits.is_cuda:
        from ratplus_titan.kernels.recurrence_triton import recurrence_step_triton

        return recurrence_step_triton(gate_logits, keys, values, key_state, value_state)
    return recurrence_step_reference(gate_logits, keys, values, key_state, value_state)
