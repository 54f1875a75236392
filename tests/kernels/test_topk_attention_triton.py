"""The Triton top-k block attention kernels (selection, forward, backward, decode) against the reference.

One test body for both devices (``tests/device.py``): compiled on a GPU; without one the kernels run in
Triton's interpreter (``TRITON_INTERPRET=1``), on small sizes with tiles of 16. The expected values: the block
picks of ``TopKPattern`` (the reference's selection, run on the same inputs and dtype), the block-major pair
lists built from them by loops, then a float64 softmax under the explicit mask ``TopKPattern.allows`` builds
from the picks, differentiated by autograd (the selection is a boolean mask: no gradient goes through it).
Every element is compared (relative norm plus an element-wise bound: ``check`` of the pattern kernels' tests).
``test_full_size_bf16_on_gpu`` runs on a GPU only.

As in ``test_pattern_attention_triton.py``: when ``triton`` was imported before ``TRITON_INTERPRET=1``,
the tests skip and ``test_whole_file_in_fresh_process`` runs this file in a fresh process.
"""

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from ratplus_titan.inference.topk_cache import TopKLayerCache
from ratplus_titan.kernels import topk_attention_triton as tat
from ratplus_titan.kernels import topk_prefill_triton as tpf
from ratplus_titan.kernels import topk_select_triton as tsel
from ratplus_titan.kernels.pattern_attention_dispatch import pattern_attention
from ratplus_titan.kernels.topk_attention import topk_attention_reference, topk_decode_attention
from ratplus_titan.topk import SCORES, TopKPattern
from tests.device import IN_PROCESS, ON_GPU, needs_interpreter
from tests.kernels.test_pattern_attention_triton import check, check_attention, random_qkv  # the same bounds

CASES = [
    # (T, block_size, top_k, sinks, batch, heads)
    (50, 4, 2, 0, 2, 2),  # T not a multiple of the block nor of the query tile
    (37, 5, 3, 2, 1, 3),  # several heads, sinks inside block 0
    (9, 16, 2, 1, 2, 1),  # T < block: no complete block, nothing to select
    (40, 3, 20, 7, 1, 2),  # top_k above the blocks there are; sinks span three blocks
    (64, 16, 1, 20, 2, 2),  # T a multiple of the tile; sinks over a block and a bit
    (45, 4, 0, 3, 1, 2),  # top_k = 0: own block and sinks
    (30, 1, 3, 1, 1, 1),  # blocks of one key
    (70, 24, 1, 0, 1, 2),  # a block wider than a key tile (two sub-tiles)
]


def reference_picks(q, k, pattern):
    """``[B, H, T, NB]`` bool: the reference's selection on these very inputs (same dtype)."""
    seq_len = q.shape[-2]
    return pattern.selected_blocks(pattern.scores(q, pattern.summaries(k)), torch.arange(seq_len, device=q.device))


def unpack_bits(bits, num_blocks):
    """``[B*H, T, NW]`` int32 words -> ``[B*H, T, num_blocks]`` bool."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    return (((bits[..., None] >> shifts) & 1) != 0).flatten(-2)[..., :num_blocks]


def float64_reference(q, k, v, pattern, picks, grad_out, grad_lse):
    """Out, lse and the three gradients of a float64 softmax under the mask of ``picks``."""
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    idx = torch.arange(q.shape[-2], device=q.device)
    mask = pattern.allows(idx[:, None], idx[None, :], picks)
    scores = (q64 @ k64.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.softmax(scores, -1) @ v64
    loss = (out * grad_out.double()).sum() + (lse * grad_lse.double()).sum()
    return out.detach(), lse.detach(), torch.autograd.grad(loss, (q64, k64, v64))


def run_triton(q, k, v, pattern):
    """The two ops, whatever the pattern covers (no SDPA shortcut): (out, lse), bits, (pairs, starts)."""
    bits, pairs, starts = torch.ops.ratplus.topk_select(q.detach(), k.detach(), pattern.block_size, pattern.top_k,
                                                        pattern.sinks, pattern.score)
    scale = q.shape[-1] ** -0.5
    out_lse = torch.ops.ratplus.topk_attention(q, k, v, pairs, starts, pattern.block_size, pattern.sinks, scale)
    return out_lse, bits, (pairs, starts)


def expected_pairs(picks):
    """The block-major pair list of ``picks [BH, T, NB]``, built by loops: per block, the queries ``t`` that picked
    it in order; and where each block's pairs start."""
    pairs, starts = [], []
    for row in picks.cpu():
        flat, begin = [], []
        for b in range(row.shape[1]):
            begin.append(len(flat))
            for t in row[:, b].nonzero().flatten().tolist():
                flat.append(t)
        pairs.append(flat)
        starts.append(begin + [len(flat)])
    return torch.tensor(pairs, dtype=torch.int32).view(len(pairs), -1), torch.tensor(starts, dtype=torch.int32)


def run_case(case, score, dtype, seed, device, head_dim=16):
    seq_len, block_size, top_k, sinks, batch, heads = case
    gen = torch.Generator().manual_seed(seed)
    q, k, v = random_qkv(batch, heads, seq_len, head_dim, dtype, gen, device)
    check_case(q, k, v, TopKPattern(block_size, top_k, score, sinks), gen)


def check_case(q, k, v, pattern, gen):
    """Selection bits, pair lists, forward and gradients of ``q, k, v`` under ``pattern`` against the float64
    reference (``gen`` draws the output gradients)."""
    dtype, device, seq_len = q.dtype, q.device, q.shape[2]
    block_size, top_k, sinks, score = pattern.block_size, pattern.top_k, pattern.sinks, pattern.score
    for x in (q, k, v):
        x.requires_grad_(True)
    (out, lse), bits, (pairs, starts) = run_triton(q, k, v, pattern)
    picks = reference_picks(q.detach(), k.detach(), pattern)  # [B, H, T, NB]
    num_blocks = picks.shape[-1]
    # the selection, bit for bit, and the pair lists the attention runs over
    assert torch.equal(unpack_bits(bits, num_blocks), picks.flatten(0, 1)), "picks differ from the reference"
    assert not unpack_bits(bits, bits.shape[-1] * 32)[..., num_blocks:].any(), "bits set past the complete blocks"
    want_pairs, want_starts = expected_pairs(picks.flatten(0, 1))
    assert torch.equal(starts.cpu(), want_starts), "block starts of the pair lists differ"
    assert torch.equal(pairs.cpu(), want_pairs), "pair lists differ"

    grad_out = torch.randn(out.shape, generator=gen).to(device, dtype)
    grad_lse = torch.randn(lse.shape, generator=gen).to(device)
    grads = torch.autograd.grad((out.float() * grad_out.float()).sum() + (lse * grad_lse).sum(), (q, k, v))
    ref_out, ref_lse, ref_grads = float64_reference(q, k, v, pattern, picks, grad_out, grad_lse)
    tag = f"{score} T={seq_len} bs={block_size} K={top_k} S={sinks} {dtype}"
    check_attention(tag, (out, lse, grads), (ref_out, ref_lse, ref_grads), dtype)


@needs_interpreter
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}bs{}k{}s{}".format(*c[:4]))
def test_forward_backward_match_reference_fp32(case, score, device):
    run_case(case, score, torch.float32, seed=case[0] * 7 + case[1] + SCORES.index(score), device=device)


@needs_interpreter
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("case", [(50, 4, 2, 3, 2, 2), (40, 3, 20, 7, 1, 2)], ids=("T50bs4k2s3", "T40bs3k20s7"))
def test_forward_backward_match_reference_bf16(case, score, device):
    run_case(case, score, torch.bfloat16, seed=3, device=device)


def far_match_inputs(dtype, device, strength=30.0):
    """q, k, v ``[1, 2, 48, 16]`` (blocks of 4) where query 45 and the key closing block 3 (position 15) are
    ``strength`` times one unit vector: their score (``strength^2 / 4``) lies far above every score of the query's
    own block and sink (random, O(1)), so the picked part's max is far above the local one."""
    gen = torch.Generator().manual_seed(21)
    q, k, v = random_qkv(1, 2, 48, 16, dtype, gen, device)
    unit = torch.nn.functional.normalize(torch.randn(16, generator=gen), dim=0).to(device, dtype)
    q[:, :, 45] = strength * unit
    k[:, :, 15] = strength * unit
    return q, k, v, gen


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=("fp32", "bf16"))
def test_forward_redoes_a_picked_score_far_above_the_local_max(dtype, monkeypatch, device):
    """One pass scores picked keys against the local max; a score ~225 nats above it (2^325: beyond fp32) sets the
    device flag, and the redo (max pass, local and picked parts again against the true max) gives the float64
    reference's output and gradients. Without the redo (the limit out of reach), the same call returns non-finite
    values: the redo is what makes it right."""
    pattern = TopKPattern(4, 2, "ratplus", 1)
    q, k, v, gen = far_match_inputs(dtype, device)
    check_case(q, k, v, pattern, gen)
    monkeypatch.setattr(tpf, "_OVERFLOW_LIMIT", float("inf"))
    q, k, v, _ = far_match_inputs(dtype, device)
    out = tat.topk_attention_triton(q, k, v, pattern)
    assert not out.isfinite().all(), "without the redo the overflow should show"


@needs_interpreter
@pytest.mark.parametrize("case", [(50, 4, 2, 3, 2, 2), (45, 5, 3, 6, 2, 2)], ids=("T50bs4k2s3", "T45bs5k3s6"))
def test_forced_redo_matches_reference(case, monkeypatch, device):
    """The redo path on every call (limit -inf: each tile with a picked pair sets the flag): the same results as the
    reference on random inputs, fp32 and bf16."""
    monkeypatch.setattr(tpf, "_OVERFLOW_LIMIT", float("-inf"))
    run_case(case, "moba", torch.float32, seed=5, device=device)
    run_case(case, "quest", torch.bfloat16, seed=6, device=device)


@needs_interpreter
def test_head_dim_not_a_power_of_two(device):
    """hd=24 (padded to 32 inside the kernels): every load, store and atomic masks the padding."""
    run_case((45, 5, 3, 6, 2, 2), "moba", torch.float32, seed=2, device=device, head_dim=24)
    run_case((45, 5, 3, 6, 2, 2), "quest", torch.bfloat16, seed=1, device=device, head_dim=24)


@triton.jit
def _top_k_kernel(SCORES, CAND, SEL, top_k, M: tl.constexpr, N: tl.constexpr, ALGORITHM: tl.constexpr,
                  TOPK_PAD: tl.constexpr):  # fmt: skip
    offs = tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :]
    scores, cand = tl.load(SCORES + offs), tl.load(CAND + offs) != 0
    tl.store(SEL + offs, tsel._top_k_select_row(scores, cand, top_k, ALGORITHM, TOPK_PAD).to(tl.int8))


@needs_interpreter
@pytest.mark.parametrize("algorithm", tsel.TOP_K_ALGORITHMS)
@pytest.mark.parametrize("top_k", [0, 1, 3, 5, 31, 64, 100])
def test_row_top_k_is_exact_on_hard_scores(top_k, algorithm, device):
    """``_top_k_select`` (radix), ``_top_k_select_sorted`` and ``_top_k_select_interp`` against a sort by (score descending, index
    ascending), on rows built to be hard: many exact ties (values from a small set), +0.0 and -0.0 (equal),
    negatives, magnitudes from 1e-38 to 1e38, rows with fewer candidates than ``top_k`` and rows with none; top_k
    not a power of two, equal to the columns, above them (sorted: ``TOPK_PAD`` capped at the columns)."""
    gen = torch.Generator().manual_seed(top_k)
    rows, cols = 16, 64
    base = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.5, 3e-38, -3e-38, 1e38, -1e38, 2.0 ** -126, 7.0])
    scores = base[torch.randint(0, len(base), (rows, cols), generator=gen)]
    scores[::3] = torch.randn(rows // 3 + 1, cols, generator=gen)[: len(scores[::3])] * 10.0 ** torch.randint(
        -30, 30, (1, cols), generator=gen)
    cand = torch.rand(rows, cols, generator=gen) < torch.linspace(0, 1, rows)[:, None]  # row 0: no candidate
    expected = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        order = sorted((-scores[r, c].item(), c) for c in range(cols) if cand[r, c])
        expected[r, [c for _, c in order[:top_k]]] = True
    got = torch.empty(rows, cols, dtype=torch.int8, device=device)
    _top_k_kernel[(1,)](scores.to(device), cand.to(device, torch.int8), got, top_k, M=rows, N=cols,
                        ALGORITHM=tsel.TOP_K_ALGORITHMS.index(algorithm),
                        TOPK_PAD=min(triton.next_power_of_2(max(top_k, 1)), cols))
    assert torch.equal(got.bool().cpu(), expected)


@needs_interpreter
def test_larger_tiles_and_several_selection_chunks(monkeypatch, device):
    """Query tiles of 32; selection chunks of 32 picked 16 rows at a time; key tiles of 16 against blocks of 40
    (three sub-tiles); sink gradients in splits of 16 rows."""
    for name, value in (("tile_m", 32), ("list_m", 32), ("sel_m", 16), ("block_n", 16), ("split", 16)):
        monkeypatch.setitem(tat.CONFIG_OVERRIDE, name, value)
    run_case((83, 5, 4, 2, 1, 2), "quest", torch.float32, seed=1, device=device)
    run_case((130, 40, 1, 3, 1, 1), "ratplus", torch.float32, seed=2, device=device)


@needs_interpreter
def test_select_override_keeps_the_outputs_bitwise(monkeypatch, device):
    """``SELECT_OVERRIDE`` (the settings ``bench/topk.py --phases select`` sweeps) changes rows per pass and warps,
    not the picks: bits, pairs and starts bitwise the default's. Chunks of 32 queries, 32 padded blocks: the
    default holds 32 rows at once, 512 scores per program 16."""
    gen = torch.Generator().manual_seed(12)
    q, k, _ = random_qkv(1, 2, 83, 16, torch.bfloat16, gen, device)
    pattern, list_m = TopKPattern(4, 3, "quest", 1), 32
    assert tsel.select_launch(32, list_m)[0] == 32
    expected = tsel.select_prefill(q, k, pattern, list_m)
    for settings, sel_m in (({"scores_per_program": 512}, 16), ({"scores_per_program": 512, "num_warps": 2}, 16),
                            ({"num_warps": 8}, 32), ({"top_k": "sorted"}, 32), ({"top_k": "interp"}, 32),
                            ({"scores_per_program": 512, "top_k": "sorted"}, 16),
                            ({"scores_per_program": 512, "top_k": "interp"}, 16)):
        monkeypatch.setattr(tsel, "SELECT_OVERRIDE", settings)
        launch = tsel.select_launch(32, list_m)
        assert launch[0] == sel_m and launch[1] == settings.get("num_warps", launch[1])
        assert launch[2] == settings.get("top_k", "radix")
        for name, got, want in zip(("bits", "pairs", "starts"), tsel.select_prefill(q, k, pattern, list_m), expected):
            assert torch.equal(got, want), (settings, name)


@pytest.mark.parametrize("key,value", [("scores_per_program", 1000), ("scores_per_program", 8),
                                       ("scores_per_program", 1024.0), ("num_warps", 3), ("num_warps", 64),
                                       ("sel_m", 16), ("top_k", "bitonic"), ("top_k", None), ("top_k", ["sorted"])])
def test_bad_select_override_names_the_key(monkeypatch, key, value):
    """A bad ``SELECT_OVERRIDE`` value is refused before any launch, naming the key, and so is a SEL_M that is not a
    power of two >= 16 dividing list_m; the empty dict is today's launch (SEL_M: 16384 scores over the padded
    blocks, within [16, list_m])."""
    assert [tsel.select_launch(nb_pad, 64)[0] for nb_pad in (32, 256, 1024, 4096)] == [64, 64, 16, 16]
    assert tsel.select_launch(32, 64)[2] == "radix"  # the default top-k algorithm
    monkeypatch.setattr(tsel, "SELECT_OVERRIDE", {"top_k": "radix"})
    assert tsel.select_launch(32, 64)[2] == "radix"
    for list_m, sel_m in ((24, None), (8, None), (64, 24)):  # CONFIG_OVERRIDE's list_m, sel_m: SEL_M checked too
        with pytest.raises(ValueError, match=f"SEL_M={sel_m or list_m} .list_m={list_m}"):
            tsel.select_launch(32, list_m, sel_m)
    monkeypatch.setattr(tsel, "SELECT_OVERRIDE", {key: value})
    q = torch.zeros(1, 1, 40, 16)
    allowed = "radix, sorted, interp" if key == "top_k" else ""
    with pytest.raises(ValueError, match=f"SELECT_OVERRIDE.*{key}.*{allowed}"):
        tsel.select_prefill(q, q, TopKPattern(4, 1), 16)


def stable_picks(q, k, pattern):
    """``[B*H, T, NB]`` bool: the reference's scores (fp32 or wider), each query's candidates by a stable sort on the
    score, descending: ties to the lowest block, ``-0.0`` equal to ``0.0`` (the kernels' rule; ``torch.topk``, the
    reference's, leaves tie order open)."""
    scores = pattern.scores(q, pattern.summaries(k)).flatten(0, 1)  # [B*H, T, NB]
    seq_len, num_blocks = scores.shape[-2:]
    own = torch.arange(seq_len, device=q.device)[:, None] // pattern.block_size
    cand = torch.arange(num_blocks, device=q.device)[None, :] < own  # [T, NB]
    order = torch.sort(scores.masked_fill(~cand, float("-inf")), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(num_blocks, device=q.device).expand_as(order))
    return cand & (rank < pattern.top_k)


def select_each(q, k, pattern, list_m, monkeypatch):
    """``select_prefill``'s ``(bits, pairs, starts)`` under each of ``TOP_K_ALGORITHMS`` (``SELECT_OVERRIDE["top_k"]``);
    checks that ``SELECT_OVERRIDE`` is back to empty after."""
    outputs = {}
    for algorithm in tsel.TOP_K_ALGORITHMS:
        with monkeypatch.context() as patch:
            patch.setattr(tsel, "SELECT_OVERRIDE", {"top_k": algorithm})
            assert tsel.select_launch(32, list_m)[2] == algorithm
            outputs[algorithm] = tsel.select_prefill(q, k, pattern, list_m)
    assert tsel.SELECT_OVERRIDE == {}
    return outputs


def check_every_top_k(q, k, pattern, list_m, expected_picks, monkeypatch):
    """Every algorithm's bits, pairs and starts bitwise the radix search's, the bits ``expected_picks [B*H, T, NB]``,
    the pair lists those of the picks (built by loops)."""
    outputs = select_each(q, k, pattern, list_m, monkeypatch)
    radix = outputs["radix"]
    for algorithm, got_all in outputs.items():
        for name, got, want in zip(("bits", "pairs", "starts"), got_all, radix):
            assert torch.equal(got, want), f"{algorithm} top-k: {name} differ from the radix search's ({pattern})"
    num_blocks = expected_picks.shape[-1]
    assert torch.equal(unpack_bits(radix[0], num_blocks), expected_picks), f"picks differ ({pattern})"
    assert not unpack_bits(radix[0], radix[0].shape[-1] * 32)[..., num_blocks:].any()
    want_pairs, want_starts = expected_pairs(expected_picks)
    assert torch.equal(radix[1].cpu(), want_pairs) and torch.equal(radix[2].cpu(), want_starts)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=("fp32", "bf16"))
@pytest.mark.parametrize("seq_len,block_size,top_k,score", [(83, 4, 3, "ratplus"), (70, 3, 5, "quest"),
                                                            (45, 5, 1, "moba"), (40, 2, 16, "ratplus")])
def test_every_top_k_equals_radix_and_reference(seq_len, block_size, top_k, score, dtype, monkeypatch, device):
    """``SELECT_OVERRIDE["top_k"]`` = ``"sorted"`` (``_top_k_select_sorted``) and ``"interp"``
    (``_top_k_select_interp``): bits, pairs and starts bitwise the radix search's, the bits the reference's picks; random inputs, top_k not a power of two (3, 5), 1 (no bitonic stage:
    a max) and 16; queries with no candidate (``t < bs``) and with fewer than ``top_k``; chunks of 32 queries
    (list_m 32, 16 rows at a time; the last one ragged)."""
    gen = torch.Generator().manual_seed(seq_len + top_k)
    q, k, _ = random_qkv(1, 2, seq_len, 16, dtype, gen, device)
    pattern = TopKPattern(block_size, top_k, score, 1)
    monkeypatch.setitem(tat.CONFIG_OVERRIDE, "sel_m", 16)
    picks = reference_picks(q, k, pattern).flatten(0, 1)
    assert torch.equal(picks, stable_picks(q, k, pattern))  # no ties among random scores
    check_every_top_k(q, k, pattern, 32, picks, monkeypatch)


@needs_interpreter
def test_selection_in_buckets_of_score_columns(monkeypatch, device):
    """600 queries in blocks of 4 (150 blocks, 256 padded columns), chunks of 16: queries below 260 run with 64
    columns, below 516 with 128, the rest with 256 (``select_buckets``). Bits, pairs and starts of every top-k
    algorithm are the reference's picks and their pair lists."""
    assert tsel.select_buckets(600, 4, 16, 256) == [(0, 16, 64), (16, 32, 128), (32, 38, 256)]
    assert tsel.select_buckets(83, 4, 32, 32) == [(0, 3, 32)]  # one launch where the columns cannot shrink
    gen = torch.Generator().manual_seed(17)
    q, k, _ = random_qkv(1, 2, 600, 16, torch.bfloat16, gen, device)
    pattern = TopKPattern(4, 5, "ratplus", 1)
    picks = reference_picks(q, k, pattern).flatten(0, 1)
    assert torch.equal(picks, stable_picks(q, k, pattern))
    check_every_top_k(q, k, pattern, 16, picks, monkeypatch)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=("fp32", "bf16"))
def test_every_top_k_breaks_ties_like_the_radix_search(dtype, monkeypatch, device):
    """Exact ties: small integers (every score exact whatever the summation order), keys duplicated so that blocks
    0, 2, 3, 5, 7, 8 close on one key and 1, 4 on another (ratplus summaries: equal rows), and queries of zeros
    (every candidate scores 0.0); top_k 3 and 5, blocks of 4 over 48 keys (rows with none, fewer, more
    candidates). Picks: the lowest tied blocks, every algorithm bitwise the radix search's."""
    gen = torch.Generator().manual_seed(13)
    q, k = (torch.randint(-3, 4, (1, 2, 48, 16), generator=gen).to(device, dtype) for _ in range(2))
    ends = k.view(1, 2, 12, 4, 16)[:, :, :, -1]  # the key closing each block
    ends[:, :, [2, 3, 5, 7, 8]] = ends[:, :, :1]
    ends[:, :, [4]] = ends[:, :, 1:2]
    q[:, :, 30:36] = 0
    for top_k in (3, 5):
        pattern = TopKPattern(4, top_k, "ratplus", 0)
        scores = pattern.scores(q, pattern.summaries(k))
        assert (scores[..., [2, 3, 5, 7, 8]] == scores[..., :1]).all() and (scores[..., 30:36, :] == 0).all()
        picks = stable_picks(q, k, pattern)
        assert picks[:, 30:36].flatten(0, 1).sum(-1).tolist() == [top_k] * 12  # zero rows: blocks 0 .. top_k - 1
        assert picks[:, 35, :top_k].all()
        check_every_top_k(q, k, pattern, 16, picks, monkeypatch)


@needs_interpreter
def test_every_output_element_is_written(monkeypatch, device):
    """Outputs allocated full of NaN (and int buffers of garbage): the results still match."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(123 if t.dtype == torch.uint8 else -12345)

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))
    run_case((50, 4, 2, 1, 2, 2), "moba", torch.float32, seed=4, device=device)
    run_decode(TopKPattern(4, 2, "quest", 3), torch.float32, seed=5, device=device, positions=((7, 28, 0),))


@needs_interpreter
def test_tied_scores_pick_the_lowest_blocks(device):
    """Blocks with equal summaries score equally: the lowest block indices win (torch.topk leaves it open).

    Small integers make every score exact whatever the summation order, so the ties are exact.
    """
    seq_len, block_size, top_k = 40, 4, 3
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randint(-3, 4, (1, 1, seq_len, 16), generator=gen).float().to(device) for _ in range(3))
    k.view(1, 1, seq_len // block_size, block_size, 16)[:, :, :, -1] = k[:, :, 3]  # every block closes on one key
    pattern = TopKPattern(block_size, top_k, "ratplus")
    (out, _), bits, _ = run_triton(q, k, v, pattern)
    picks = unpack_bits(bits, seq_len // block_size)[0]  # [T, NB]
    for t in range(seq_len):
        assert picks[t].nonzero().flatten().tolist() == list(range(min(top_k, t // block_size))), t
    no_grad_lse = torch.zeros(1, 1, seq_len, device=device)
    expected = float64_reference(q, k, v, pattern, picks[None, None], torch.zeros_like(q), no_grad_lse)
    check("out with ties", out, expected[0], torch.float32)


@needs_interpreter
def test_public_function_dispatch_and_sdpa_shortcut(device):
    gen = torch.Generator().manual_seed(7)
    q, k, v = random_qkv(1, 2, 45, 16, torch.float32, gen, device)
    pattern = TopKPattern(4, 2, "quest", 1)
    expected = topk_attention_reference(q.double(), k.double(), v.double(), pattern)
    check("public", tat.topk_attention_triton(q, k, v, pattern), expected, torch.float32)
    check("dispatch", pattern_attention(q, k, v, pattern, backend="triton"), expected, torch.float32)
    dense = TopKPattern(4, 11, "quest", 1)
    assert dense.covers_all(45)
    causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(tat.topk_attention_triton(q, k, v, dense), causal)


@needs_interpreter
def test_strided_inputs(device):
    """q, k, v as views of one [B, T, 3, H, hd] projection, as the model makes them."""
    gen = torch.Generator().manual_seed(8)
    batch, seq_len, heads, head_dim = 2, 40, 2, 16
    pattern = TopKPattern(4, 2, "moba", 2)
    fused = torch.randn(batch, seq_len, 3, heads, head_dim, generator=gen).to(device).requires_grad_(True)
    q, k, v = (x.transpose(1, 2) for x in fused.unbind(2))
    assert not q.is_contiguous()
    out = tat.topk_attention_triton(q, k, v, pattern)
    grad_out = torch.randn(out.shape, generator=gen).to(device)
    (grad,) = torch.autograd.grad((out * grad_out).sum(), fused)
    picks = reference_picks(q.detach(), k.detach(), pattern)
    zero_lse = torch.zeros(out.shape[:-1], device=device)
    ref_out, _, ref_grads = float64_reference(q, k, v, pattern, picks, grad_out, zero_lse)
    check("out", out, ref_out, torch.float32)
    check("grad", grad, torch.stack([g.transpose(1, 2) for g in ref_grads], 2), torch.float32)


@needs_interpreter
def test_custom_op_registration_and_compile(device):
    gen = torch.Generator().manual_seed(9)
    q, k, v = random_qkv(1, 1, 24, 16, torch.float32, gen, device)
    q.requires_grad_(True)
    pattern = TopKPattern(4, 1, "ratplus", 1)
    _, pairs, starts = torch.ops.ratplus.topk_select(q.detach(), k, 4, 1, 1, "ratplus")
    torch.library.opcheck(torch.ops.ratplus.topk_select, (q.detach(), k, 4, 1, 1, "ratplus"),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.ratplus.topk_attention, (q, k, v, pairs, starts, 4, 1, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))

    def block(q, k, v):
        return tat.topk_attention_triton(q, k, v, pattern).sin().sum()

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)  # fullgraph: no graph break
    (grad,) = torch.autograd.grad(compiled(q, k, v), q)
    (expected,) = torch.autograd.grad(block(q, k, v), q)
    torch.testing.assert_close(grad, expected)


def test_bad_input_names_the_field(device):
    q = torch.zeros(1, 1, 8, 16, device=device)
    with pytest.raises(ValueError, match="score='max'"):
        torch.ops.ratplus.topk_select(q, q, 4, 1, 0, "max")
    with pytest.raises(ValueError, match="one shape"):
        tat.topk_attention_triton(q, q[:, :, :4], q, TopKPattern(2, 1))


# --------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------
def run_decode(pattern, dtype, seed, device, positions=((0, 9, 28), (4, 20, 13)), seq_len=29, heads=2, head_dim=16):
    """One step per sequence at ragged positions (each call a batch), after a prefill up to each position."""
    gen = torch.Generator().manual_seed(seed)
    for pos in positions:
        batch = len(pos)
        q, k, v = random_qkv(batch, heads, seq_len, head_dim, dtype, gen, device)
        cache = TopKLayerCache(pattern, batch, seq_len, heads, head_dim, dtype, device=device, recurrent=False)
        t = torch.tensor(pos, device=device)
        cache.fill(k.transpose(1, 2), v.transpose(1, 2), t)  # rows [0, t) and the summaries of complete blocks
        rows = torch.arange(batch, device=device)
        q_t, k_t, v_t = q[rows, :, t], k[rows, :, t], v[rows, :, t]  # [B, H, hd]
        expected = topk_decode_attention(pattern, q_t.double(), cache.k.double(), cache.v.double(),
                                         cache.summaries, t, k_t.double(), v_t.double())
        got = tat.topk_decode_attention_triton(pattern, q_t, cache.k, cache.v, cache.summaries, t, k_t, v_t)
        check(f"decode {pattern} {dtype} t={pos}", got, expected, dtype)


@needs_interpreter
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("block_size,top_k,sinks", [(4, 2, 0), (5, 1, 7), (3, 3, 2), (4, 20, 1), (40, 1, 2)])
def test_decode_matches_reference(score, block_size, top_k, sinks, device):
    run_decode(TopKPattern(block_size, top_k, score, sinks), torch.float32, seed=block_size * 10 + top_k, device=device)


@needs_interpreter
def test_decode_bf16_step_by_step_through_the_layer_cache(device):
    """The layer cache on the Triton backend, one step at a time (it files each row and closes blocks)."""
    pattern, seq_len, heads, head_dim = TopKPattern(4, 2, "ratplus", 2), 14, 2, 16
    gen = torch.Generator().manual_seed(11)
    q, k, v = random_qkv(2, heads, seq_len, head_dim, torch.bfloat16, gen, device)
    cache = TopKLayerCache(pattern, 2, seq_len, heads, head_dim, torch.bfloat16, device=device, recurrent=False)
    full = topk_attention_reference(q.double(), k.double(), v.double(), pattern)  # [B, H, T, hd]
    pos = torch.tensor([0, 5], device=device)
    cache.fill(k.transpose(1, 2), v.transpose(1, 2), pos)
    rows = torch.arange(2, device=device)
    while int(pos.min()) < seq_len:
        t = pos.clamp(max=seq_len - 1)
        got = cache.attend(q[rows, :, t], k[rows, :, t], v[rows, :, t], t, {}, backend="triton")  # files the row
        for b in range(2):
            if pos[b] < seq_len:
                check(f"step t={int(t[b])}", got[b], full[b, :, t[b]], torch.bfloat16)
        pos = pos + 1


@needs_interpreter
def test_language_model_on_the_triton_paths_equals_the_reference(device):
    """A tiny RAT+ LM under two top-k layers: the Triton prefill equals the reference forward, and Triton decode
    steps after ragged prompts equal the full forward (the whole path: model, cache, kernels)."""
    from ratplus_titan.inference import RATPlusLM
    from ratplus_titan.model.args import RATPlusModelArgs

    torch.manual_seed(0)
    pattern, total, prompts = ["topk4k1s1-quest", "topk3k2s0-ratplus"], 24, [3, 10]
    make = dict(max_seq_len=total, max_batch_size=2, device=device)
    args = RATPlusModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=50, max_seq_len=64, init_std=0.1,
                            attention_backend="triton")
    lm = RATPlusLM(args, pattern=pattern, decode_backend="triton", **make)
    reference = RATPlusLM(dataclasses.replace(args, attention_backend="reference"), state_dict=lm.model.state_dict(),
                          pattern=pattern, **make)
    tokens = torch.randint(0, 50, (2, total), generator=torch.Generator().manual_seed(1))
    full = lm(tokens)
    torch.testing.assert_close(full, reference(tokens), rtol=1e-4, atol=1e-4)
    lm.prefill([tokens[b, :n].tolist() for b, n in enumerate(prompts)])
    for i in range(total - max(prompts)):
        step = lm.decode_step(torch.stack([tokens[b, n + i] for b, n in enumerate(prompts)]))
        for b, n in enumerate(prompts):
            torch.testing.assert_close(step[b], full[b, n + i], rtol=1e-4, atol=1e-4, msg=f"sequence {b} step {i}")


@pytest.mark.skipif(IN_PROCESS, reason="the tests above ran in this process")
def test_whole_file_in_fresh_process():
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
                            cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "3 skipped" in summary, summary  # this test and the two GPU-only cases


@pytest.mark.skipif(not ON_GPU, reason="full size: on a GPU only (the interpreter would take hours)")
@pytest.mark.parametrize("kind", ["iid", "smooth64"])
def test_full_size_bf16_on_gpu(kind):
    """T=8192, 4 x 128 heads, block 64, top_k 8, 4 sinks, bf16: out, lse and gradients against float64 under the
    kernels' own picks (bf16 scores can differ from the reference's in near ties: at most 0.1% of the rows)."""
    from bench.topk import make_inputs

    pattern, seq_len = TopKPattern(64, 8, "quest", 4), 8192
    q, k, v = make_inputs(kind, 1, 4, seq_len, 128, "cuda", torch.bfloat16, seed=3)
    for x in (q, k, v):
        x.requires_grad_(True)
    (out, lse), bits, _ = run_triton(q, k, v, pattern)
    num_blocks = seq_len // 64
    picks = unpack_bits(bits, num_blocks).view(1, 4, seq_len, num_blocks)
    reference = reference_picks(q.detach(), k.detach(), pattern)
    assert (picks != reference).any(-1).float().mean() <= 1e-3
    gen = torch.Generator().manual_seed(4)
    grad_out = torch.randn(out.shape, generator=gen).to("cuda", torch.bfloat16)
    grad_lse = torch.randn(lse.shape, generator=gen).to("cuda")
    grads = torch.autograd.grad((out.float() * grad_out.float()).sum() + (lse * grad_lse).sum(), (q, k, v))
    expected = float64_reference(q, k, v, pattern, picks, grad_out, grad_lse)
    check_attention(f"full size {kind}", (out, lse, grads), expected, torch.bfloat16)


def test_math_of_the_case_table():
    """The table reaches what it says: ragged T, T < block, picks capped by the blocks there are, sinks past a block."""
    assert any(t % bs and t % 16 for t, bs, *_ in CASES)
    assert any(t < bs for t, bs, *_ in CASES)
    assert any(k > math.floor(t / bs) for t, bs, k, *_ in CASES)
    assert any(s > bs for _, bs, _, s, *_ in CASES)


COMPILE_SCRIPT = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ratplus_titan.kernels import pattern_attention_triton as pat
from ratplus_titan.kernels import topk_prefill_triton as tpf
from ratplus_titan.kernels import topk_select_triton as tsel

def compile_for_sm90(fn, pointers, consts, floats=(), num_warps=4):
    sig = {n: "constexpr" if n in consts else pointers.get(n, "fp32" if n in floats else "i32") for n in fn.arg_names}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": 2})
    print(fn.__name__, "compiled")
    return kernel.asm["ptx"]

bf16, i32, f32 = "*bf16", "*i32", "*fp32"
PART = sys.argv[1]  # one of COMPILE_PARTS: each part its own process, so that each fits the per-test timeout
if PART.startswith("select_"):  # the radix search, the bitonic top-k, the interpolation search
    algorithm = tsel.TOP_K_ALGORITHMS.index(PART[len("select_"):])
    compile_for_sm90(tsel._select_kernel, {"Q": bf16, "SUMM": bf16, "BITS": i32, "COUNTS": i32},
                     dict(HEAD_DIM=128, BLOCK_D=128, LIST_M=64, SEL_M=16, NB_PAD=1024, DK=16, IEEE=False,
                          ALGORITHM=algorithm, TOPK_PAD=16 if PART == "select_sorted" else 1), (), 8)
if PART == "select_radix":
    compile_for_sm90(tsel._pair_list_kernel, {"BITS": i32, "OFFSETS": i32, "PAIRS": i32},
                     dict(LIST_M=64, SEL_M=16, NB_PAD=1024), (), 8)
    compile_for_sm90(tsel._decode_select_kernel, {"Q": bf16, "SUMM": bf16, "POS": "*i64", "SPANS": i32},
                     dict(HEAD_DIM=128, BLOCK_D=128, NB_PAD=2048, DK=16, PICK_PAD=64, NSB_PAD=1), (), 16)

def prefill_kernels(dt, block_m, block_n, n_sub):  # the prefill kernels with dt inputs: their PTX
    dims = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_N=block_n)
    lists = {"PAIRS": i32, "STARTS": i32}
    qkv = {"Q": dt, "K": dt, "V": dt}
    stats = {"REF": f32, "OUT32": f32, "L32": f32, "FLAG": i32}
    pair = [compile_for_sm90(tpf._pair_fwd_kernel, {**qkv, **lists, **stats},
                             dict(dims, BLOCK_G=block_m, N_SUB=n_sub, MAX_PASS=max_pass, GATED=gated),
                             ("qk_scale", "limit"))
            for max_pass, gated in ((False, False), (True, True), (False, True))]
    local = [compile_for_sm90(tpf._local_fwd_kernel, {**qkv, **stats}, dict(dims, BLOCK_M=block_m, N_SUB=n_sub,
                                                                              GATED=gated), ("qk_scale",))
             for gated in (False, True)]
    return pair + local + [
        compile_for_sm90(tpf._finish_fwd_kernel, {"OUT32": f32, "L32": f32, "REF": f32, "Out": dt, "LSE": f32},
                         dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=block_m), ()),
        compile_for_sm90(tpf._local_dq_kernel, {**qkv, "Out": dt, "DO": dt, "LSE": f32, "DLSE": f32, "DELTA": f32,
                                                "DQ32": f32},
                         dict(dims, BLOCK_M=block_m, N_SUB=n_sub, HAS_DLSE=True), ("qk_scale", "scale")),
        compile_for_sm90(tpf._sink_dkdv_kernel, {**qkv, "DO": dt, "LSE": f32, "DELTA": f32, "DKS": f32, "DVS": f32},
                         dict(dims, BLOCK_M=block_m), ("qk_scale",)),
        compile_for_sm90(tpf._key_block_bwd_kernel, {**qkv, **lists, "DO": dt, "DK": dt, "DV": dt, "LSE": f32,
                                                     "DELTA": f32, "DQ32": f32, "DKS": f32, "DVS": f32},
                         dict(dims, BLOCK_M=block_m, N_SUB=n_sub), ("qk_scale", "scale")),
    ]

if PART == "prefill_bf16":
    prefill_kernels(bf16, 64, 64, 1)
if PART == "prefill_fp32":  # fp32 inputs: the dots are IEEE fp32 (pattern_attention_triton._dot), no tf32 anywhere
    for ptx in prefill_kernels(f32, 32, 32, 2):
        assert ".tf32" not in ptx, "tf32 in an fp32 top-k prefill kernel"
if PART == "pattern":
    fp32 = {n: f32 for n in ("Q", "K", "V", "Out", "LSE")}
    ptx = compile_for_sm90(pat._fwd_kernel, fp32, dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=64, BLOCK_N=32, BLOCK_S=16,
                                                       HAS_DIL=True), ("qk_scale",))
    assert ".tf32" not in ptx, "tf32 in the fp32 pattern forward"
    # the pattern backward's far-partial sum and the near kernel that reads it
    compile_for_sm90(pat._far_sum_kernel, {"PARTS": f32, "SUMS": f32}, dict(BLOCK_D=128, BLOCK_M=64, BLOCK_N=128), (), 8)
    near = {"Q": bf16, "K": bf16, "V": bf16, "DO": bf16, "DK": bf16, "DV": bf16, "LSE": f32, "DELTA": f32, "DKF": f32,
            "DVF": f32}
    compile_for_sm90(pat._bwd_near_kernel, near, dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=64, BLOCK_N=128, HAS_FAR=True,
                                                     HAS_DIL=True), ("qk_scale", "scale"), 8)
print(PART, "ok")
"""


COMPILE_PARTS = ("select_radix", "select_sorted", "select_interp", "prefill_bf16", "prefill_fp32", "pattern")
"""``COMPILE_SCRIPT``'s parts, one process each: together they took 240 s on one CPU core (the sorted selection
alone 99 s), past the GPU suite's 300 s per-test timeout on a machine busy with other work."""


@pytest.mark.slow
@pytest.mark.parametrize("part", COMPILE_PARTS)
def test_kernels_compile_for_sm90_without_a_gpu(part):
    """The interpreter runs code the compiler rejects: compile the selection (both top-k algorithms) and prefill
    kernels, and some of the pattern attention's, for an H100/H200 (Triton's own ptxas; no GPU needed), in a
    process without TRITON_INTERPRET; fp32 kernels have no tf32 dot."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, part], cwd=Path(__file__).resolve().parents[2],
                            env=env, capture_output=True, text=True, timeout=900)
    ok = result.returncode == 0 and result.stdout.strip().endswith(f"{part} ok")
    assert ok, result.stdout[-3000:] + result.stderr[-3000:]
