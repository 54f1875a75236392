"""The recurrence reference against a step-by-step float64 loop (outputs and gradients)."""

import pytest
import torch

from ratplus_titan.kernels.recurrence import recurrence_reference, recurrence_step_reference


def loop_float64(gate_logits, keys, values):
    """DESIGN §1 step 3 written out, one time step at a time, in float64 (autograd does the backward)."""
    a = torch.sigmoid(gate_logits.double())
    key_state = torch.zeros_like(a[:, 0])
    value_state = torch.zeros_like(a[:, 0])
    key_states, value_states = [], []
    for t in range(keys.shape[1]):
        key_state = a[:, t] * key_state + (1 - a[:, t]) * keys[:, t].double()
        value_state = a[:, t] * value_state + (1 - a[:, t]) * values[:, t].double()
        key_states.append(key_state)
        value_states.append(value_state)
    return torch.stack(key_states, 1), torch.stack(value_states, 1)


def random_inputs(batch, seq_len, heads, head_dim, gate_center, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, seq_len, heads, 5, head_dim)
    fused = torch.randn(shape, generator=gen, dtype=dtype)
    fused[:, :, :, 4] = fused[:, :, :, 4] + gate_center  # gate logits: a near 0 (<0) or near 1 (>0)
    fused.requires_grad_(True)
    _, _, keys, values, gates = fused.unbind(3)  # strided views, as in the model
    return fused, gates, keys, values


@pytest.mark.parametrize("gate_center", [-6.0, 0.0, 6.0])
@pytest.mark.parametrize("seq_len", [1, 7, 64, 4096])
def test_reference_matches_float64_loop(seq_len, gate_center):
    batch, heads, head_dim = (2, 2, 4) if seq_len < 4096 else (1, 1, 4)
    fused, gates, keys, values = random_inputs(batch, seq_len, heads, head_dim, gate_center, seed=seq_len)
    key_states, value_states = recurrence_reference(gates, keys, values)
    grad_k, grad_v = torch.randn_like(key_states), torch.randn_like(value_states)
    (grad,) = torch.autograd.grad((key_states * grad_k).sum() + (value_states * grad_v).sum(), fused)

    fused64 = fused.detach().double().requires_grad_(True)
    _, _, keys64, values64, gates64 = fused64.unbind(3)
    expected_k, expected_v = loop_float64(gates64, keys64, values64)
    (expected_grad,) = torch.autograd.grad(
        (expected_k * grad_k.double()).sum() + (expected_v * grad_v.double()).sum(), fused64
    )
    torch.testing.assert_close(key_states.double(), expected_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(value_states.double(), expected_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-4)


def test_bfloat16_inputs_keep_fp32_state():
    _, gates, keys, values = random_inputs(2, 300, 2, 8, 4.0, dtype=torch.bfloat16, seed=3)
    key_states, value_states = recurrence_reference(gates, keys, values)
    assert key_states.dtype == torch.bfloat16
    expected_k, expected_v = loop_float64(gates, keys, values)
    # Only the final cast rounds: error stays at bf16 resolution, not accumulated over 300 steps.
    torch.testing.assert_close(key_states.double(), expected_k, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(value_states.double(), expected_v, rtol=1e-2, atol=1e-2)


def test_step_continues_the_scan():
    _, gates, keys, values = random_inputs(2, 20, 2, 4, 0.0, seed=5)
    key_states, value_states = recurrence_reference(gates, keys, values)
    state_k, state_v = key_states[:, 9].float(), value_states[:, 9].float()
    for t in range(10, 20):
        state_k, state_v = recurrence_step_reference(gates[:, t], keys[:, t], values[:, t], state_k, state_v)
        torch.testing.assert_close(state_k, key_states[:, t].detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(state_v, value_states[:, t].detach(), rtol=1e-6, atol=1e-6)
