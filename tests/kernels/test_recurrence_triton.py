"""The Triton recurrence scan against the reference and a float64 loop.

One test body for both devices (``tests/device.py``): compiled on a GPU, in Triton's interpreter on the
CPU. Every element of the outputs and of the gradients (gate, key, value) is checked, for fp32 and
bf16, gates near 0, 1/2 and 1, ragged shapes and the model's strided views.
"""

import numpy as np
import pytest
import torch
from triton.runtime import interpreter

from ratplus_titan.kernels import recurrence_triton as rt
from ratplus_titan.kernels.recurrence import recurrence_reference, recurrence_step_reference
from tests.device import needs_interpreter
from tests.kernels.test_recurrence import loop_float64

pytestmark = needs_interpreter


def _vectorized_scan(self, inputs):
    """Triton's interpreter scans one element at a time; this scans one slice of the axis at a time.

    Same sequential order of ``combine_fn(earlier, later)``, just over whole slices: it only
    makes the interpreter faster (the kernels' tiles have thousands of elements).
    """
    datas = [arg.handle.data for arg in inputs]
    dtypes = [arg.dtype for arg in inputs]
    outs = [np.empty_like(d) for d in datas]
    index = [slice(None)] * datas[0].ndim

    def at(i):
        index[self.axis] = i
        return tuple(index)

    acc = None
    for i in range(datas[0].shape[self.axis]):
        cur = tuple(self.to_tensor(np.ascontiguousarray(d[at(i)]), t) for d, t in zip(datas, dtypes))
        if acc is None:
            acc = cur
        else:
            acc = self.combine_fn.fn(*acc, *cur)
            acc = acc if isinstance(acc, tuple) else (acc,)
        for out, value in zip(outs, acc):
            out[at(i)] = value.handle.data
    return [self.to_tensor(out, t) for out, t in zip(outs, dtypes)]


@pytest.fixture(autouse=True)
def _fast_interpreter(monkeypatch):
    """Interpreted kernels (the CPU) scan whole slices at a time; compiled ones (the GPU) are left alone."""
    if isinstance(rt._scan_fwd_kernel, interpreter.InterpretedFunction):
        monkeypatch.setattr(interpreter.ScanOps, "generic_scan", _vectorized_scan)


# ----------------------------------------------------------------------------------------------
# independent float64 version (tests/kernels/test_recurrence.py) and inputs
# ----------------------------------------------------------------------------------------------


def model_views(batch, seq_len, heads, head_dim, gate_center, dtype, seed, device):
    """Fresh random ``fused`` (on ``device``) and its ``(gate, key, value)`` views, split as in the model."""
    gen = torch.Generator().manual_seed(seed)
    fused = torch.randn(batch, seq_len, heads * 5 * head_dim, generator=gen)
    fused = fused.view(batch, seq_len, heads, 5, head_dim)
    fused[:, :, :, 4] += gate_center  # logits near -6: a near 0; near +6: a near 1
    fused = fused.view(batch, seq_len, -1).to(device, dtype).requires_grad_(True)
    _, _, keys, values, gates = fused.view(batch, seq_len, heads, 5, head_dim).unbind(3)
    return fused, gates, keys, values


def run(fn, fused, gates, keys, values, grad_k, grad_v):
    key_states, value_states = fn(gates, keys, values)
    (grad,) = torch.autograd.grad((key_states * grad_k).sum() + (value_states * grad_v).sum(), fused)
    heads, head_dim = keys.shape[2:]
    grad = grad.view(*grad.shape[:2], heads, 5, head_dim)
    return key_states.detach(), value_states.detach(), grad[:, :, :, 4], grad[:, :, :, 2], grad[:, :, :, 3]


def assert_close_everywhere(actual, expected, rtol, atol_scale, name):
    """``|actual - expected| <= rtol |expected| + atol_scale max|expected|`` at every element."""
    assert actual.shape == expected.shape, name
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    bound = rtol * expected.abs() + atol_scale * expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{name}: max error {err.max().item():.3g}, {worst:.3g} x the tolerance"


# (rtol, atol_scale) of assert_close_everywhere. fp32: a scan of T steps rounds each state T times; the GPU's
# gates come from an approximate exp and division (2 ulp each, ``_gates``), the interpreter's from numpy's.
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 1e-2)}
NAMES = ("K", "V", "d gate", "d key", "d value")


def check(batch, seq_len, heads, head_dim, gate_center, dtype, seed, device, **config):
    fused, gates, keys, values = model_views(batch, seq_len, heads, head_dim, gate_center, dtype, seed, device)
    gen = torch.Generator().manual_seed(seed + 1)
    grad_k = torch.randn(keys.shape, generator=gen).to(device, dtype)
    grad_v = torch.randn(keys.shape, generator=gen).to(device, dtype)

    def triton_fn(g, k, v):
        return rt.recurrence_triton(g, k, v, **config)

    got = run(triton_fn, fused, gates, keys, values, grad_k, grad_v)
    assert got[0].dtype == dtype and got[0].is_contiguous() and got[0].shape == keys.shape
    ref = run(recurrence_reference, fused, gates, keys, values, grad_k, grad_v)
    fused64 = fused.detach().double().requires_grad_(True)
    _, _, keys64, values64, gates64 = fused64.view(batch, seq_len, heads, 5, head_dim).unbind(3)
    exact = run(loop_float64, fused64, gates64, keys64, values64, grad_k.double(), grad_v.double())
    rtol, atol = TOLERANCE[dtype]
    for name, g, r, e in zip(NAMES, got, ref, exact):
        assert_close_everywhere(g, e, rtol, atol, f"{name} vs float64")
        assert_close_everywhere(g, r, rtol, atol, f"{name} vs reference")


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate_center", [-6.0, 0.0, 6.0])
def test_matches_reference_and_float64(gate_center, dtype, device):
    # T = 45: 3 chunks of 16, the last ragged. 2 heads of hd = 12: 24 channels in two blocks of 16,
    # the first spanning both heads, the second ragged.
    seed = int(gate_center) + 10 * (dtype == torch.bfloat16)
    check(2, 45, 2, 12, gate_center, dtype, seed=seed, device=device, chunk=16, block_c=16)


@pytest.mark.parametrize("seq_len", [1, 2, 32])
def test_short_and_exact_sequences(seq_len, device):
    check(1, seq_len, 3, 16, 0.0, torch.float32, seed=seq_len, device=device, chunk=16, block_c=16)


def test_default_tiles(device):
    check(1, 70, 2, 20, 2.0, torch.float32, seed=7, device=device)


def test_look_back_over_aggregates(monkeypatch, device):
    # Only every third chunk publishes its inclusive state: the others must fold aggregates.
    monkeypatch.setattr(rt, "_INCLUSIVE_EVERY", 3)
    check(1, 100, 1, 16, 3.0, torch.float32, seed=11, device=device, chunk=16, block_c=16)


def test_persistent_programs_with_prefetch(monkeypatch, device):
    # Two programs for all tiles: each takes tiles from the counter and loads the next while finishing one.
    monkeypatch.setitem(rt._FWD_CONFIG, torch.float32, (16, 16, 2, 2))
    monkeypatch.setitem(rt._BWD_CONFIG, torch.float32, (16, 2, 2))
    check(2, 50, 2, 16, -1.0, torch.float32, seed=31, device=device, chunk=16, block_c=16)


def test_every_element_written(monkeypatch, device):
    """Every buffer the op allocates starts as NaN: outputs must be fully written and finite."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    check(2, 40, 1, 24, 0.0, torch.bfloat16, seed=13, device=device, chunk=16, block_c=16)


def test_flat_channels_and_strided_grads(device):
    """``[B, T, C]`` inputs (one "head"); gradients that arrive non-contiguous."""
    gen = torch.Generator().manual_seed(17)
    fused = torch.randn(2, 33, 3, 20, generator=gen).to(device).requires_grad_(True)
    gates, keys, values = fused.unbind(2)
    key_states, value_states = rt.recurrence_triton(gates, keys, values, chunk=16, block_c=16)
    ref_k, ref_v = recurrence_reference(gates, keys, values)
    grad_out = torch.randn(2, 20, 33, 2, generator=gen).to(device).transpose(1, 2)  # [B, T, C, 2], strided
    (grad,) = torch.autograd.grad((torch.stack([key_states, value_states], -1) * grad_out).sum(), fused)
    (ref_grad,) = torch.autograd.grad((torch.stack([ref_k, ref_v], -1) * grad_out).sum(), fused)
    assert key_states.shape == keys.shape
    rtol, atol = TOLERANCE[torch.float32]
    assert_close_everywhere(key_states, ref_k, rtol, atol, "K")
    assert_close_everywhere(value_states, ref_v, rtol, atol, "V")
    assert_close_everywhere(grad, ref_grad, rtol, atol, "grad")


def test_compiles_without_graph_break_and_under_checkpointing(device):
    batch, seq_len, heads, head_dim = 1, 20, 2, 16
    gen = torch.Generator().manual_seed(19)
    weight = (torch.randn(5 * heads * head_dim, heads * head_dim, generator=gen) * 0.2).to(device)
    u = torch.randn(batch, seq_len, heads * head_dim, generator=gen).to(device)

    def block(weight, u):
        fused = torch.nn.functional.linear(u, weight)
        _, _, k, x, f = fused.view(batch, seq_len, heads, 5, head_dim).unbind(3)
        key_states, value_states = rt.recurrence_triton(f, k, x, chunk=16, block_c=16)
        return (key_states * value_states.sin()).sum()

    def grads(fn):
        w = weight.clone().requires_grad_(True)
        loss = fn(w, u)
        return loss.detach(), torch.autograd.grad(loss, w)[0]

    eager = grads(block)
    compiled = grads(torch.compile(block, backend="aot_eager", fullgraph=True))
    checkpointed = grads(lambda w, u: torch.utils.checkpoint.checkpoint(block, w, u, use_reentrant=False))
    for loss, grad in (compiled, checkpointed):
        torch.testing.assert_close(loss, eager[0], rtol=1e-5, atol=1e-5)
        assert_close_everywhere(grad, eager[1], 1e-5, 1e-6, "d weight")


def test_opcheck(device):
    gen = torch.Generator().manual_seed(23)
    fused = torch.randn(1, 5, 1, 5, 8, generator=gen).to(device)
    _, _, k, x, f = fused.unbind(3)
    torch.library.opcheck(torch.ops.ratplus.recurrence_scan, (f, k, x, 16, 16, 16))
    states = rt.recurrence_scan(f, k, x, 16, 16, 16)[2]
    g = torch.randn(2, 1, 5, 1, 8, generator=gen).to(device)
    torch.library.opcheck(torch.ops.ratplus.recurrence_scan_backward, (f, k, x, states, g[0], g[1], 16, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_matches_reference(dtype, device):
    """One step ``s' = a s + (1 - a) x`` per channel against float64, to within 16 fp32 ulps of ``|s| + |x|``:
    the rounding of ``a`` and ``1 - a`` (the reference rounds ``1 - a`` in fp32: off by an ulp of 1 when ``a``
    is near 1), the gates' exp and division (2 ulp each on the GPU), the products and the sum. The bound
    scales with the inputs, not with ``s'``, which cancels to near 0 for some channels."""
    gen = torch.Generator().manual_seed(29)
    batch, heads, head_dim = 3, 2, 40
    fused = (torch.randn(batch, heads, 5, head_dim, generator=gen) * 4).to(device, dtype)
    _, _, keys, values, gates = fused.unbind(2)  # strided [B, H, hd] views
    key_state = torch.randn(batch, heads, head_dim, generator=gen).to(device)
    value_state = torch.randn(batch, heads, head_dim, generator=gen).to(device)
    got = rt.recurrence_step_triton(gates, keys, values, key_state, value_state)
    expected = recurrence_step_reference(gates, keys, values, key_state, value_state)
    a = torch.sigmoid(gates.double())
    for name, g, e, state, new in zip(("K", "V"), got, expected, (key_state, value_state), (keys, values)):
        assert g.dtype == torch.float32 and g.shape == e.shape
        exact = a * state.double() + (1 - a) * new.double()
        bound = 16 * torch.finfo(torch.float32).eps * (state.double().abs() + new.double().abs())
        for label, value in (("kernel", g), ("reference", e)):
            worst = ((value.double() - exact).abs() / bound).max().item()
            assert worst <= 1.0, f"step {name} ({label}): {worst:.3g} x the bound"
