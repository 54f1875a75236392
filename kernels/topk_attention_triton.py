"""Triton kernels for top-k block attention (``ratplus_titan/topk.py``): prefill forward and backward, and decode.

The semantics are those of ``topk_attention.py`` (the reference): query ``t`` (own block ``t // bs``)
sees its own block causally, the sinks ``j < S``, and the ``top_k`` earlier complete blocks whose
summary scores highest against it (``quest``: per-channel key min/max, ``moba``: mean key,
``ratplus``: the key closing the block). Selection is per query and not differentiable: gradients
are those of softmax attention under the fixed mask (no gradient reaches the summaries), as in the
reference, where the mask is a boolean tensor.

**Selection** (``_select_kernel``, one program per tile of ``tile_m`` queries). Summaries come from
``TopKPattern.summaries`` (the reference's own function, so they are bitwise the reference's).
Scores ``q . summary`` are ``tl.dot`` products accumulated in fp32 over head-dim chunks (products
of 16-bit inputs are exact in fp32; fp32 inputs use IEEE fp32 dots, never tf32), so they equal the
reference's fp32 scores up to summation order. Each query's ``min(top_k, candidates)`` best blocks
are found without sorting: a bisection on the score value for the threshold that exactly ``k``
scores reach (count-above passes over the row), then, for equal scores at the threshold, the
lowest block indices (``torch.topk`` leaves tie order unspecified; with real activations ties do
not happen). Scores that agree to within 2^-80 of their spread count as ties (the bisection stops
there). Results: ``bits [B*H, T, NW]`` int32, bit ``b % 32`` of word ``b // 32`` set when query
``t`` picked block ``b``; ``visits [B*H, n_tiles, NBT]`` uint8, the blocks a query tile must visit
(picked by any of its queries, its own blocks, the sink blocks).

**Attention** (FA2 style, exact): a query tile streams the keys of the blocks it visits (a compacted
list, ``_compact_kernel``) through one online softmax, each key masked per query row by
``causal & (own block | sink | picked bit)``. The tile's work is ``|union of its rows' picks|``
blocks, not ``top_k``: queries that pick different blocks cost the union. Neighbouring queries
that pick similar blocks (smooth queries) make it small; independent random queries make it
nearly every earlier block. Measured (CPU, the reference's picks, T=16384, block 64, top_k 16,
query tiles of 64 / 32): computed / attended key blocks = 7.8 / 7.4 for iid Gaussian q, k (6.4 / 5.6
with quest), 1.9 / 1.5 for queries interpolated between anchors 64 positions apart, 1.28 / 1.17 at 256
(``bench/topk.py`` reports it per run as ``visit_ratio``). Dense causal attention computes
``T^2 / 2`` pairs and top-k with ``top_k * bs = T / 16`` attends ``T^2 (1/16 - 1/512)``: 8.26x fewer,
the ceiling of the forward speedup over SDPA at equal per-pair speed, divided by the visit ratio.

**Backward** (deterministic, no atomics): ``_bwd_dq_kernel`` per query tile over the same lists
(computes ``delta = rowsum(dO * O) - dLSE`` too); ``_bwd_dkdv_kernel`` per key block over the
query tiles that visit it (the transposed ``visits``, compacted).

**Decode** (``topk_decode_attention_triton``): ``_decode_select_kernel`` scores the cached block
summaries of one query per (sequence, head), selects as above, and writes a table of row spans
(sink blocks not otherwise seen, the own block up to the query, the picked blocks); the flat decode
kernel of ``decode_triton.py`` streams those spans (its ``SPANS`` mode) and merges the new token's
own row, so a step reads ``S + (top_k + 1) * bs`` rows plus ``T / bs`` summaries.

The ops are ``torch.ops.ratplus.topk_select`` (no autograd: the selection), ``topk_attention``
(returns ``(out, lse)``, differentiable in q, k, v and both outputs) and ``topk_decode_attention``,
all ``torch.library.custom_op`` with fake implementations, so ``torch.compile`` traces through them.
Under ``TRITON_INTERPRET=1`` they run on CPU tensors (the tests do this).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ratplus_titan.kernels.pattern_attention_triton import (
    _LOG2E,
    _UPCAST_DOT,
    _dot,
    _interpreting,
    _load_rows,
    _unit_last,
)
from ratplus_titan.topk import SCORES, TopKPattern

_MAX_BISECTIONS = 80  # value bisection steps of the selection (each one count pass over a row of scores)
_SCORES_PER_PROGRAM = 16384  # fp32 scores a selection program holds at once (rows x padded blocks)


# --------------------------------------------------------------------------------------
# selection: block scores and each query's top-k blocks
# --------------------------------------------------------------------------------------
@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _score_dot(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b`` in fp32: exact products for 16-bit inputs, IEEE fp32 (not tf32) for fp32 inputs."""
    if _UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _top_k_select(s, cand, top_k, MAX_IT: tl.constexpr):
    """``s [M, N]`` fp32 scores, ``cand [M, N]`` candidates -> ``[M, N]`` bool: each row's ``min(top_k, #cand)``
    highest-scoring candidates (ties at the threshold: lowest indices first).

    Bisection on the value: ``lo`` with ``count(s >= lo) >= k``, ``hi`` with ``count(s >= hi) < k``; it stops
    when ``count(s >= lo) == k`` or ``lo`` and ``hi`` are adjacent floats (then ``lo`` is the k-th value).
    """
    s = tl.where(cand, s, float("-inf"))
    n_cand = tl.sum(cand.to(tl.int32), 1)
    k = tl.minimum(n_cand, top_k)
    take_all = n_cand <= top_k
    top = tl.max(s, 1)
    c_top = tl.sum((s >= top[:, None]).to(tl.int32), 1)
    top_is_kth = c_top >= k  # the k-th value is the row maximum (k == 1, or ties at the top)
    lo = tl.where(top_is_kth, top, tl.min(tl.where(cand, s, float("inf")), 1))
    cnt_lo = tl.where(top_is_kth, c_top, n_cand)
    hi = tl.where(top_is_kth, float("inf"), top)
    cnt_hi = tl.where(top_is_kth, 0, c_top)
    lo = tl.where(take_all, 0.0, lo)  # rows taking every candidate skip the search (and no inf - inf)
    hi = tl.where(take_all, 0.0, hi)
    done = (take_all | top_is_kth | (cnt_lo == k)).to(tl.int32)
    active = tl.sum(1 - done, 0)
    it = 0
    while active > 0:
        mid = lo * 0.5 + hi * 0.5
        c = tl.sum((s >= mid[:, None]).to(tl.int32), 1)
        adjacent = (mid <= lo) | (mid >= hi)
        move = (done == 0) & ~adjacent
        up = move & (c >= k)
        down = move & (c < k)
        lo = tl.where(up, mid, lo)
        cnt_lo = tl.where(up, c, cnt_lo)
        hi = tl.where(down, mid, hi)
        cnt_hi = tl.where(down, c, cnt_hi)
        done = (done | adjacent.to(tl.int32) | (cnt_lo == k).to(tl.int32))
        it += 1
        active = tl.where(it < MAX_IT, tl.sum(1 - done, 0), 0)
    band = (s >= lo[:, None]) & (s < hi[:, None])  # the threshold value (several if stopped early)
    rank = tl.cumsum(band.to(tl.int32), 1)
    sel = (s >= hi[:, None]) | (band & (rank <= (k - cnt_hi)[:, None]))
    sel = tl.where(take_all[:, None], cand, sel)
    return sel & cand & (k > 0)[:, None]


# Integer arguments that only address bits, lists and statistics are not specialized on their values
# (Triton would compile again for each divisibility by 16): one compile serves every sequence length.
# ``quest`` is a runtime flag for the same reason (one kernel for the three scores).
@triton.jit(do_not_specialize=["T", "NB", "NBT", "n_tiles", "top_k", "quest"])
def _select_kernel(
    Q, SUMM, BITS, VISITS,
    sqb, sqh, sqt, ssb, ssh, ssn, ssr,
    H, T, NB, NBT, top_k, BS, S, n_tiles, quest,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TILE_M: tl.constexpr, SEL_M: tl.constexpr,
    NB_PAD: tl.constexpr, DK: tl.constexpr, IEEE: tl.constexpr, MAX_IT: tl.constexpr,
):
    """Picks of queries ``[m0, m0 + TILE_M)`` (``SEL_M`` rows at a time) as bits, and the blocks the tile visits."""
    bh = tl.program_id(0)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    tile = tl.program_id(1)
    m0 = tile * TILE_M
    blocks = tl.arange(0, NB_PAD)
    block_ok = blocks < NB
    NW: tl.constexpr = NB_PAD // 32
    q_base = Q + b64 * sqb + h64 * sqh
    s_base = SUMM + b64 * ssb + h64 * ssh + blocks[None, :] * ssn  # [1, NB_PAD]
    visits = tl.zeros([NB_PAD], dtype=tl.int32)
    for sub in tl.static_range(TILE_M // SEL_M):
        rows = m0 + sub * SEL_M + tl.arange(0, SEL_M)
        row_ok = rows < T
        acc = tl.zeros([SEL_M, NB_PAD], dtype=tl.float32)
        for d0 in tl.static_range(0, BLOCK_D, DK):
            offs_d = d0 + tl.arange(0, DK)
            d_ok = offs_d < HEAD_DIM
            q = tl.load(q_base + rows[:, None] * sqt + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            s_mask = block_ok[None, :] & d_ok[:, None]
            if quest != 0:  # sum_c max(q_c lo_c, q_c hi_c) = q+ . hi + q- . lo
                lo = tl.load(s_base + offs_d[:, None], mask=s_mask, other=0.0)  # [DK, NB_PAD]
                hi = tl.load(s_base + ssr + offs_d[:, None], mask=s_mask, other=0.0)
                # (clamped in fp32: exact, and Triton's interpreter compares 16-bit floats as raw integers)
                acc = _score_dot(tl.maximum(q.to(tl.float32), 0.0).to(hi.dtype), hi, acc, IEEE)
                acc = _score_dot(tl.minimum(q.to(tl.float32), 0.0).to(lo.dtype), lo, acc, IEEE)
            else:
                summ = tl.load(s_base + offs_d[:, None], mask=s_mask, other=0.0)
                acc = _score_dot(q, summ, acc, IEEE)
        own = rows // BS
        cand = (blocks[None, :] < own[:, None]) & block_ok[None, :]
        sel = _top_k_select(acc, cand, top_k, MAX_IT) & row_ok[:, None]  # [SEL_M, NB_PAD]
        bits = tl.reshape(sel.to(tl.int32), (SEL_M, NW, 32)) << tl.arange(0, 32)[None, None, :]
        words = tl.reduce(bits, 2, _bit_or)  # [SEL_M, NW]
        offs_w = tl.arange(0, NW)
        tl.store(BITS + (bh.to(tl.int64) * T + rows[:, None]) * NW + offs_w[None, :], words, mask=row_ok[:, None])
        visits = tl.maximum(visits, tl.max(sel.to(tl.int32), 0))
    m_last = tl.minimum(m0 + TILE_M, T) - 1
    own_blocks = (blocks >= m0 // BS) & (blocks <= m_last // BS)
    sink_blocks = (blocks * BS < S) & (blocks * BS <= m_last)
    visits = visits | (own_blocks | sink_blocks).to(tl.int32)
    tl.store(VISITS + (bh.to(tl.int64) * n_tiles + tile) * NBT + blocks, visits.to(tl.uint8), mask=blocks < NBT)


@triton.jit(do_not_specialize=["N"])
def _compact_kernel(MASK, LIST, COUNT, N, BLOCK: tl.constexpr):
    """Row ``r`` of a ``[R, N]`` 0/1 matrix -> the indices of its ones, in order, and how many."""
    r = tl.program_id(0).to(tl.int64)
    count = 0
    for start in range(0, N, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        one = tl.load(MASK + r * N + idx, mask=idx < N, other=0) != 0
        pos = count + tl.cumsum(one.to(tl.int32), 0) - 1
        tl.store(LIST + r * N + pos, idx, mask=one)
        count += tl.sum(one.to(tl.int32), 0)
    tl.store(COUNT + r, count)


# --------------------------------------------------------------------------------------
# attention: forward and backward over the visited blocks
# --------------------------------------------------------------------------------------
@triton.jit
def _picked(bits_rows, row_ok, blk):
    """Did each row pick block ``blk``? ``bits_rows``: pointers to the rows' first bit words."""
    word = tl.load(bits_rows + blk // 32, mask=row_ok, other=0)
    return ((word >> (blk % 32)) & 1) != 0


@triton.jit
def _allowed(t, j, sees_block, key_ok, S):
    """Query ``t`` may see key ``j``: causal, and its block is the own block or picked, or ``j`` is a sink."""
    return key_ok & (j <= t) & (sees_block | (j < S))


@triton.jit(do_not_specialize=["T", "NW", "NBT", "n_tiles"])
def _fwd_kernel(
    Q, K, V, Out, LSE, BITS, LIST, COUNT,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    H, T, BS, S, NW, NBT, n_tiles, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    N_SUB: tl.constexpr,
):
    bh = tl.program_id(0)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    tile = n_tiles - 1 - tl.program_id(1)  # the last tiles visit the most blocks: first
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    own = offs_m // BS
    k_base = K + b64 * skb + h64 * skh
    v_base = V + b64 * svb + h64 * svh
    bits_rows = BITS + (bh.to(tl.int64) * T + offs_m) * NW
    q = _load_rows(Q + b64 * sqb + h64 * sqh, offs_m, sqt, offs_d, row_ok, HEAD_DIM, BLOCK_D, True)
    list_base = LIST + (bh.to(tl.int64) * n_tiles + tile) * NBT
    n_visits = tl.load(COUNT + bh.to(tl.int64) * n_tiles + tile)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for i in range(0, n_visits):
        blk = tl.load(list_base + i)
        sees_block = (own == blk) | _picked(bits_rows, row_ok, blk)
        for u in tl.static_range(N_SUB):
            offs_j = u * BLOCK_N + tl.arange(0, BLOCK_N)
            pos = blk * BS + offs_j
            key_ok = (offs_j < BS) & (pos < T)
            k = _load_rows(k_base, pos, skt, offs_d, key_ok, HEAD_DIM, BLOCK_D, True)
            qk = _dot(q, tl.trans(k), None)
            ok = _allowed(offs_m[:, None], pos[None, :], sees_block[:, None], key_ok[None, :], S)
            qk = tl.where(ok, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: keep exp2 finite
            p = tl.math.exp2(qk - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_rows(v_base, pos, svt, offs_d, key_ok, HEAD_DIM, BLOCK_D, True)
            acc = _dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows (t >= T) see nothing
    out = acc / l_safe[:, None]
    o_ptrs = Out + b64 * sob + h64 * soh + offs_m[:, None] * sot + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, mask=row_ok)


@triton.jit(do_not_specialize=["T", "NW", "NBT", "n_tiles"])
def _bwd_dq_kernel(
    Q, K, V, Out, DO, LSE, DLSE, DELTA, DQ, BITS, LIST, COUNT,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sdob, sdoh, sdot, sdqb, sdqh, sdqt,
    H, T, BS, S, NW, NBT, n_tiles, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    N_SUB: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    bh = tl.program_id(0)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    tile = n_tiles - 1 - tl.program_id(1)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    own = offs_m // BS
    k_base = K + b64 * skb + h64 * skh
    v_base = V + b64 * svb + h64 * svh
    bits_rows = BITS + (bh.to(tl.int64) * T + offs_m) * NW
    q = _load_rows(Q + b64 * sqb + h64 * sqh, offs_m, sqt, offs_d, row_ok, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + b64 * sdob + h64 * sdoh, offs_m, sdot, offs_d, row_ok, HEAD_DIM, BLOCK_D, True)
    o = _load_rows(Out + b64 * sob + h64 * soh, offs_m, sot, offs_d, row_ok, HEAD_DIM, BLOCK_D, True)
    stat = bh.to(tl.int64) * T + offs_m
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if HAS_DLSE:  # d lse_t / d s_tj = P_tj: folds into delta
        delta -= tl.load(DLSE + stat, mask=row_ok, other=0.0)
    tl.store(DELTA + stat, delta, mask=row_ok)
    lse2 = tl.load(LSE + stat, mask=row_ok, other=0.0) * 1.4426950408889634
    list_base = LIST + (bh.to(tl.int64) * n_tiles + tile) * NBT
    n_visits = tl.load(COUNT + bh.to(tl.int64) * n_tiles + tile)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i in range(0, n_visits):
        blk = tl.load(list_base + i)
        sees_block = (own == blk) | _picked(bits_rows, row_ok, blk)
        for u in tl.static_range(N_SUB):
            offs_j = u * BLOCK_N + tl.arange(0, BLOCK_N)
            pos = blk * BS + offs_j
            key_ok = (offs_j < BS) & (pos < T)
            k = _load_rows(k_base, pos, skt, offs_d, key_ok, HEAD_DIM, BLOCK_D, True)
            v = _load_rows(v_base, pos, svt, offs_d, key_ok, HEAD_DIM, BLOCK_D, True)
            p = tl.math.exp2(_dot(q, tl.trans(k), None) * qk_scale - lse2[:, None])
            ok = _allowed(offs_m[:, None], pos[None, :], sees_block[:, None], key_ok[None, :], S)
            p = tl.where(ok, p, 0.0)
            ds = p * (_dot(do, tl.trans(v), None) - delta[:, None])
            dq = _dot(ds.to(k.dtype), k, dq)
    dq_ptrs = DQ + b64 * sdqb + h64 * sdqh + offs_m[:, None] * sdqt + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit(do_not_specialize=["T", "NW", "NBT", "n_tiles"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, BITS, LIST_T, COUNT_T,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
    H, T, BS, S, NW, NBT, n_tiles, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    N_SUB: tl.constexpr,
):
    """dK/dV of keys ``[blk*BS + u*BLOCK_N, ...)`` (program ``blk * N_SUB + u``) from the query tiles visiting ``blk``."""
    bh = tl.program_id(0)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    blk = tl.program_id(1) // N_SUB  # block 0 (sinks: visited by every tile) first
    u = tl.program_id(1) % N_SUB
    offs_j = u * BLOCK_N + tl.arange(0, BLOCK_N)
    pos = blk * BS + offs_j
    key_ok = (offs_j < BS) & (pos < T)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b64 * skb + h64 * skh, pos, skt, offs_d, key_ok, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V + b64 * svb + h64 * svh, pos, svt, offs_d, key_ok, HEAD_DIM, BLOCK_D, True)
    q_base = Q + b64 * sqb + h64 * sqh
    do_base = DO + b64 * sdob + h64 * sdoh
    list_base = LIST_T + (bh.to(tl.int64) * NBT + blk) * n_tiles
    n_tiles_visiting = tl.load(COUNT_T + bh.to(tl.int64) * NBT + blk)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i in range(0, n_tiles_visiting):
        tile = tl.load(list_base + i)
        offs_t = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_t < T
        q = _load_rows(q_base, offs_t, sqt, offs_d, row_ok, HEAD_DIM, BLOCK_D, True)
        do = _load_rows(do_base, offs_t, sdot, offs_d, row_ok, HEAD_DIM, BLOCK_D, True)
        stat = bh.to(tl.int64) * T + offs_t
        lse2 = tl.load(LSE + stat, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
        sees_block = (offs_t // BS == blk) | _picked(BITS + stat * NW, row_ok, blk)
        pT = tl.math.exp2(_dot(k, tl.trans(q), None) * qk_scale - lse2[None, :])  # [BLOCK_N, BLOCK_M]
        ok = _allowed(offs_t[None, :], pos[:, None], sees_block[None, :], key_ok[:, None] & row_ok[None, :], S)
        pT = tl.where(ok, pT, 0.0)
        dv = _dot(pT.to(do.dtype), do, dv)
        dsT = pT * (_dot(v, tl.trans(do), None) - delta[None, :])
        dk = _dot(dsT.to(q.dtype), q, dk)
    kd_mask = key_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(DK + b64 * sdkb + h64 * sdkh + pos[:, None] * sdkt + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=kd_mask)
    tl.store(DV + b64 * sdvb + h64 * sdvh + pos[:, None] * sdvt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kd_mask)


# --------------------------------------------------------------------------------------
# decode: select one query's blocks, then the flat decode kernel over the spans
# --------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["NB", "R", "top_k", "N_SPANS", "quest"])
def _decode_select_kernel(
    Q, SUMM, POS, SPANS,
    sqb, sqh, ssb, ssh, ssn, ssr,
    H, NB, R, top_k, BS, S, NSB, N_SPANS, quest,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NB_PAD: tl.constexpr, DK: tl.constexpr,
    PICK_PAD: tl.constexpr, NSB_PAD: tl.constexpr, MAX_IT: tl.constexpr,
):
    """Spans ``[NSB sink blocks | own block | picks]`` (first row, row count) of the rows query ``(b, h)`` sees."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    t = tl.load(POS + b).to(tl.int32)
    own = t // BS
    blocks = tl.arange(0, NB_PAD)
    block_ok = blocks < NB
    s_base = SUMM + b.to(tl.int64) * ssb + h.to(tl.int64) * ssh + blocks[:, None] * ssn  # [NB_PAD, 1]
    acc = tl.zeros([NB_PAD], dtype=tl.float32)
    for d0 in tl.static_range(0, BLOCK_D, DK):
        offs_d = d0 + tl.arange(0, DK)
        d_ok = offs_d < HEAD_DIM
        q = tl.load(Q + b * sqb + h * sqh + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        s_mask = block_ok[:, None] & d_ok[None, :]
        if quest != 0:
            lo = tl.load(s_base + offs_d[None, :], mask=s_mask, other=0.0).to(tl.float32)
            hi = tl.load(s_base + ssr + offs_d[None, :], mask=s_mask, other=0.0).to(tl.float32)
            acc += tl.sum(tl.maximum(q, 0.0) * hi + tl.minimum(q, 0.0) * lo, 1)
        else:
            acc += tl.sum(q * tl.load(s_base + offs_d[None, :], mask=s_mask, other=0.0).to(tl.float32), 1)
    cand = (blocks < own) & block_ok
    sel = tl.reshape(_top_k_select(acc[None, :], cand[None, :], top_k, MAX_IT), (NB_PAD,))
    n_sel = tl.sum(sel.to(tl.int32), 0)
    spans = SPANS + bh.to(tl.int64) * N_SPANS * 2
    # picks, in block order; slots past the picks are empty
    slot = NSB + 1 + tl.cumsum(sel.to(tl.int32), 0) - 1
    tl.store(spans + slot * 2, blocks * BS, mask=sel)
    tl.store(spans + slot * 2 + 1, tl.zeros_like(blocks) + BS, mask=sel)
    picks = tl.arange(0, PICK_PAD)
    empty = (picks >= n_sel) & (picks < N_SPANS - NSB - 1)
    tl.store(spans + (NSB + 1 + picks) * 2, tl.zeros_like(picks), mask=empty)
    tl.store(spans + (NSB + 1 + picks) * 2 + 1, tl.zeros_like(picks), mask=empty)
    # own block, up to (not including) the query's row
    tl.store(spans + NSB * 2, own * BS)
    tl.store(spans + NSB * 2 + 1, tl.maximum(tl.minimum(t, R) - own * BS, 0))
    # sink blocks before the own block and not picked (the others are covered there)
    sb = tl.arange(0, NSB_PAD)
    picked_sb = tl.sum(tl.where(blocks[None, :] == sb[:, None], sel[None, :].to(tl.int32), 0), 1) > 0
    seen = (sb < own) & ~picked_sb
    tl.store(spans + sb * 2, sb * BS, mask=sb < NSB)
    tl.store(spans + sb * 2 + 1, tl.where(seen, tl.minimum(BS, tl.minimum(S, R) - sb * BS), 0), mask=sb < NSB)


# --------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------
# Query tile (the granularity of the visit lists, shared by every attention kernel) and per kernel
# (key tile BLOCK_N, num_warps, num_stages). GPU values are untimed first choices (bench/topk.py times them).
_GPU_TILE_M = {torch.float32: 32, "16bit": 64}
_GPU_CONFIGS = {"fwd": (64, 4, 3), "dq": (64, 4, 2), "dkdv": (64, 4, 2)}
_GPU_CONFIGS_FP32 = {"fwd": (32, 4, 2), "dq": (32, 4, 1), "dkdv": (32, 4, 1)}
_CPU_TILE_M, _CPU_CONFIG = 16, (16, 1, 1)
# "tile_m" -> int, "sel_m" -> int, "fwd"/"dq"/"dkdv" -> (BLOCK_N, warps, stages); tests and bench/topk.py set this.
CONFIG_OVERRIDE: dict = {}


def _tile_m(dtype: torch.dtype) -> int:
    if "tile_m" in CONFIG_OVERRIDE:
        return CONFIG_OVERRIDE["tile_m"]
    if _interpreting():
        return _CPU_TILE_M
    return _GPU_TILE_M[torch.float32 if dtype == torch.float32 else "16bit"]


def _config(kind: str, dtype: torch.dtype, block_size: int) -> tuple[int, int, int]:
    """(BLOCK_N, warps, stages); BLOCK_N shrinks to the block size (at least 16, the smallest dot)."""
    if kind in CONFIG_OVERRIDE:
        block_n, warps, stages = CONFIG_OVERRIDE[kind]
    elif _interpreting():
        block_n, warps, stages = _CPU_CONFIG
    else:
        block_n, warps, stages = (_GPU_CONFIGS_FP32 if dtype == torch.float32 else _GPU_CONFIGS)[kind]
    return max(16, min(block_n, triton.next_power_of_2(block_size))), warps, stages


def _blocks_padded(num_blocks: int) -> int:
    """Score columns per row: a power of two, at least 32 (one bit word)."""
    return max(32, triton.next_power_of_2(max(num_blocks, 1)))


def _selection_geometry(seq_len: int, block_size: int, tile_m: int) -> tuple[int, int, int, int]:
    """(complete blocks NB, all blocks NBT, padded score columns, query tiles)."""
    nbt = triton.cdiv(seq_len, block_size)
    return seq_len // block_size, nbt, _blocks_padded(nbt), triton.cdiv(seq_len, tile_m)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, score: str) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"topk_attention_triton needs q, k, v of one shape [B, H, T, hd], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"topk_attention_triton needs q, k, v in one of bf16, fp16, fp32, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"topk_attention_triton supports head dims up to 256, got {q.shape[-1]}")
    if score not in SCORES:
        raise ValueError(f"topk score={score!r} is invalid: allowed values are {', '.join(SCORES)}")
    if block_size < 1:
        raise ValueError(f"topk block_size={block_size} is invalid: allowed values are >= 1")


def _select(q, k, block_size, top_k, sinks, score, tile_m):
    _check(q, k, k, block_size, score)
    q = _unit_last(q)
    batch, heads, seq_len, head_dim = q.shape
    nb, nbt, nb_pad, n_tiles = _selection_geometry(seq_len, block_size, tile_m)
    bits = torch.empty(batch * heads, seq_len, nb_pad // 32, dtype=torch.int32, device=q.device)
    visits = torch.empty(batch * heads, n_tiles, nbt, dtype=torch.uint8, device=q.device)
    if seq_len == 0:
        return bits, visits
    summaries = TopKPattern(block_size, top_k, score, sinks).summaries(k)  # [B, H, NB, n, hd] (views for ratplus)
    if summaries.shape[2] == 0:  # no complete block: any tensor with the right strides (never read)
        summaries = k.new_zeros(batch, heads, 1, 2, head_dim)
    summaries = _unit_last(summaries)
    if "sel_m" in CONFIG_OVERRIDE:
        sel_m = CONFIG_OVERRIDE["sel_m"]
    else:  # rows of scores held at once
        sel_m = max(16, min(tile_m, _SCORES_PER_PROGRAM // nb_pad))
    warps = 1 if _interpreting() else max(4, min(16, sel_m * nb_pad // 2048))  # 64 score registers a thread
    block_d = max(16, triton.next_power_of_2(head_dim))
    _select_kernel[(batch * heads, n_tiles)](
        q, summaries, bits, visits,
        *q.stride()[:3], summaries.stride(0), summaries.stride(1), summaries.stride(2), summaries.stride(3),
        heads, seq_len, nb, nbt, top_k, block_size, sinks, n_tiles, int(score == "quest"),
        HEAD_DIM=head_dim, BLOCK_D=block_d, TILE_M=tile_m, SEL_M=min(sel_m, tile_m), NB_PAD=nb_pad,
        DK=16, IEEE=q.dtype == torch.float32, MAX_IT=_MAX_BISECTIONS,
        num_warps=warps, num_stages=1,
    )  # fmt: skip
    return bits, visits


def _compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., N]`` 0/1 -> (indices of the ones, first ``count`` valid, ``[..., N]`` int32; counts ``[...]`` int32)."""
    flat = mask.reshape(-1, mask.shape[-1]).contiguous()
    lists = torch.empty(flat.shape, dtype=torch.int32, device=mask.device)
    counts = torch.empty(flat.shape[0], dtype=torch.int32, device=mask.device)
    if flat.numel():
        _compact_kernel[(flat.shape[0],)](flat, lists, counts, flat.shape[1], BLOCK=256 if _interpreting() else 1024,
                                          num_warps=1 if _interpreting() else 4)
    return lists.view(mask.shape), counts.view(mask.shape[:-1])


def _forward(q, k, v, bits, visits, block_size, sinks, scale, tile_m):
    q, k, v = (_unit_last(x) for x in (q, k, v))
    batch, heads, seq_len, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, seq_len, dtype=torch.float32, device=q.device)
    if seq_len == 0:
        return out, lse
    n_tiles, nbt = visits.shape[1:]
    lists, counts = _compact(visits)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n, warps, stages = _config("fwd", q.dtype, block_size)
    _fwd_kernel[(batch * heads, n_tiles)](
        q, k, v, out, lse, bits, lists, counts,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        heads, seq_len, block_size, sinks, bits.shape[-1], nbt, n_tiles, scale * _LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=tile_m, BLOCK_N=block_n, N_SUB=triton.cdiv(block_size, block_n),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out, lse


def _backward(grad_out, grad_lse, q, k, v, out, lse, bits, visits, block_size, sinks, scale, tile_m):
    q, k, v, out, grad_out = (_unit_last(x) for x in (q, k, v, out, grad_out))
    batch, heads, seq_len, head_dim = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if seq_len == 0:
        return dq, dk, dv
    n_tiles, nbt = visits.shape[1:]
    block_d = max(16, triton.next_power_of_2(head_dim))
    qk_scale = scale * _LOG2E
    delta = torch.empty(batch, heads, seq_len, dtype=torch.float32, device=q.device)
    has_dlse = grad_lse is not None
    dlse = grad_lse.float().contiguous() if has_dlse else delta
    nw = bits.shape[-1]

    lists, counts = _compact(visits)
    block_n, warps, stages = _config("dq", q.dtype, block_size)
    _bwd_dq_kernel[(batch * heads, n_tiles)](
        q, k, v, out, grad_out, lse, dlse, delta, dq, bits, lists, counts,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *grad_out.stride()[:3],
        *dq.stride()[:3],
        heads, seq_len, block_size, sinks, nw, nbt, n_tiles, qk_scale, scale,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=tile_m, BLOCK_N=block_n, N_SUB=triton.cdiv(block_size, block_n),
        HAS_DLSE=has_dlse, num_warps=warps, num_stages=stages,
    )  # fmt: skip

    lists_t, counts_t = _compact(visits.transpose(1, 2))  # [B*H, NBT, n_tiles]: the tiles visiting each block
    block_n, warps, stages = _config("dkdv", q.dtype, block_size)
    n_sub = triton.cdiv(block_size, block_n)
    _bwd_dkdv_kernel[(batch * heads, nbt * n_sub)](
        q, k, v, grad_out, lse, delta, dk, dv, bits, lists_t, counts_t,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *dk.stride()[:3],
        *dv.stride()[:3],
        heads, seq_len, block_size, sinks, nw, nbt, n_tiles, qk_scale, scale,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=tile_m, BLOCK_N=block_n, N_SUB=n_sub,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return dq, dk, dv


# --------------------------------------------------------------------------------------
# the custom ops
# --------------------------------------------------------------------------------------
@torch.library.custom_op("ratplus::topk_select", mutates_args=(), device_types=("cuda", "cpu"))
def topk_select_op(
    q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int, sinks: int, score: str, tile_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bits [B*H, T, NW] int32, visits [B*H, ceil(T / tile_m), ceil(T / bs)] uint8)``: the picks of every query."""
    return _select(q, k, block_size, top_k, sinks, score, tile_m)


@topk_select_op.register_fake
def _(q, k, block_size, top_k, sinks, score, tile_m):
    batch, heads, seq_len, _ = q.shape
    _, nbt, nb_pad, n_tiles = _selection_geometry(seq_len, block_size, tile_m)
    return (q.new_empty(batch * heads, seq_len, nb_pad // 32, dtype=torch.int32),
            q.new_empty(batch * heads, n_tiles, nbt, dtype=torch.uint8))


@torch.library.custom_op("ratplus::topk_attention", mutates_args=(), device_types=("cuda", "cpu"))
def topk_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bits: torch.Tensor, visits: torch.Tensor,
    block_size: int, sinks: int, scale: float, tile_m: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B,H,T,hd], lse [B,H,T] fp32, natural log)`` under the picks of ``topk_select`` (same ``tile_m``)."""
    return _forward(q, k, v, bits, visits, block_size, sinks, scale, tile_m)


@topk_attention_op.register_fake
def _(q, k, v, bits, visits, block_size, sinks, scale, tile_m):
    batch, heads, seq_len, _ = q.shape
    return torch.empty_like(q), q.new_empty(batch, heads, seq_len, dtype=torch.float32)


@torch.library.custom_op("ratplus::topk_attention_backward", mutates_args=(), device_types=("cuda", "cpu"))
def topk_attention_backward_op(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, bits: torch.Tensor, visits: torch.Tensor, block_size: int, sinks: int,
    scale: float, tile_m: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_out, grad_lse, q, k, v, out, lse, bits, visits, block_size, sinks, scale, tile_m)


@topk_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, bits, visits, block_size, sinks, scale, tile_m):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, bits, visits, block_size, sinks, scale, tile_m = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bits, visits)
    ctx.args = (block_size, sinks, scale, tile_m)


def _backward_formula(ctx, grad_out, grad_lse):
    q, k, v, out, lse, bits, visits = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = topk_attention_backward_op(grad_out, grad_lse, q, k, v, out, lse, bits, visits, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


topk_attention_op.register_autograd(_backward_formula, setup_context=_setup_context)


def topk_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: TopKPattern, scale: float | None = None
) -> torch.Tensor:
    """``[B, H, T, hd]`` top-k block attention (Triton; patterns that cover every key go to SDPA)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if pattern.covers_all(q.shape[-2]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    tile_m = _tile_m(q.dtype)
    bits, visits = torch.ops.ratplus.topk_select(
        q.detach(), k.detach(), pattern.block_size, pattern.top_k, pattern.sinks, pattern.score, tile_m
    )
    out, _ = torch.ops.ratplus.topk_attention(q, k, v, bits, visits, pattern.block_size, pattern.sinks, scale, tile_m)
    return out


@torch.library.custom_op("ratplus::topk_decode_attention", mutates_args=(), device_types=("cuda", "cpu"))
def topk_decode_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, summaries: torch.Tensor, pos: torch.Tensor,
    k_new: torch.Tensor, v_new: torch.Tensor, block_size: int, top_k: int, sinks: int, score: str, scale: float,
) -> torch.Tensor:
    from ratplus_titan.kernels import decode_triton

    batch, heads, rows, head_dim = k_cache.shape
    num_blocks = summaries.shape[2]
    config = decode_triton.CONFIG
    sink_blocks = triton.cdiv(min(sinks, rows), block_size)
    picks = min(top_k, num_blocks)
    n_spans = sink_blocks + 1 + picks
    spans = torch.empty(batch * heads, n_spans, 2, dtype=torch.int32, device=q.device)
    summaries = _unit_last(summaries) if num_blocks else k_cache.new_zeros(batch, heads, 1, 2, head_dim)
    nb_pad = _blocks_padded(num_blocks)
    _decode_select_kernel[(batch * heads,)](
        q, summaries, pos, spans,
        q.stride(0), q.stride(1), summaries.stride(0), summaries.stride(1), summaries.stride(2), summaries.stride(3),
        heads, num_blocks, rows, top_k, block_size, sinks, sink_blocks, n_spans, int(score == "quest"),
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), NB_PAD=nb_pad, DK=16,
        PICK_PAD=triton.next_power_of_2(max(picks, 1)), NSB_PAD=triton.next_power_of_2(max(sink_blocks, 1)),
        MAX_IT=_MAX_BISECTIONS,
        num_warps=1 if _interpreting() else max(4, min(16, nb_pad // 128)),
    )  # fmt: skip
    nsub = triton.cdiv(block_size, config.flat_block_n)
    return decode_triton._flat_forward(q, k_cache, v_cache, spans, k_new, v_new, scale, config, nsub=nsub)


@topk_decode_op.register_fake
def _(q, k_cache, v_cache, summaries, pos, k_new, v_new, block_size, top_k, sinks, score, scale):
    return torch.empty_like(q)


def topk_decode_attention_triton(
    pattern: TopKPattern,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    summaries: torch.Tensor,
    pos: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """``topk_attention.topk_decode_attention``'s contract in two launches (selection, flat decode over spans)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        if t.stride(-1) != 1:
            raise ValueError(f"topk_decode_attention_triton: {name} needs a unit stride on its last dim")
    return torch.ops.ratplus.topk_decode_attention(
        q, k_cache, v_cache, summaries, pos, k_new, v_new,
        pattern.block_size, pattern.top_k, pattern.sinks, pattern.score, scale,
    )  # fmt: skip


__all__ = ["topk_attention_triton", "topk_decode_attention_triton", "CONFIG_OVERRIDE"]
