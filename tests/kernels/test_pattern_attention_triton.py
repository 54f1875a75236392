"""The Triton pattern-attention kernels (forward and backward) against the float64 masked reference.

One test body for both devices (``tests/device.py``): on a GPU the kernels compile and the tensors live on
``cuda``; without one they run in Triton's interpreter on the CPU. Small sizes; tile sizes of 16 in the
interpreter make every part of the kernels (masked and unmasked compact, sink and local blocks) run at
these sizes. Errors are relative norms ``||out - ref|| / ||ref||`` (METHOD.md) plus an element-wise bound,
on fresh random inputs.

The interpreter works only if ``triton`` itself was first imported with ``TRITON_INTERPRET=1`` (its
``tl.zeros``, ``tl.max`` ... are built at import). When an earlier test module imported it first,
the tests here skip and ``test_whole_file_in_fresh_process`` runs this file in a fresh process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ratplus_titan.kernels import pattern_attention_triton as pat
from ratplus_titan.kernels.pattern_attention import pattern_attention_reference
from ratplus_titan.kernels.pattern_attention_dispatch import pattern_attention
from ratplus_titan.pattern import Pattern
from tests.device import IN_PROCESS, needs_interpreter

# Relative-norm bounds. fp32: the kernels' dots are IEEE fp32 (never tf32) on the GPU and exact fp32 in the
# interpreter, so fp32 is held to fp32 rounding on both (seen: ~1e-7). bf16 operands land between 1e-3 and
# 1e-2 (seen: 4e-3 out, 7e-3 grads in the interpreter, which truncates fp32 -> bf16 where the GPU rounds;
# torch's own bf16 path gives about half that).
NORM_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}
# Element-wise bound, as a fraction of the largest reference magnitude: catches unwritten or
# misplaced elements (off by O(1)) without failing on bf16 cancellation in single gradient entries.
ELEM_TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-2}

CASES = [
    # (T, dilation, window, sinks)
    (9, 16, 2, 1),  # T < D
    (50, 4, 3, 2),  # T not a multiple of the tile (16) nor of D
    (70, 5, 20, 30),  # sinks > window, dilated rows inside the sinks
    (37, 1, 0, 0),  # D = 1 through the kernel (dense causal)
    (45, -1, 6, 2),  # no dilation: sliding window + sinks
    (45, -1, 0, 0),  # D = -1, W = 0: only the diagonal
    (75, 7, 0, 0),  # W = 0, S = 0
    (90, 2, 3, 1),  # many compact rows: unmasked compact tiles in all kernels
    (80, 3, 40, 0),  # long window, several unmasked local tiles
    (50, 16, 5, 17),  # sinks cover the first dilated row, not the second
    (64, 2, 1, 64),  # all keys are sinks
]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


def check(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.shape == expected.shape, name
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    if expected.abs().max() < 1e-12:  # e.g. dq when every query sees only itself
        assert actual.abs().max() < ELEM_TOL[dtype], f"{name}: expected zeros"
        return
    err = rel_err(actual, expected)
    assert err < NORM_TOL[dtype], f"{name}: relative error {err:.2e} >= {NORM_TOL[dtype]:.0e}"
    worst = (actual.double() - expected).abs().max().item() / expected.abs().max().item()
    assert worst < ELEM_TOL[dtype], f"{name}: worst element off by {worst:.2e} of max |ref|"


def check_attention(tag: str, actual: tuple, expected: tuple, dtype: torch.dtype) -> None:
    """``check`` of (out, lse, (dq, dk, dv)) against the reference's; the gradients keep the inputs' dtype."""
    (out, lse, grads), (ref_out, ref_lse, ref_grads) = actual, expected
    check(f"out {tag}", out, ref_out, dtype)
    check(f"lse {tag}", lse, ref_lse, torch.float32 if dtype == torch.float32 else dtype)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.dtype == dtype
        check(f"{name} {tag}", g, r, dtype)


def random_qkv(batch, heads, seq_len, head_dim, dtype, gen, device):
    """Three ``[B, H, T, hd]`` tensors on ``device``, drawn on the CPU from ``gen`` (the same values on any device)."""
    return [torch.randn(batch, heads, seq_len, head_dim, generator=gen, dtype=torch.float32).to(device, dtype)
            for _ in range(3)]


def reference_with_grads(q, k, v, pattern, grad_out, grad_lse=None):
    """Float64 masked softmax on the same (upcast) inputs; out, lse and the three gradients."""
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5
    scores = (q64 @ k64.transpose(-1, -2)) * scale
    mask = pattern.dense_mask(q.shape[-2], device=q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.softmax(scores, -1) @ v64
    # the explicit-mask reference of the package must agree with this spelled-out one
    torch.testing.assert_close(pattern_attention_reference(q64, k64, v64, pattern), out, rtol=1e-12, atol=1e-12)
    loss = (out * grad_out.double()).sum()
    if grad_lse is not None:
        loss = loss + (lse * grad_lse.double()).sum()
    grads = torch.autograd.grad(loss, (q64, k64, v64))
    return out.detach(), lse.detach(), grads


def run_case(seq_len, dilation, window, sinks, dtype, seed, device, batch=1, heads=1, head_dim=16, grad_lse=False):
    gen = torch.Generator().manual_seed(seed)
    pattern = Pattern(dilation, window, sinks)
    q, k, v = random_qkv(batch, heads, seq_len, head_dim, dtype, gen, device)
    for x in (q, k, v):
        x.requires_grad_(True)
    out, lse = torch.ops.ratplus.pattern_attention(q, k, v, dilation, window, sinks, head_dim ** -0.5)
    grad_out = torch.randn(out.shape, generator=gen).to(device, dtype)
    g_lse = torch.randn(lse.shape, generator=gen).to(device) if grad_lse else None
    loss = (out.float() * grad_out.float()).sum() + ((lse * g_lse).sum() if grad_lse else 0)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_out, ref_lse, ref_grads = reference_with_grads(q, k, v, pattern, grad_out, g_lse)
    tag = f"T={seq_len} D={dilation} W={window} S={sinks} {dtype}"
    check_attention(tag, (out, lse, grads), (ref_out, ref_lse, ref_grads), dtype)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("seq_len,dilation,window,sinks", CASES)
def test_forward_backward_match_float64_reference(seq_len, dilation, window, sinks, dtype, device):
    run_case(seq_len, dilation, window, sinks, dtype, seed=seq_len * 131 + dilation * 7 + window + sinks, device=device)


@needs_interpreter
@pytest.mark.parametrize("tiles", [(32, 16, 1, 1), (16, 32, 1, 1)], ids=["bm32bn16", "bm16bn32"])
def test_unequal_query_and_key_tiles(tiles, monkeypatch, device):
    for kind in ("fwd", "dq", "dkdv"):
        monkeypatch.setitem(pat.CONFIG_OVERRIDE, kind, tiles)
    run_case(83, 4, 9, 3, torch.float32, seed=5, device=device)
    run_case(70, -1, 20, 2, torch.float32, seed=6, device=device)


SPLIT_CASES = [
    # (T, dilation, window, sinks): the far rows' queries cut into splits of 1 or 2 query tiles
    (83, 4, 9, 3),  # ragged T, sinks and dilated rows in one far block
    (75, 7, 0, 0),  # W = 0, S = 0
    (70, 5, 20, 30),  # sinks > window: the sinks fill two far blocks
    (37, 1, 0, 2),  # D = 1 through the kernel: every position beyond the sinks is far
    (45, -1, 6, 5),  # no dilation: the sinks are the only far rows
    (64, 2, 1, 64),  # all keys are sinks
    (50, 16, 5, 17),  # the first dilated row is a sink
    (80, 3, 40, 0),  # long window: the last far block has no query, its partials are never written
]


@needs_interpreter
@pytest.mark.parametrize("split_tiles", [1, 2])
@pytest.mark.parametrize("seq_len,dilation,window,sinks", SPLIT_CASES)
def test_far_splits_match_float64_reference(seq_len, dilation, window, sinks, split_tiles, monkeypatch, device):
    monkeypatch.setattr(pat, "FAR_SPLIT_TILES", split_tiles)
    run_case(seq_len, dilation, window, sinks, torch.float32, seed=seq_len * 17 + window + split_tiles, device=device)


@needs_interpreter
def test_far_splits_bf16_unequal_tiles_and_batches(monkeypatch, device):
    monkeypatch.setattr(pat, "FAR_SPLIT_TILES", 3)
    run_case(90, 2, 3, 1, torch.bfloat16, seed=21, device=device)
    for kind in ("fwd", "dq", "dkdv"):
        monkeypatch.setitem(pat.CONFIG_OVERRIDE, kind, (16, 32, 1, 1))
    run_case(77, 3, 4, 2, torch.float32, seed=22, device=device, batch=2, heads=2, grad_lse=True)


@pytest.mark.parametrize("seq_len,dilation,window,sinks", CASES + SPLIT_CASES)
def test_far_rows_are_the_sinks_and_dilated_positions(seq_len, dilation, window, sinks):
    """far_rows / far_position (the far kernel's row map) against the pattern's own definition."""
    pattern = Pattern(dilation, window, sinks)
    d_launch, r_lo, _, _ = pat._pattern_args(dilation, window, sinks, seq_len)
    positions = [pat.far_position(f, d_launch, sinks, r_lo) for f in range(pat.far_rows(dilation, sinks, seq_len))]
    j = torch.arange(seq_len)
    expected = (j < sinks) | (((j + 1) % dilation == 0) if dilation != -1 else False)
    assert positions == j[expected].tolist(), pattern


def test_far_split_len_fills_the_gpu():
    """At T=16K, 16 heads, 132 SMs: the far programs of d16w256s4 / d64w256s4 are split into >= 4 per SM."""
    for dilation, min_programs in ((16, 4 * 132), (64, 4 * 132)):
        seq_len, window, sinks, block_m, block_n = 16384, 256, 4, 64, 128
        d_launch, r_lo, _, _ = pat._pattern_args(dilation, window, sinks, seq_len)
        num_far = pat.far_rows(dilation, sinks, seq_len)
        split_len = pat.far_split_len(seq_len, d_launch, window, sinks, r_lo, num_far, block_m, block_n, 16, 132)
        assert split_len % block_m == 0
        programs = 0
        for f0 in range(0, num_far, block_n):  # nonempty (block, split) pairs, counted query by query
            first = pat.far_position(f0, d_launch, sinks, r_lo) + window + 1
            programs += len({t // split_len for t in range(first, seq_len)})
        assert programs * 16 >= min_programs, (dilation, split_len, programs)
        assert split_len // block_m >= pat.FAR_MIN_TILES


@needs_interpreter
def test_lse_gradient_and_odd_head_dim(device):
    run_case(41, 3, 4, 2, torch.float32, seed=11, device=device, head_dim=24, grad_lse=True)  # hd padded to 32 in the kernel


@needs_interpreter
def test_strided_inputs_and_batches(device):
    """q, k, v as views of one [B, T, 3, H, hd] projection, as the model makes them."""
    gen = torch.Generator().manual_seed(3)
    batch, seq_len, heads, head_dim = 2, 40, 2, 16
    pattern = Pattern(4, 5, 1)
    fused = torch.randn(batch, seq_len, 3, heads, head_dim, generator=gen).to(device).requires_grad_(True)
    q, k, v = (x.transpose(1, 2) for x in fused.unbind(2))
    assert not q.is_contiguous()
    out = pat.pattern_attention_triton(q, k, v, pattern)
    grad_out = torch.randn(out.shape, generator=gen).to(device)
    (grad,) = torch.autograd.grad((out * grad_out).sum(), fused)
    ref_out, _, ref_grads = reference_with_grads(q, k, v, pattern, grad_out)
    check("out", out, ref_out, torch.float32)
    check("grad", grad, torch.stack([g.transpose(1, 2) for g in ref_grads], 2), torch.float32)


@needs_interpreter
def test_dense_patterns_go_to_sdpa_and_dispatch(device):
    gen = torch.Generator().manual_seed(4)
    q, k, v = random_qkv(1, 2, 30, 16, torch.float32, gen, device)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    for pattern in (Pattern(1, 0, 0), Pattern(8, 29, 0), Pattern(-1, 0, 30)):
        torch.testing.assert_close(pat.pattern_attention_triton(q, k, v, pattern), expected)
    pattern = Pattern(4, 3, 1)
    ref = pattern_attention_reference(q.double(), k.double(), v.double(), pattern)
    check("dispatch", pattern_attention(q, k, v, pattern, backend="triton"), ref, torch.float32)


@needs_interpreter
def test_custom_op_registration_and_compile(device):
    gen = torch.Generator().manual_seed(8)
    q, k, v = random_qkv(1, 1, 24, 16, torch.float32, gen, device)
    q.requires_grad_(True)
    torch.library.opcheck(torch.ops.ratplus.pattern_attention, (q, k, v, 4, 2, 1, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))

    def block(q, k, v):
        return pat.pattern_attention_triton(q, k, v, Pattern(4, 2, 1)).sin().sum()

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)  # fullgraph: no graph break
    (grad,) = torch.autograd.grad(compiled(q, k, v), q)
    (expected,) = torch.autograd.grad(block(q, k, v), q)
    torch.testing.assert_close(grad, expected)


@pytest.mark.skipif(IN_PROCESS, reason="the tests above ran in this process")
def test_whole_file_in_fresh_process():
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
                            cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "1 skipped" in summary, summary  # skipped: this test itself
