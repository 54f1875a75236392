"""Triton prefill of top-k block attention: forward and backward, each key block computed only for the
queries that picked it.

The pairs (query ``t``, key ``j``) the reference allows fall into three disjoint parts:

- **own**: ``j`` in ``t``'s block, ``j <= t``;
- **sinks**: ``j < S``, ``j <= t``, ``j`` outside ``t``'s block;
- **picked**: ``j`` in a block ``t`` picked, ``j >= S`` (sinks there are the sink part's).

Own + sinks is a local window every query needs: it runs query-major (a tile of ``BLOCK_M`` queries over
its sink blocks, then its own blocks). The picked part runs key-block-major over the pair lists of
``topk_select_triton.select_prefill``: the program of key block ``b`` gathers, ``BLOCK_G`` at a time, the
queries that picked ``b`` and computes them against ``b``'s keys with tensor-core dots. No program
computes a (query, key block) pair outside the mask, apart from the padding of the last gathered tile
of each block and the causal triangle of the own blocks (``bench/topk.py`` reports the work ratio).

**Forward** (exact, one pass over the picked pairs, fp32 statistics). Softmax needs each query's max over every
key it sees before its terms can be summed; the picked blocks are spread over many programs, so the max is not
known when they run. Instead each query's terms are scaled by a *reference* max, the local part's:

1. ``_local_fwd_kernel``: own + sinks by an online softmax: ``out32 = sum p v``, ``l32 = sum p`` with
   ``p = 2^(s - ref)``, ``ref`` the local max (log2 units), stored. The local part is never empty (the diagonal).
2. ``_pair_fwd_kernel``: each picked pair's ``p = 2^(s - ref)``; ``p @ V`` into ``out32`` and ``rowsum(p)`` into
   ``l32`` by fp32 atomic adds. Exact whatever ``ref`` is, as long as no ``p`` overflows: a tile whose scores
   exceed their reference by more than ``_OVERFLOW_LIMIT`` (32, i.e. ``p`` up to 2^32: the sums stay finite for
   values below 2^69 over up to 2^27 keys) sets a device flag.
3. The redo, three launches whose programs return at once unless the flag is set (no host sync): a max pass
   (``ref = max(ref, max s)`` over the picked pairs, atomic max), the local kernel again and the pair pass
   again, both against that true max (``p <= 1``). Real attention rarely sees a picked key 22 nats above every
   local one; inputs that do pay about twice the forward.
4. ``_finish_fwd_kernel``: ``out = out32 / l32`` and ``lse = ref + log2 l32``.

The order of the atomic adds varies from run to run: the forward output is exact to fp32 rounding but **not
bitwise deterministic**. (Earlier versions ran two passes, the first storing every pair's log-sum-exp: at
T=64K that pass took 7.9 of 72 ms on an H100, ``bench/results/topk_H100.json``.)

Deterministic alternative considered: per-(query, pick) partial outputs ``[T, top_k, hd]`` merged
query-major. At T=64K, top_k=64, hd=128: 2 GiB fp32 per (batch, head), 32 GiB for 16 heads. Per (pair,
channel) the dots do 256 flops (64 keys x 2 matmuls x 2); writing and reading an fp32 partial moves 8 bytes
of HBM traffic (32 flops/byte; 64 in bf16), where an H100 needs ~200-300 flops/byte to stay compute-bound
(~700-990 TFLOP/s over 3.35 TB/s): memory-bound by 3-9x, so not used. The atomics move 4 bytes per (pair,
channel) too (8.6e9 fp32 adds, 34 GB, at T=64K with 16 heads), but into L2: the grid runs one head's key
blocks together, so that the head's ``out32`` slice (T x hd x 4 = 32 MB at 64K) stays in the 50 MB L2.
dQ in the backward has the same traffic.

**Backward** (gradients of softmax attention under the fixed mask; ``delta = rowsum(dO * O) - dLSE``):

1. ``_local_dq_kernel``: per query tile, ``delta`` and the own + sink part of dQ into ``dq32`` (fp32).
2. ``_sink_dkdv_kernel``: dK/dV of the sink keys from the sink pairs, per split of the queries (``SPLIT``
   rows each) into fp32 partials ``[B*H, splits, S_ROWS, hd]`` (no program loops over all T queries).
3. ``_key_block_bwd_kernel``: per key block, dK/dV from its own queries (contiguous) and from the gathered
   queries that picked it, plus the sink partials in split order, cast once (deterministic); the picked
   pairs' dQ goes into ``dq32`` by fp32 atomic adds (**not bitwise deterministic**).

**Memory** beyond q, k, v (B=1, H=16, T=64K, hd=128, block 64, top_k=64 so P ~ 4.1M pairs per head): pair
lists ``[B*H, P]`` int32 260 MB (saved for backward with ``starts``), selection bits ``[B*H, T, 32]`` int32
128 MB, per-(block, chunk) counts and offsets 3 x 64 MB (transient), ``out32`` / ``dq32`` ``[B*H, T, hd]`` fp32
512 MB each (transient).

Block sizes and warps (``topk_attention_triton._config``) are first choices, untimed on a GPU. Key blocks
are not equally loaded: early blocks are picked by many more queries (for iid inputs at T=16K the busiest
block has ~10x the mean), so the grid runs low block indices first; splitting the busiest blocks over
several programs is the next step if the GPU shows a tail.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ratplus_titan.kernels.pattern_attention_triton import _LOG2E, _dot, _dq_row_stats, _load_rows


# --------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------
@triton.jit
def _local_ok(t, j, key_ok, BS, S):
    """Own + sink part of the mask: ``j <= t`` and ``j`` in ``t``'s block or a sink."""
    return key_ok & (j <= t) & ((j // BS == t // BS) | (j < S))


@triton.jit
def _local_block(i, m0, m_last, BS, S):
    """Block ``i`` of a query tile's local visits: sink blocks before its own blocks, then its own blocks."""
    first_own = m0 // BS
    n_sink = tl.minimum(tl.cdiv(S, BS), first_own)
    blk = tl.where(i < n_sink, i, first_own + i - n_sink)
    return blk, n_sink + m_last // BS - first_own + 1


@triton.jit
def _query_tile(Q, K, V, sqb, sqh, sqt, skb, skh, svb, svh, H, T,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """Program ``(bh, tile)`` of a query-major kernel: its (batch, head) offsets, rows, q rows, k and v bases."""
    bh = tl.program_id(0)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    m0 = tl.program_id(1) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    q = _load_rows(Q + b64 * sqb + h64 * sqh, offs_m, sqt, offs_d, row_ok, HEAD_DIM, BLOCK_D, True)
    return b64, h64, m0, offs_m, offs_d, row_ok, q, K + b64 * skb + h64 * skh, V + b64 * svb + h64 * svh


@triton.jit
def _local_keys(k_base, v_base, skt, svt, offs_m, offs_d, i, u, m0, T, BS, S,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Sub-tile ``u`` of local visit ``i`` of the query tile at ``m0``: keys, values, own + sink mask ``[M, N]``."""
    blk, _ = _local_block(i, m0, tl.minimum(m0 + BLOCK_M, T) - 1, BS, S)
    offs_j = u * BLOCK_N + tl.arange(0, BLOCK_N)
    pos = blk * BS + offs_j
    key_ok = (offs_j < BS) & (pos < T)
    k = _load_rows(k_base, pos, skt, offs_d, key_ok, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(v_base, pos, svt, offs_d, key_ok, HEAD_DIM, BLOCK_D, True)
    return k, v, _local_ok(offs_m[:, None], pos[None, :], key_ok[None, :], BS, S)


@triton.jit
def _pair_rows(pairs_base, c0, end, BLOCK_G: tl.constexpr):
    """Queries and validity of gathered pairs ``[c0, c0 + BLOCK_G)`` (of ``[.., end)``)."""
    idx = c0 + tl.arange(0, BLOCK_G)
    ok = idx < end
    return tl.load(pairs_base + idx, mask=ok, other=0), ok


@triton.jit
def _key_tile(pid, BS, BLOCK_N: tl.constexpr, N_SUB: tl.constexpr):
    """Block, key positions and in-block validity of program ``pid`` (sub-tile ``pid % N_SUB`` of its block)."""
    blk = pid // N_SUB
    offs_j = (pid % N_SUB) * BLOCK_N + tl.arange(0, BLOCK_N)
    return blk, blk * BS + offs_j, offs_j < BS


@triton.jit
def _dkdv_rows(dk, dv, k, v, q, do, lse2, delta, ok, qk_scale):
    """dK/dV (unscaled dK) of keys ``k, v [N, hd]`` from queries ``q, do [M, hd]`` under ``ok [N, M]``; and dS^T."""
    pT = tl.where(ok, tl.math.exp2(_dot(k, tl.trans(q), None) * qk_scale - lse2[None, :]), 0.0)  # [N, M]
    dv = _dot(pT.to(do.dtype), do, dv)
    dsT = pT * (_dot(v, tl.trans(do), None) - delta[None, :])
    dk = _dot(dsT.to(q.dtype), q, dk)
    return dk, dv, dsT


# --------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------
_OVERFLOW_LIMIT = 32.0  # log2 units: a picked score this far above its query's reference max redoes the forward


@triton.jit
def _skip(FLAG, GATED: tl.constexpr):
    """Whether a program of a redo launch (``GATED``) has nothing to do: no tile overflowed."""
    if GATED:
        return tl.load(FLAG) == 0
    return False


@triton.jit(do_not_specialize=["T", "NB", "P"])
def _pair_fwd_kernel(
    Q, K, V, PAIRS, STARTS, REF, OUT32, L32, FLAG,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
    H, T, NB, BS, S, P, qk_scale, limit,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    N_SUB: tl.constexpr, MAX_PASS: tl.constexpr, GATED: tl.constexpr,
):
    """The queries that picked the block against its keys of this sub-tile, ``BLOCK_G`` gathered rows at a time.

    Accumulating (``MAX_PASS`` false): ``p = 2^(s - ref)`` against each query's reference max ``REF`` (log2 units),
    ``OUT32 [B*H, T, hd] += p @ V`` and ``L32 [B*H, T] += rowsum(p)`` by fp32 atomics; a tile with a score more
    than ``limit`` above its reference sets ``FLAG``. ``MAX_PASS``: ``REF = max(REF, rowmax(s))`` (atomic max).
    ``GATED``: the program returns at once unless ``FLAG`` is set (the redo launches).
    """
    if _skip(FLAG, GATED):
        return
    bh = tl.program_id(1)  # grid (key tiles, B*H): one head's blocks run together (its out32 / dq32 stay in L2)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    bh64 = bh.to(tl.int64)
    blk, pos, in_block = _key_tile(tl.program_id(0), BS, BLOCK_N, N_SUB)
    key_ok = in_block & (pos >= S)  # sinks in a picked block belong to the local part
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b64 * skb + h64 * skh, pos, skt, offs_d, in_block, HEAD_DIM, BLOCK_D, True)
    if not MAX_PASS:
        v = _load_rows(V + b64 * svb + h64 * svh, pos, svt, offs_d, in_block, HEAD_DIM, BLOCK_D, True)
    q_base = Q + b64 * sqb + h64 * sqh
    start = tl.load(STARTS + bh64 * (NB + 1) + blk)
    end = tl.load(STARTS + bh64 * (NB + 1) + blk + 1)
    for c0 in range(start, end, BLOCK_G):
        t, ok = _pair_rows(PAIRS + bh64 * P, c0, end, BLOCK_G)
        q = _load_rows(q_base, t, sqt, offs_d, ok, HEAD_DIM, BLOCK_D, True)
        s = tl.where(key_ok[None, :], _dot(q, tl.trans(k), None) * qk_scale, float("-inf"))  # [G, N], log2 units
        stat = bh64 * T + t
        row_max = tl.max(s, 1)  # -inf for a sub-tile of sinks only
        if MAX_PASS:
            tl.atomic_max(REF + stat, row_max, mask=ok & (row_max > float("-inf")), sem="relaxed")
        else:
            ref = tl.load(REF + stat, mask=ok, other=0.0)
            p = tl.where(ok[:, None], tl.math.exp2(s - ref[:, None]), 0.0)
            tl.atomic_add(OUT32 + stat[:, None] * HEAD_DIM + offs_d[None, :], _dot(p.to(v.dtype), v, None),
                          mask=ok[:, None] & (offs_d < HEAD_DIM)[None, :], sem="relaxed")
            tl.atomic_add(L32 + stat, tl.sum(p, 1), mask=ok, sem="relaxed")
            if not GATED:
                above = tl.max(tl.where(ok, row_max - ref, float("-inf")), 0)
                if above > limit:
                    tl.atomic_max(FLAG, 1, sem="relaxed")


@triton.jit(do_not_specialize=["T"])
def _local_fwd_kernel(
    Q, K, V, OUT32, L32, REF, FLAG,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
    H, T, BS, S, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    N_SUB: tl.constexpr, GATED: tl.constexpr,
):
    """Own + sinks of a query tile: ``OUT32 = sum p v``, ``L32 = sum p`` with ``p = 2^(s - ref)``, unnormalized.

    First launch: ``ref`` is the running max (online softmax), stored into ``REF`` (log2 units). ``GATED`` (the
    redo, only when ``FLAG`` is set): ``ref`` is read from ``REF`` (by then the max over every allowed key)."""
    if _skip(FLAG, GATED):
        return
    _, _, m0, offs_m, offs_d, row_ok, q, k_base, v_base = _query_tile(Q, K, V, sqb, sqh, sqt, skb, skh, svb, svh, H, T,
                                                                     HEAD_DIM, BLOCK_D, BLOCK_M)
    stat = tl.program_id(0).to(tl.int64) * T + offs_m
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if GATED:
        m_i = tl.load(REF + stat, mask=row_ok, other=0.0)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    _, n_visits = _local_block(0, m0, tl.minimum(m0 + BLOCK_M, T) - 1, BS, S)
    for i in range(0, n_visits):
        for u in tl.static_range(N_SUB):
            k, v, ok = _local_keys(k_base, v_base, skt, svt, offs_m, offs_d, i, u, m0, T, BS, S, HEAD_DIM, BLOCK_D,
                                   BLOCK_M, BLOCK_N)
            qk = tl.where(ok, _dot(q, tl.trans(k), None) * qk_scale, float("-inf"))
            if GATED:  # against the fixed true max: p <= 1
                p = tl.math.exp2(qk - m_i[:, None])
                l_i += tl.sum(p, 1)
                acc = _dot(p.to(v.dtype), v, acc)
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: keep exp2 finite
                p = tl.math.exp2(qk - m_use[:, None])
                alpha = tl.math.exp2(m_i - m_use)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = _dot(p.to(v.dtype), v, acc * alpha[:, None])
                m_i = m_new
    d_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(OUT32 + stat[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=d_mask)
    tl.store(L32 + stat, l_i, mask=row_ok)
    if not GATED:  # the local part is never empty for a real row (it holds the diagonal)
        tl.store(REF + stat, m_i, mask=row_ok)


@triton.jit(do_not_specialize=["T"])
def _finish_fwd_kernel(
    OUT32, L32, REF, Out, LSE, sob, soh, sot, H, T,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """``out = OUT32 / L32`` in the output dtype and ``lse = (ref + log2 L32) ln 2`` (natural) of a query tile."""
    bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    d_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    stat = bh.to(tl.int64) * T + offs_m
    total = tl.load(L32 + stat, mask=row_ok, other=1.0)
    acc = tl.load(OUT32 + stat[:, None] * HEAD_DIM + offs_d[None, :], mask=d_mask, other=0.0)
    out_base = Out + (bh // H).to(tl.int64) * sob + (bh % H).to(tl.int64) * soh
    tl.store(out_base + offs_m[:, None] * sot + offs_d[None, :], (acc / total[:, None]).to(Out.dtype.element_ty),
             mask=d_mask)
    lse2 = tl.load(REF + stat, mask=row_ok, other=0.0) + tl.math.log2(total)
    tl.store(LSE + stat, lse2 * 0.6931471805599453, mask=row_ok)


# --------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T"])
def _local_dq_kernel(
    Q, K, V, Out, DO, LSE, DLSE, DELTA, DQ32,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sdob, sdoh, sdot,
    H, T, BS, S, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    N_SUB: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """``delta`` and the own + sink part of dQ of a query tile (``dq32``, fp32, scaled)."""
    b64, h64, m0, offs_m, offs_d, row_ok, q, k_base, v_base = _query_tile(Q, K, V, sqb, sqh, sqt, skb, skh, svb, svh,
                                                                         H, T, HEAD_DIM, BLOCK_D, BLOCK_M)
    stat = tl.program_id(0).to(tl.int64) * T + offs_m
    do, delta, lse2 = _dq_row_stats(DO + b64 * sdob + h64 * sdoh, Out + b64 * sob + h64 * soh, LSE, DLSE, DELTA,
                                    sdot, sot, stat, offs_m, offs_d, row_ok, HEAD_DIM, BLOCK_D, HAS_DLSE)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    _, n_visits = _local_block(0, m0, tl.minimum(m0 + BLOCK_M, T) - 1, BS, S)
    for i in range(0, n_visits):
        for u in tl.static_range(N_SUB):
            k, v, ok = _local_keys(k_base, v_base, skt, svt, offs_m, offs_d, i, u, m0, T, BS, S, HEAD_DIM, BLOCK_D,
                                   BLOCK_M, BLOCK_N)
            p = tl.where(ok, tl.math.exp2(_dot(q, tl.trans(k), None) * qk_scale - lse2[:, None]), 0.0)
            ds = p * (_dot(do, tl.trans(v), None) - delta[:, None])
            dq = _dot(ds.to(k.dtype), k, dq)
    tl.store(DQ32 + stat[:, None] * HEAD_DIM + offs_d[None, :], dq * scale,
             mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit(do_not_specialize=["T", "SPLIT", "n_splits", "S_ROWS"])
def _sink_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DKS, DVS,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot,
    H, T, BS, S, SPLIT, n_splits, S_ROWS, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK (unscaled) / dV partials of sink keys ``[n*BLOCK_N, ..)`` from the sink pairs of queries of one split."""
    bh = tl.program_id(0)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    split = tl.program_id(1)
    pos = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = (pos < S) & (pos < T)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b64 * skb + h64 * skh, pos, skt, offs_d, key_ok, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V + b64 * svb + h64 * svh, pos, svt, offs_d, key_ok, HEAD_DIM, BLOCK_D, True)
    q_base = Q + b64 * sqb + h64 * sqh
    do_base = DO + b64 * sdob + h64 * sdoh
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # queries of this split that see a sink outside their own block: from the end of block 0 on
    lo = tl.maximum(split * SPLIT, BS)
    hi = tl.minimum(split * SPLIT + SPLIT, T)
    for m0 in range(lo, hi, BLOCK_M):
        offs_t = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_t < hi
        q = _load_rows(q_base, offs_t, sqt, offs_d, row_ok, HEAD_DIM, BLOCK_D, True)
        do = _load_rows(do_base, offs_t, sdot, offs_d, row_ok, HEAD_DIM, BLOCK_D, True)
        stat = bh.to(tl.int64) * T + offs_t
        lse2 = tl.load(LSE + stat, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
        t, j = offs_t[None, :], pos[:, None]
        ok = key_ok[:, None] & row_ok[None, :] & (j <= t) & (j // BS != t // BS)
        dk, dv, _ = _dkdv_rows(dk, dv, k, v, q, do, lse2, delta, ok, qk_scale)
    part = ((bh.to(tl.int64) * n_splits + split) * S_ROWS + pos[:, None]) * HEAD_DIM + offs_d[None, :]
    mask = (pos < S_ROWS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(DKS + part, dk, mask=mask)
    tl.store(DVS + part, dv, mask=mask)


@triton.jit(do_not_specialize=["T", "NB", "P", "n_splits", "S_ROWS"])
def _key_block_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ32, DKS, DVS, PAIRS, STARTS,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
    H, T, NB, BS, S, P, n_splits, S_ROWS, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    N_SUB: tl.constexpr,
):
    """dK/dV of one key sub-tile: own queries, gathered picking queries (their dQ by atomics), sink partials."""
    bh = tl.program_id(1)  # grid (key tiles, B*H): one head's blocks run together (its out32 / dq32 stay in L2)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    bh64 = bh.to(tl.int64)
    blk, pos, in_block = _key_tile(tl.program_id(0), BS, BLOCK_N, N_SUB)
    in_block = in_block & (pos < T)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k = _load_rows(K + b64 * skb + h64 * skh, pos, skt, offs_d, in_block, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V + b64 * svb + h64 * svh, pos, svt, offs_d, in_block, HEAD_DIM, BLOCK_D, True)
    q_base = Q + b64 * sqb + h64 * sqh
    do_base = DO + b64 * sdob + h64 * sdoh
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # own part: the block's queries, contiguous
    t_hi = tl.minimum(blk * BS + BS, T)
    for m0 in range(blk * BS, t_hi, BLOCK_M):
        offs_t = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_t < t_hi
        q = _load_rows(q_base, offs_t, sqt, offs_d, row_ok, HEAD_DIM, BLOCK_D, True)
        do = _load_rows(do_base, offs_t, sdot, offs_d, row_ok, HEAD_DIM, BLOCK_D, True)
        stat = bh64 * T + offs_t
        lse2 = tl.load(LSE + stat, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
        ok = in_block[:, None] & row_ok[None, :] & (pos[:, None] <= offs_t[None, :])
        dk, dv, _ = _dkdv_rows(dk, dv, k, v, q, do, lse2, delta, ok, qk_scale)
    # picked part: the queries that picked the block (complete blocks only), gathered
    complete = blk < NB
    start = tl.load(STARTS + bh64 * (NB + 1) + blk, mask=complete, other=0)
    end = tl.load(STARTS + bh64 * (NB + 1) + blk + 1, mask=complete, other=0)
    key_ok = in_block & (pos >= S)
    for c0 in range(start, end, BLOCK_M):
        t, ok = _pair_rows(PAIRS + bh64 * P, c0, end, BLOCK_M)
        q = _load_rows(q_base, t, sqt, offs_d, ok, HEAD_DIM, BLOCK_D, True)
        do = _load_rows(do_base, t, sdot, offs_d, ok, HEAD_DIM, BLOCK_D, True)
        lse2 = tl.load(LSE + bh64 * T + t, mask=ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + bh64 * T + t, mask=ok, other=0.0)
        dk, dv, dsT = _dkdv_rows(dk, dv, k, v, q, do, lse2, delta, key_ok[:, None] & ok[None, :], qk_scale)
        dq = _dot(tl.trans(dsT).to(k.dtype), k, None) * scale  # [G, BLOCK_D]
        tl.atomic_add(DQ32 + (bh64 * T + t)[:, None] * HEAD_DIM + offs_d[None, :], dq,
                      mask=ok[:, None] & d_ok[None, :], sem="relaxed")
    # sink part: the split partials, in split order
    sink = in_block & (pos < S_ROWS)
    for split in range(0, tl.where(blk * BS < S_ROWS, n_splits, 0)):
        part = ((bh64 * n_splits + split) * S_ROWS + pos[:, None]) * HEAD_DIM + offs_d[None, :]
        dk += tl.load(DKS + part, mask=sink[:, None] & d_ok[None, :], other=0.0)
        dv += tl.load(DVS + part, mask=sink[:, None] & d_ok[None, :], other=0.0)
    kd_mask = in_block[:, None] & d_ok[None, :]
    tl.store(DK + b64 * sdkb + h64 * sdkh + pos[:, None] * sdkt + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=kd_mask)
    tl.store(DV + b64 * sdvb + h64 * sdvh + pos[:, None] * sdvt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kd_mask)


# --------------------------------------------------------------------------------------
# launches
# --------------------------------------------------------------------------------------
def _strides(*tensors: torch.Tensor) -> list[int]:
    """(batch, head, row) strides of each ``[B, H, T, hd]`` tensor, in order."""
    return [s for x in tensors for s in x.stride()[:3]]


def prefill_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pairs: torch.Tensor, starts: torch.Tensor,
    block_size: int, sinks: int, scale: float, config: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, T, hd] in q's dtype, lse [B, H, T] fp32)``; ``config``: ``topk_attention_triton._config``."""
    batch, heads, seq_len, head_dim = q.shape
    nb = starts.shape[1] - 1
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, warps, stages = (config[n] for n in ("tile_m", "block_n", "warps", "stages"))
    n_sub = triton.cdiv(block_size, block_n)
    dims = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n, N_SUB=n_sub, num_warps=warps, num_stages=stages)
    qk_scale = scale * _LOG2E
    out32 = torch.empty(batch, heads, seq_len, head_dim, dtype=torch.float32, device=q.device)
    l32 = torch.empty(batch, heads, seq_len, dtype=torch.float32, device=q.device)
    ref = torch.empty_like(l32)  # each query's reference max, log2 units
    flag = torch.zeros(1, dtype=torch.int32, device=q.device)  # set when a picked score overflows its reference
    local_grid = (batch * heads, triton.cdiv(seq_len, block_m))
    pair_grid = (nb * n_sub, batch * heads)
    pair_args = (q, k, v, pairs, starts, ref, out32, l32, flag, *_strides(q, k, v), heads, seq_len, nb, block_size,
                 sinks, pairs.shape[1], qk_scale, _OVERFLOW_LIMIT)
    local_args = (q, k, v, out32, l32, ref, flag, *_strides(q, k, v), heads, seq_len, block_size, sinks, qk_scale)
    _local_fwd_kernel[local_grid](*local_args, BLOCK_M=block_m, GATED=False, **dims)
    if pairs.shape[1] > 0:
        _pair_fwd_kernel[pair_grid](*pair_args, BLOCK_G=block_m, MAX_PASS=False, GATED=False, **dims)
        # the redo, on the device: each program returns at once unless the flag is set
        _pair_fwd_kernel[pair_grid](*pair_args, BLOCK_G=block_m, MAX_PASS=True, GATED=True, **dims)
        _local_fwd_kernel[local_grid](*local_args, BLOCK_M=block_m, GATED=True, **dims)
        _pair_fwd_kernel[pair_grid](*pair_args, BLOCK_G=block_m, MAX_PASS=False, GATED=True, **dims)
    out = torch.empty_like(q)
    lse = torch.empty_like(l32)
    _finish_fwd_kernel[local_grid](out32, l32, ref, out, lse, *out.stride()[:3], heads, seq_len, HEAD_DIM=head_dim,
                                   BLOCK_D=block_d, BLOCK_M=block_m, num_warps=warps)
    return out, lse


def prefill_backward(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, pairs: torch.Tensor, starts: torch.Tensor,
    block_size: int, sinks: int, scale: float, config: dict,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of the forward under the same pairs."""
    batch, heads, seq_len, head_dim = q.shape
    nb, nbt = starts.shape[1] - 1, triton.cdiv(seq_len, block_size)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, warps, stages = (config[n] for n in ("tile_m", "block_n", "warps", "stages"))
    n_sub = triton.cdiv(block_size, block_n)
    dims = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
                num_stages=stages)
    qk_scale = scale * _LOG2E
    dq32 = torch.empty(batch, heads, seq_len, head_dim, dtype=torch.float32, device=q.device)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty(batch, heads, seq_len, dtype=torch.float32, device=q.device)
    has_dlse = grad_lse is not None
    dlse = grad_lse.float().contiguous() if has_dlse else delta
    _local_dq_kernel[(batch * heads, triton.cdiv(seq_len, block_m))](
        q, k, v, out, grad_out, lse, dlse, delta, dq32, *_strides(q, k, v, out, grad_out),
        heads, seq_len, block_size, sinks, qk_scale, scale, N_SUB=n_sub, HAS_DLSE=has_dlse, **dims,
    )  # fmt: skip
    s_rows = min(sinks, seq_len)  # sink keys that exist
    split = config["split"]
    n_splits = triton.cdiv(seq_len, split) if s_rows else 0
    sink_dk = torch.empty(batch * heads, n_splits, s_rows, head_dim, dtype=torch.float32, device=q.device)
    sink_dv = torch.empty_like(sink_dk)
    if n_splits:
        _sink_dkdv_kernel[(batch * heads, n_splits, triton.cdiv(s_rows, block_n))](
            q, k, v, grad_out, lse, delta, sink_dk, sink_dv, *_strides(q, k, v, grad_out),
            heads, seq_len, block_size, sinks, split, n_splits, s_rows, qk_scale, **dims,
        )  # fmt: skip
    _key_block_bwd_kernel[(nbt * n_sub, batch * heads)](
        q, k, v, grad_out, lse, delta, dk, dv, dq32, sink_dk, sink_dv, pairs, starts,
        *_strides(q, k, v, grad_out, dk, dv),
        heads, seq_len, nb, block_size, sinks, pairs.shape[1], n_splits, s_rows, qk_scale, scale,
        N_SUB=n_sub, **dims,
    )  # fmt: skip
    return dq32.to(q.dtype), dk, dv
