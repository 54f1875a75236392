"""Gated recurrence of the RAT+ layer (DESIGN §1 step 3), reference implementation.

Per channel ``c`` (channels are ``head * head_dim + i``), in fp32, state starting at zero::

    a_t = sigmoid(f_t)
    K_t = a_t * K_{t-1} + (1 - a_t) * k_t
    V_t = a_t * V_{t-1} + (1 - a_t) * x_t

One gate drives the key state and the value state. Inputs are ``[B, T, C]`` views
(they may be strided slices of the fused ``in_proj`` output); outputs are
``[B, T, C]`` in the input dtype.

This file holds the PyTorch reference used on CPU and imports no fast path;
``recurrence_triton.py`` holds the CUDA kernels, ``recurrence_dispatch.py`` picks between them.
"""

from __future__ import annotations

import torch


class _RecurrenceReference(torch.autograd.Function):
    """Sequential scan in fp32 with a hand-written reverse scan for the backward."""

    @staticmethod
    def forward(ctx, gate_logits, keys, values):
        batch, seq_len, *channels = keys.shape
        acc = torch.promote_types(keys.dtype, torch.float32)  # fp32 state (float64 for float64 inputs)
        gates = torch.sigmoid(gate_logits.to(acc))  # [B, T, ...]
        key_state = keys.new_zeros(batch, *channels, dtype=acc)
        value_state = keys.new_zeros(batch, *channels, dtype=acc)
        key_states = torch.empty(batch, seq_len, *channels, dtype=acc, device=keys.device)
        value_states = torch.empty_like(key_states)
        keys32, values32 = keys.to(acc), values.to(acc)
        for t in range(seq_len):
            a = gates[:, t]
            key_state = a * key_state + (1 - a) * keys32[:, t]
            value_state = a * value_state + (1 - a) * values32[:, t]
            key_states[:, t] = key_state
            value_states[:, t] = value_state
        ctx.save_for_backward(gate_logits, keys, values, key_states, value_states)
        return key_states.to(keys.dtype), value_states.to(values.dtype)

    @staticmethod
    def backward(ctx, grad_key_states, grad_value_states):
        gate_logits, keys, values, key_states, value_states = ctx.saved_tensors
        batch, seq_len, *channels = keys.shape
        acc = key_states.dtype
        gates = torch.sigmoid(gate_logits.to(acc))
        grad_k_state = keys.new_zeros(batch, *channels, dtype=acc)
        grad_v_state = torch.zeros_like(grad_k_state)
        grad_gate = torch.empty(batch, seq_len, *channels, dtype=acc, device=keys.device)
        grad_keys = torch.empty_like(grad_gate)
        grad_values = torch.empty_like(grad_gate)
        zero = torch.zeros_like(grad_k_state)
        for t in range(seq_len - 1, -1, -1):
            a = gates[:, t]
            grad_k_state = grad_k_state + grad_key_states[:, t].to(acc)
            grad_v_state = grad_v_state + grad_value_states[:, t].to(acc)
            prev_k = key_states[:, t - 1] if t > 0 else zero
            prev_v = value_states[:, t - 1] if t > 0 else zero
            grad_keys[:, t] = grad_k_state * (1 - a)
            grad_values[:, t] = grad_v_state * (1 - a)
            grad_a = grad_k_state * (prev_k - keys[:, t].to(acc)) + grad_v_state * (prev_v - values[:, t].to(acc))
            grad_gate[:, t] = grad_a * a * (1 - a)
            grad_k_state = grad_k_state * a
            grad_v_state = grad_v_state * a
        return grad_gate.to(gate_logits.dtype), grad_keys.to(keys.dtype), grad_values.to(values.dtype)


def recurrence_reference(
    gate_logits: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K, V)`` for ``[B, T, ...]`` gate logits, keys and values (plain PyTorch)."""
    return _RecurrenceReference.apply(gate_logits, keys, values)


def recurrence_step_reference(
    gate_logits: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_state: torch.Tensor,
    value_state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: ``[B, ...]`` inputs and fp32 states of the same shape -> new fp32 states."""
    a = torch.sigmoid(gate_logits.float())
    return a * key_state + (1 - a) * keys.float(), a * value_state + (1 - a) * values.float()
