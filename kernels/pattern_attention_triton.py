"""Triton kernels for softmax attention under a RAT+ pattern (DESIGN §2), forward and backward.

Shapes: ``q, k, v`` are ``[B, H, T, hd]`` of one shape (no GQA), ``hd <= 256``, any strides
with a unit last stride; the output is ``[B, H, T, hd]`` in the input dtype. Softmax statistics
and accumulators are fp32; ``tl.dot`` takes bf16/fp16 operands as they are and fp32 operands as
IEEE fp32 (``input_precision="ieee"``, never tf32: PyTorch's default for fp32 matmuls, and what the
top-k selection needs to pick the reference's blocks; bf16 is the fast path). Relative error norms
against float64 seen on an H100 (bench/results/attention_H100.json): bf16 ~2e-3 (out and grads),
fp16 ~3e-4; fp32 with the earlier tf32 dots 1.3e-3 out, 2e-3 grads, 1.5e-4 lse; exact fp32 under
``TRITON_INTERPRET=1``.

Every (query ``t``, key ``j``) pair the pattern allows belongs to exactly one of three
parts, the same split as ``Pattern.local_allows`` / ``Pattern.compact_allows``:

- **compact** (dilated rows beyond the window): ``j = r*D + D-1``, ``j >= S``, ``j < t - W``;
  read straight from ``k``/``v`` with a row stride of ``D`` rows (no gathered copy);
- **sinks**: ``j < S``, ``j <= t``;
- **local**: ``t - W <= j <= t``, ``j >= S``.

Forward: one program per query block streams the compact rows, then the sinks, then the
local window through ONE online softmax (exp2 domain) and writes ``out`` and the
log-sum-exp. Key blocks that the query block cannot see are never visited; blocks that it
sees entirely run without a mask.

Backward (FA2 style, deterministic, no atomics). dQ takes the forward's three parts; dK/dV split the
pairs by distance instead, so that no program loops over all T queries for a few keys:

- **far**: ``t > j + W`` for the sinks and the dilated positions ``>= S`` (the *far rows*: the sinks
  ``0..S-1``, then the compact rows; ``_far_position``);
- **near**: ``0 <= t - j <= W``, every position.

1. ``_bwd_dq_kernel``: per query block, ``delta = rowsum(dO * O) - dLSE`` (fused, stored for
   step 2-3) and ``dQ`` over the same three parts as the forward.
2. ``_bwd_far_kernel``: per block of far rows and per *split* of the query range (split ``s`` takes
   the queries ``[s * L, (s + 1) * L)``), ``dK``/``dV`` into an fp32 ``[splits, B*H, far rows, hd]``
   buffer. Without splits one program would loop over all ``T / BLOCK_M`` query tiles (at T=16K: 252
   serial tiles on a grid of 32-128 programs for 132 SMs); ``far_split_len`` picks ``L`` for about
   ``FAR_WAVES`` programs per SM (kernels/NOTES_pattern_attention.md counts it).
3. ``_far_sum_kernel``: the partials of each far row summed in split order, into ``[B*H, far rows, hd]``
   (skipped with one split). Summing them inside the near kernel, split by split, made every block of
   positions loop over all splits for its few far rows: at T=16K that loop cost 0.3-0.5 ms of the near
   kernel (kernels/NOTES_pattern_attention.md).
4. ``_bwd_near_kernel``: per block of positions, ``dK``/``dV`` from the queries within ``W``; for far
   positions it adds the summed partial before the one final cast, so each pair is counted once, each
   gradient rounded once, and every sum has a fixed order.

``pattern_attention_triton`` is the public entry point (dense patterns go to SDPA); the op
is ``torch.ops.ratplus.pattern_attention`` (``torch.library.custom_op`` with a fake and an
autograd formula; it returns ``(out, lse)`` and differentiates both), so ``torch.compile``
traces through it without a graph break.

Speed (H100, bf16, B=1, 16 x 128 heads, T=131072; bench/results/attention_H100.json): forward
d16w256s4 11 ms, d64w256s4 4.1 ms (10.7x / 29x faster than dense causal SDPA, whose default
backend there is cuDNN at ~575 TFLOP/s; 20x / 54x faster than SDPA's FlashAttention-2);
backward (before the far/near split) 35 ms / 14 ms. The forward runs at ~440 TFLOP/s of useful work
for d16: in Triton 3.6 softmax and matrix work do not overlap as in cuDNN. ``tl.range(...,
warp_specialize=True)`` on the key loops was tried on the H100 (2026-11-23): 64-row tiles fail to
compile (MLIR pass failure), 128x64 with 8 warps runs 11.27 ms vs 11.09 ms without it (d16,
T=131072), so it is not used. Tile counts per kernel and the expected backward times of the split:
kernels/NOTES_pattern_attention.md (``python -m bench.attention_tiles``).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ratplus_titan.pattern import Pattern

_LOG2E = 1.4426950408889634


# Whether this module's kernels are interpreted: triton.jit decides it from TRITON_INTERPRET when the
# module is imported, so read it once, here (the variable may change later; the kernels do not).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Triton's interpreter (seen with triton 3.9) multiplies bf16 operands of tl.dot as their raw 16-bit
# integers: under TRITON_INTERPRET=1 the dot operands are upcast to fp32 (same values, exact products).
# Compiled kernels take the plain path. (The interpreter also truncates fp32 -> bf16 casts, where the
# GPU rounds to nearest: bf16 errors there are about twice the GPU's.)
_UPCAST_DOT = tl.constexpr(_INTERPRET)


@triton.jit
def _dot(a, b, acc):
    """``acc + a @ b`` in fp32: 16-bit operands on the tensor cores, fp32 operands in IEEE fp32 (not tf32)."""
    if _UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_rows(base, rows, stride, offs_d, valid, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr):
    """``[len(rows), BLOCK_D]`` tile of rows at ``base + rows * stride``; masks only what may be out of range."""
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    if MASKED:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs, mask=valid[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=valid[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return x


# --------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------
@triton.jit
def _allowed(t, j, hi_ok, W, S, COMPACT: tl.constexpr):
    """The part's mask for queries ``t`` and key positions ``j`` (broadcast), and the range check."""
    if COMPACT:  # Pattern.compact_allows (j >= S holds by construction: rows start at R_LO)
        ok = j < t - W
    else:  # Pattern.local_allows
        ok = (j <= t) & ((t - j <= W) | (j < S))
    return ok & hi_ok


@triton.jit
def _fwd_part(
    acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, hi, D, W, S, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, COMPACT: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Online softmax over key indices ``[lo, hi)``: compact rows (position ``r*D + D-1``) or positions."""
    for start in tl.range(lo, hi, BLOCK_N):
        idx = start + tl.arange(0, BLOCK_N)
        if COMPACT:
            pos = idx * D + (D - 1)
        else:
            pos = idx
        valid = idx < hi
        k = _load_rows(k_base, pos, stride_kt, offs_d, valid, HEAD_DIM, BLOCK_D, MASKED)
        qk = _dot(q, tl.trans(k), None)
        if MASKED:
            qk = tl.where(_allowed(offs_m[:, None], pos[None, :], valid[None, :], W, S, COMPACT), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # the scale folds into one FMA below
        if MASKED:  # a row may have seen nothing yet: keep exp2 finite
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, pos, stride_vt, offs_d, valid, HEAD_DIM, BLOCK_D, MASKED)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _query_block_ranges(m0, m1, T, D, W, S, R_LO, BLOCK_N: tl.constexpr):
    """Key ranges of query block ``[m0, m1)``: compact rows ``[R_LO, mid)`` (unmasked) and ``[mid, r_hi)``;
    sinks ``[0, s_hi)``; local ``[lo, a)`` masked, ``[a, b)`` unmasked, ``[b, m1)`` masked."""
    r_hi = tl.maximum(m1 - 1 - W, 0) // D  # rows with position < (last query) - W
    r_full = tl.maximum(m0 - W, 0) // D  # rows every query of the block sees
    mid = R_LO + (tl.maximum(r_full - R_LO, 0) // BLOCK_N) * BLOCK_N
    lo = tl.maximum(m0 - W, 0)
    lo = tl.where(lo <= S, 0, lo)  # sinks touching the window: the local part covers them
    s_hi = tl.where(lo > 0, S, 0)
    a = tl.minimum(lo + tl.cdiv(tl.maximum(m1 - 1 - W - lo, 0), BLOCK_N) * BLOCK_N, m1)
    b = a + (tl.maximum(m0 + 1 - a, 0) // BLOCK_N) * BLOCK_N
    return mid, r_hi, s_hi, lo, a, b


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, LSE,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    H, T, D, W, S, R_LO, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr, HAS_DIL: tl.constexpr,
):
    bh = tl.program_id(0)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M  # heaviest query blocks first
    m1 = tl.minimum(m0 + BLOCK_M, T)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    k_base = K + b64 * skb + h64 * skh
    v_base = V + b64 * svb + h64 * svh
    q = _load_rows(Q + b64 * sqb + h64 * sqh, offs_m, sqt, offs_d, row_ok, HEAD_DIM, BLOCK_D, True)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    mid, r_hi, s_hi, lo, a, b = _query_block_ranges(m0, m1, T, D, W, S, R_LO, BLOCK_N)
    if HAS_DIL:
        acc, m_i, l_i = _fwd_part(acc, m_i, l_i, q, k_base, v_base, skt, svt, offs_m, offs_d, R_LO, mid, D, W, S,
                                  qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, False)
        acc, m_i, l_i = _fwd_part(acc, m_i, l_i, q, k_base, v_base, skt, svt, offs_m, offs_d, mid, r_hi, D, W, S,
                                  qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, True)
    acc, m_i, l_i = _fwd_part(acc, m_i, l_i, q, k_base, v_base, skt, svt, offs_m, offs_d, 0, s_hi, D, W, S,
                              qk_scale, HEAD_DIM, BLOCK_D, BLOCK_S, False, True)
    acc, m_i, l_i = _fwd_part(acc, m_i, l_i, q, k_base, v_base, skt, svt, offs_m, offs_d, lo, a, D, W, S,
                              qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, True)
    acc, m_i, l_i = _fwd_part(acc, m_i, l_i, q, k_base, v_base, skt, svt, offs_m, offs_d, a, b, D, W, S,
                              qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, False)
    acc, m_i, l_i = _fwd_part(acc, m_i, l_i, q, k_base, v_base, skt, svt, offs_m, offs_d, b, m1, D, W, S,
                              qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, True)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows (t >= T) can have l == 0
    out = acc / l_safe[:, None]
    o_ptrs = Out + b64 * sob + h64 * soh + offs_m[:, None] * sot + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, mask=row_ok)


# --------------------------------------------------------------------------------------
# backward: delta and dQ per query block
# --------------------------------------------------------------------------------------
@triton.jit
def _dq_part(
    dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, hi, D, W, S, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, COMPACT: tl.constexpr,
    MASKED: tl.constexpr,
):
    for start in tl.range(lo, hi, BLOCK_N):
        idx = start + tl.arange(0, BLOCK_N)
        if COMPACT:
            pos = idx * D + (D - 1)
        else:
            pos = idx
        valid = idx < hi
        k = _load_rows(k_base, pos, stride_kt, offs_d, valid, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_rows(v_base, pos, stride_vt, offs_d, valid, HEAD_DIM, BLOCK_D, MASKED)
        p = tl.math.exp2(_dot(q, tl.trans(k), None) * qk_scale - lse2[:, None])
        if MASKED:
            p = tl.where(_allowed(offs_m[:, None], pos[None, :], valid[None, :], W, S, COMPACT), p, 0.0)
        dp = _dot(do, tl.trans(v), None)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _dq_row_stats(do_base, o_base, LSE, DLSE, DELTA, sdot, sot, stat, offs_m, offs_d, row_ok,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr):  # fmt: skip
    """dO rows of a query tile, ``delta = rowsum(dO * O) - dLSE`` (stored at ``DELTA + stat``) and lse in log2 units."""
    do = _load_rows(do_base, offs_m, sdot, offs_d, row_ok, HEAD_DIM, BLOCK_D, True)
    o = _load_rows(o_base, offs_m, sot, offs_d, row_ok, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if HAS_DLSE:  # d lse_t / d s_tj = P_tj: folds into delta
        delta -= tl.load(DLSE + stat, mask=row_ok, other=0.0)
    tl.store(DELTA + stat, delta, mask=row_ok)
    return do, delta, tl.load(LSE + stat, mask=row_ok, other=0.0) * 1.4426950408889634


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, Out, DO, LSE, DLSE, DELTA, DQ,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sdob, sdoh, sdot, sdqb, sdqh, sdqt,
    H, T, D, W, S, R_LO, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr, HAS_DIL: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    bh = tl.program_id(0)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    m1 = tl.minimum(m0 + BLOCK_M, T)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    k_base = K + b64 * skb + h64 * skh
    v_base = V + b64 * svb + h64 * svh
    q = _load_rows(Q + b64 * sqb + h64 * sqh, offs_m, sqt, offs_d, row_ok, HEAD_DIM, BLOCK_D, True)
    do, delta, lse2 = _dq_row_stats(DO + b64 * sdob + h64 * sdoh, Out + b64 * sob + h64 * soh, LSE, DLSE, DELTA,
                                    sdot, sot, bh.to(tl.int64) * T + offs_m, offs_m, offs_d, row_ok, HEAD_DIM,
                                    BLOCK_D, HAS_DLSE)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    mid, r_hi, s_hi, lo, a, b = _query_block_ranges(m0, m1, T, D, W, S, R_LO, BLOCK_N)
    if HAS_DIL:
        dq = _dq_part(dq, q, do, lse2, delta, k_base, v_base, skt, svt, offs_m, offs_d, R_LO, mid, D, W, S,
                      qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, False)
        dq = _dq_part(dq, q, do, lse2, delta, k_base, v_base, skt, svt, offs_m, offs_d, mid, r_hi, D, W, S,
                      qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, True)
    dq = _dq_part(dq, q, do, lse2, delta, k_base, v_base, skt, svt, offs_m, offs_d, 0, s_hi, D, W, S,
                  qk_scale, HEAD_DIM, BLOCK_D, BLOCK_S, False, True)
    dq = _dq_part(dq, q, do, lse2, delta, k_base, v_base, skt, svt, offs_m, offs_d, lo, a, D, W, S,
                  qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, True)
    dq = _dq_part(dq, q, do, lse2, delta, k_base, v_base, skt, svt, offs_m, offs_d, a, b, D, W, S,
                  qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, False)
    dq = _dq_part(dq, q, do, lse2, delta, k_base, v_base, skt, svt, offs_m, offs_d, b, m1, D, W, S,
                  qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, True)
    dq_ptrs = DQ + b64 * sdqb + h64 * sdqh + offs_m[:, None] * sdqt + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


# --------------------------------------------------------------------------------------
# backward: dK, dV per key block (compact rows, then local + sink positions)
# --------------------------------------------------------------------------------------
@triton.jit
def _dkdv_part(
    dk, dv, k, v, pos, valid_k, q_base, do_base, lse_base, delta_base, sqt, sdot, offs_d, lo, hi, W, S, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, COMPACT: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Accumulate ``dK``/``dV`` of the keys at ``pos`` over the queries ``[lo, hi)``."""
    for start in tl.range(lo, hi, BLOCK_M):
        offs_t = start + tl.arange(0, BLOCK_M)
        valid_t = offs_t < hi
        q = _load_rows(q_base, offs_t, sqt, offs_d, valid_t, HEAD_DIM, BLOCK_D, MASKED)
        do = _load_rows(do_base, offs_t, sdot, offs_d, valid_t, HEAD_DIM, BLOCK_D, MASKED)
        if MASKED:
            lse2 = tl.load(lse_base + offs_t, mask=valid_t, other=0.0) * 1.4426950408889634
            delta = tl.load(delta_base + offs_t, mask=valid_t, other=0.0)
        else:
            lse2 = tl.load(lse_base + offs_t) * 1.4426950408889634
            delta = tl.load(delta_base + offs_t)
        pT = tl.math.exp2(_dot(k, tl.trans(q), None) * qk_scale - lse2[None, :])  # [BLOCK_N, BLOCK_M]
        if MASKED:
            ok = _allowed(offs_t[None, :], pos[:, None], valid_k[:, None] & valid_t[None, :], W, S, COMPACT)
            pT = tl.where(ok, pT, 0.0)
        dv = _dot(pT.to(do.dtype), do, dv)
        dsT = pT * (_dot(v, tl.trans(do), None) - delta[None, :])
        dk = _dot(dsT.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _dkdv_blocks(
    Q, DO, LSE, DELTA, k, v, pos, valid_k, bh, b64, h64, sqb, sqh, sqt, sdob, sdoh, sdot, T, offs_d,
    lo, a, b, hi, W, S, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    COMPACT: tl.constexpr,
):
    """fp32 ``dK``, ``dV`` of the keys at ``pos`` over the queries ``[lo, hi)``: masked ``[lo, a)``,
    unmasked ``[a, b)``, masked ``[b, hi)``."""
    q_base = Q + b64 * sqb + h64 * sqh
    do_base = DO + b64 * sdob + h64 * sdoh
    lse_base = LSE + bh.to(tl.int64) * T
    delta_base = DELTA + bh.to(tl.int64) * T
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk, dv = _dkdv_part(dk, dv, k, v, pos, valid_k, q_base, do_base, lse_base, delta_base, sqt, sdot, offs_d,
                        lo, a, W, S, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, COMPACT, True)
    dk, dv = _dkdv_part(dk, dv, k, v, pos, valid_k, q_base, do_base, lse_base, delta_base, sqt, sdot, offs_d,
                        a, b, W, S, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, COMPACT, False)
    dk, dv = _dkdv_part(dk, dv, k, v, pos, valid_k, q_base, do_base, lse_base, delta_base, sqt, sdot, offs_d,
                        b, hi, W, S, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, COMPACT, True)
    return dk, dv


@triton.jit
def _far_position(f, S, R_LO, D):
    """Sequence position of far row ``f``: the sinks ``0..S-1``, then compact row ``f - S + R_LO``."""
    return tl.where(f < S, f, (f - S + R_LO) * D + (D - 1))


@triton.jit
def _far_block_start(f0, W, S, R_LO, D, BLOCK_M: tl.constexpr):
    """First query tile of the block of far rows starting at row ``f0``: the tile holding row ``f0``'s first
    far query (``far_block_tiles`` in Python)."""
    return (_far_position(f0, S, R_LO, D) + W + 1) // BLOCK_M * BLOCK_M


@triton.jit
def _bwd_far_kernel(
    Q, K, V, DO, LSE, DELTA, DKF, DVF,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot,
    H, T, D, W, S, R_LO, NF, SPLIT_LEN, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK/dV of far rows ``[f0, f0 + BLOCK_N)`` from the queries ``t > position + W`` of split ``s``
    (queries ``[s * SPLIT_LEN, (s + 1) * SPLIT_LEN)``), fp32 into ``[splits, B*H, NF, BLOCK_D]``; a split
    with no query in range writes nothing."""
    bh = tl.program_id(0)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    f0 = tl.program_id(1) * BLOCK_N  # heaviest (earliest) rows first
    split = tl.program_id(2)
    lo = _far_block_start(f0, W, S, R_LO, D, BLOCK_M)
    q0 = tl.maximum(lo, split * SPLIT_LEN)
    q1 = tl.minimum(T, (split + 1) * SPLIT_LEN)
    if q0 < q1:
        rows = f0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        valid_k = rows < NF
        pos = _far_position(rows, S, R_LO, D)
        k = _load_rows(K + b64 * skb + h64 * skh, pos, skt, offs_d, valid_k, HEAD_DIM, BLOCK_D, True)
        v = _load_rows(V + b64 * svb + h64 * svh, pos, svt, offs_d, valid_k, HEAD_DIM, BLOCK_D, True)
        # from tile a on, queries see every row of the block (a full block only)
        last = _far_position(f0 + BLOCK_N - 1, S, R_LO, D)
        a = tl.where(f0 + BLOCK_N <= NF, tl.cdiv(last + W + 1, BLOCK_M) * BLOCK_M, q1)
        a = tl.minimum(tl.maximum(a, q0), q1)
        b = a + ((q1 - a) // BLOCK_M) * BLOCK_M
        dk, dv = _dkdv_blocks(Q, DO, LSE, DELTA, k, v, pos, valid_k, bh, b64, h64, sqb, sqh, sqt, sdob, sdoh, sdot,
                              T, offs_d, q0, a, b, q1, W, S, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True)
        f_offs = ((split * tl.num_programs(0) + bh).to(tl.int64) * NF + rows)[:, None] * BLOCK_D + offs_d[None, :]
        tl.store(DKF + f_offs, dk * scale, mask=valid_k[:, None])
        tl.store(DVF + f_offs, dv, mask=valid_k[:, None])


@triton.jit
def _far_sum_kernel(
    PARTS, SUMS, BH, T, D, W, S, R_LO, NF, SPLIT_LEN, NUM_SPLITS,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``SUMS[g, bh, f]`` = the sum, in split order, of ``PARTS[g, split, bh, f]`` (``g``: 0 dK, 1 dV) over
    the splits ``_bwd_far_kernel`` wrote for the block of far rows ``[f0, f0 + BLOCK_N)``: those from the
    split of the block's first query tile on, none for a block that no query sees as far."""
    bh = tl.program_id(0)
    f0 = tl.program_id(1) * BLOCK_N
    g = tl.program_id(2)
    rows = f0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows < NF)[:, None]
    lo = _far_block_start(f0, W, S, R_LO, D, BLOCK_M)
    first = lo // SPLIT_LEN
    last = tl.where(lo < T, NUM_SPLITS, first)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for split in tl.range(first, last):
        offs = (((g * NUM_SPLITS + split) * BH + bh).to(tl.int64) * NF + rows)[:, None] * BLOCK_D + offs_d[None, :]
        acc += tl.load(PARTS + offs, mask=ok, other=0.0)
    out = ((g * BH + bh).to(tl.int64) * NF + rows)[:, None] * BLOCK_D + offs_d[None, :]
    tl.store(SUMS + out, acc, mask=ok)


@triton.jit
def _bwd_near_kernel(
    Q, K, V, DO, LSE, DELTA, DKF, DVF, DK, DV,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
    H, T, D, W, S, R_LO, NF, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_FAR: tl.constexpr, HAS_DIL: tl.constexpr,
):
    """dK/dV of positions ``[n0, n0 + BLOCK_N)`` from the queries ``t - W <= j <= t``, plus the far rows' sums
    (``DKF``, ``DVF``: ``[B*H, NF, BLOCK_D]`` fp32, ``_far_sum_kernel``)."""
    bh = tl.program_id(0)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    pos = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    valid_k = pos < T
    k = _load_rows(K + b64 * skb + h64 * skh, pos, skt, offs_d, valid_k, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V + b64 * svb + h64 * svh, pos, svt, offs_d, valid_k, HEAD_DIM, BLOCK_D, True)
    hi = tl.minimum(T, n0 + BLOCK_N + W)  # the last query within W of the block's last key, + 1
    # unmasked query blocks: start >= last key (causal) and end - n0 <= W + 1 (window)
    a = tl.where(n0 + BLOCK_N <= T, tl.minimum(n0 + tl.cdiv(BLOCK_N - 1, BLOCK_M) * BLOCK_M, hi), hi)
    b = a + tl.minimum(tl.maximum(n0 + W + 1 - a, 0), hi - a) // BLOCK_M * BLOCK_M
    # the mask local_allows with no sinks (S = 0): 0 <= t - j <= W; the far kernel has the sinks' other queries
    dk, dv = _dkdv_blocks(Q, DO, LSE, DELTA, k, v, pos, valid_k, bh, b64, h64, sqb, sqh, sqt, sdob, sdoh, sdot,
                          T, offs_d, n0, a, b, hi, W, 0, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False)
    dk = dk * scale
    if HAS_FAR:  # sinks and dilated positions: add the far kernel's fp32 partials, summed over the splits
        is_far = pos < S
        if HAS_DIL:
            is_far = is_far | ((pos + 1) % D == 0)
        is_far = is_far & valid_k & (pos + W + 1 < T)  # rows no query sees as far have no partial
        f = tl.where(pos < S, pos, S + (pos + 1) // D - 1 - R_LO)
        f_offs = (bh.to(tl.int64) * NF + f)[:, None] * BLOCK_D + offs_d[None, :]
        dk += tl.load(DKF + f_offs, mask=is_far[:, None], other=0.0)
        dv += tl.load(DVF + f_offs, mask=is_far[:, None], other=0.0)
    kd_mask = valid_k[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(DK + b64 * sdkb + h64 * sdkh + pos[:, None] * sdkt + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=kd_mask)
    tl.store(DV + b64 * sdvb + h64 * sdvh + pos[:, None] * sdvt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kd_mask)


# --------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------
def _interpreting() -> bool:
    """The kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` when this module was imported)."""
    return _INTERPRET


# Tiles per kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M is the query tile and BLOCK_N
# the key tile in every kernel. 16-bit inputs, by padded head dim: the hd=128 entries are the best of
# the tile sweep on an H100 at T=131072 (bench/results/attention_H100.json "tune"; fwd 64x64: 10.9 ms vs 11.0 for
# 128x64 and 12-27 ms for others); the others are untimed guesses. fp32 inputs take smaller tiles so
# that the pipelined tiles fit in shared memory.
_GPU_CONFIGS = {
    "fwd": {64: (64, 64, 4, 3), 128: (64, 64, 4, 3), 256: (64, 32, 4, 2)},
    "dq": {64: (64, 64, 4, 3), 128: (128, 64, 8, 3), 256: (32, 32, 4, 2)},
    "dkdv": {64: (64, 64, 4, 3), 128: (64, 128, 8, 3), 256: (32, 32, 4, 2)},
}
_GPU_CONFIGS_FP32 = {
    "fwd": {64: (64, 32, 4, 2), 128: (64, 32, 4, 2), 256: (32, 16, 4, 2)},
    "dq": {64: (32, 32, 4, 2), 128: (32, 32, 4, 2), 256: (16, 16, 4, 2)},
    "dkdv": {64: (32, 32, 4, 2), 128: (32, 32, 4, 2), 256: (16, 16, 4, 2)},
}
_CPU_CONFIG = (16, 16, 1, 1)
# kind ("fwd", "dq", "dkdv") -> tiles; tests and the tile sweep set this.
CONFIG_OVERRIDE: dict[str, tuple[int, int, int, int]] = {}


def _config(kind: str, block_d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    if kind in CONFIG_OVERRIDE:
        return CONFIG_OVERRIDE[kind]
    if _interpreting():
        return _CPU_CONFIG
    table = _GPU_CONFIGS_FP32 if dtype == torch.float32 else _GPU_CONFIGS
    return table[kind][min(max(block_d, 64), 256)]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"pattern_attention_triton needs q, k, v of one shape [B, H, T, hd], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"pattern_attention_triton needs q, k, v in one of bf16, fp16, fp32, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"pattern_attention_triton supports head dims up to 256, got {q.shape[-1]}")


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _pattern_args(dilation: int, local_window: int, sinks: int, seq_len: int) -> tuple[int, int, int, bool]:
    """(D as launched, R_LO, NR, HAS_DIL): dilated rows exist only for D >= 1 and T >= D."""
    pattern = Pattern(dilation, local_window, sinks)
    num_rows = pattern.num_dilated_rows(seq_len)
    has_dil = num_rows > 0
    return (dilation if has_dil else 1), sinks // max(dilation, 1), num_rows, has_dil


def _sink_block(sinks: int, block_n: int) -> int:
    """Key tile of the sink part: a few sinks need no full key tile."""
    return min(block_n, max(16, triton.next_power_of_2(max(sinks, 1))))


def far_rows(dilation: int, sinks: int, seq_len: int) -> int:
    """Rows of the far kernel: the sinks, then the compact dilated rows at positions ``>= sinks``."""
    pattern = Pattern(dilation, 0, sinks)
    compact = max(pattern.num_dilated_rows(seq_len) - sinks // max(dilation, 1), 0)
    return min(sinks, seq_len) + compact


def far_position(row: int, dilation: int, sinks: int, r_lo: int) -> int:
    """Sequence position of far row ``row`` (``_far_position`` in the kernels)."""
    return row if row < sinks else (row - sinks + r_lo) * dilation + dilation - 1


@functools.lru_cache(maxsize=256)
def far_block_tiles(seq_len: int, dilation: int, local_window: int, sinks: int, r_lo: int, num_far: int,
                    block_m: int, block_n: int) -> tuple[int, ...]:
    """Query tiles of each block of ``block_n`` far rows, unsplit: ``[lo, T)`` in tiles of ``block_m``, ``lo``
    the tile of the block's first query (``dilation`` as launched: 1 without dilated rows)."""
    tiles = []
    for f0 in range(0, num_far, block_n):
        lo = (far_position(f0, dilation, sinks, r_lo) + local_window + 1) // block_m * block_m
        tiles.append(max(triton.cdiv(seq_len - lo, block_m), 0))
    return tuple(tiles)


# Far-kernel splits: a block of far rows is seen by up to all T queries, a serial loop of T / BLOCK_M tiles
# in one program; split s takes the queries [s * split_len, (s + 1) * split_len) of every block. The split
# length gives about FAR_WAVES programs per SM, but no fewer than FAR_MIN_TILES query tiles a split: each
# split writes (and the sum kernel reads back) a 2 x BLOCK_N x BLOCK_D fp32 partial, about one tile's traffic.
FAR_WAVES = 4
FAR_MIN_TILES = 8
# query tiles per far split, when set (tests force several splits at small T with it)
FAR_SPLIT_TILES: int | None = None


def far_split_len(seq_len: int, dilation: int, local_window: int, sinks: int, r_lo: int, num_far: int,
                  block_m: int, block_n: int, programs_bh: int, slots: int) -> int:
    """Queries per far split (a multiple of ``block_m``); ``>= seq_len`` means one split."""
    whole = triton.cdiv(seq_len, block_m) * block_m
    if FAR_SPLIT_TILES is not None:
        return FAR_SPLIT_TILES * block_m
    tiles = far_block_tiles(seq_len, dilation, local_window, sinks, r_lo, num_far, block_m, block_n)
    per_split = max(FAR_MIN_TILES, triton.cdiv(programs_bh * sum(tiles), FAR_WAVES * slots))
    return whole if per_split >= max(tiles, default=0) else per_split * block_m


def _slots(device: torch.device) -> int:
    """Programs that run at once: one per SM on a GPU (the backward tiles fill an SM), 1 elsewhere."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _forward(q, k, v, dilation, local_window, sinks, scale):
    _check(q, k, v)
    q, k, v = (_unit_last(x) for x in (q, k, v))
    batch, heads, seq_len, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, seq_len, dtype=torch.float32, device=q.device)
    if seq_len == 0:
        return out, lse
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, warps, stages = _config("fwd", block_d, q.dtype)
    d_launch, r_lo, _, has_dil = _pattern_args(dilation, local_window, sinks, seq_len)
    grid = (batch * heads, triton.cdiv(seq_len, block_m))
    _fwd_kernel[grid](
        q, k, v, out, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        heads, seq_len, d_launch, local_window, sinks, r_lo, scale * _LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_S=_sink_block(sinks, block_n), HAS_DIL=has_dil,
        num_warps=warps, num_stages=stages,
    )
    return out, lse


def _backward(grad_out, grad_lse, q, k, v, out, lse, dilation, local_window, sinks, scale):
    q, k, v, out, grad_out = (_unit_last(x) for x in (q, k, v, out, grad_out))
    batch, heads, seq_len, head_dim = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if seq_len == 0:
        return dq, dk, dv
    block_d = max(16, triton.next_power_of_2(head_dim))
    d_launch, r_lo, _, has_dil = _pattern_args(dilation, local_window, sinks, seq_len)
    qk_scale = scale * _LOG2E
    delta = torch.empty(batch, heads, seq_len, dtype=torch.float32, device=q.device)
    has_dlse = grad_lse is not None
    dlse = grad_lse.float().contiguous() if has_dlse else delta

    block_m, block_n, warps, stages = _config("dq", block_d, q.dtype)
    _bwd_dq_kernel[(batch * heads, triton.cdiv(seq_len, block_m))](
        q, k, v, out, grad_out, lse, dlse, delta, dq,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *grad_out.stride()[:3],
        *dq.stride()[:3],
        heads, seq_len, d_launch, local_window, sinks, r_lo, qk_scale, scale,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_S=_sink_block(sinks, block_n), HAS_DIL=has_dil, HAS_DLSE=has_dlse, num_warps=warps, num_stages=stages,
    )

    block_m, block_n, warps, stages = _config("dkdv", block_d, q.dtype)
    num_far = far_rows(dilation, sinks, seq_len)
    split_len = far_split_len(seq_len, d_launch, local_window, sinks, r_lo, num_far, block_m, block_n,
                              batch * heads, _slots(q.device))
    num_splits = triton.cdiv(seq_len, split_len)
    if num_far > 0:
        # fp32 partials [dK | dV, split, B*H, far row, BLOCK_D], then their sums over the splits
        parts = torch.empty(2, num_splits, batch * heads, num_far, block_d, dtype=torch.float32, device=q.device)
        if _interpreting():  # the tests: a read of a partial that no program wrote shows up as NaN
            parts.fill_(float("nan"))
        _bwd_far_kernel[(batch * heads, triton.cdiv(num_far, block_n), num_splits)](
            q, k, v, grad_out, lse, delta, parts[0], parts[1],
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3],
            heads, seq_len, d_launch, local_window, sinks, r_lo, num_far, split_len, qk_scale, scale,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=warps, num_stages=stages,
        )
        if num_splits == 1:  # nothing to sum; the near kernel reads only rows some query sees as far
            sums = parts[:, 0]
        else:
            sums = torch.empty(2, batch * heads, num_far, block_d, dtype=torch.float32, device=q.device)
            if _interpreting():
                sums.fill_(float("nan"))
            _far_sum_kernel[(batch * heads, triton.cdiv(num_far, block_n), 2)](
                parts, sums, batch * heads, seq_len, d_launch, local_window, sinks, r_lo, num_far, split_len,
                num_splits, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_n >= 128 else 4,
            )
        dk_far, dv_far = sums[0], sums[1]
    else:
        dk_far = dv_far = delta  # unused
    _bwd_near_kernel[(batch * heads, triton.cdiv(seq_len, block_n))](
        q, k, v, grad_out, lse, delta, dk_far, dv_far, dk, dv,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *dk.stride()[:3],
        *dv.stride()[:3],
        heads, seq_len, d_launch, local_window, sinks, r_lo, num_far, qk_scale, scale,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, HAS_FAR=num_far > 0,
        HAS_DIL=has_dil, num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv


# --------------------------------------------------------------------------------------
# the custom op
# --------------------------------------------------------------------------------------
@torch.library.custom_op("ratplus::pattern_attention", mutates_args=(), device_types=("cuda", "cpu"))
def pattern_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dilation: int, local_window: int, sinks: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B,H,T,hd], lse [B,H,T] fp32, natural log)`` of attention under the pattern."""
    return _forward(q, k, v, dilation, local_window, sinks, scale)


@pattern_attention_op.register_fake
def _(q, k, v, dilation, local_window, sinks, scale):
    batch, heads, seq_len, _ = q.shape
    return torch.empty_like(q), q.new_empty(batch, heads, seq_len, dtype=torch.float32)


@torch.library.custom_op("ratplus::pattern_attention_backward", mutates_args=(), device_types=("cuda", "cpu"))
def pattern_attention_backward_op(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, dilation: int, local_window: int, sinks: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_out, grad_lse, q, k, v, out, lse, dilation, local_window, sinks, scale)


@pattern_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, dilation, local_window, sinks, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, dilation, local_window, sinks, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.pattern = (dilation, local_window, sinks, scale)


def _backward_formula(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = pattern_attention_backward_op(grad_out, grad_lse, q, k, v, out, lse, *ctx.pattern)
    return dq, dk, dv, None, None, None, None


pattern_attention_op.register_autograd(_backward_formula, setup_context=_setup_context)


def pattern_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float | None = None
) -> torch.Tensor:
    """``[B, H, T, hd]`` attention under ``pattern`` (Triton; dense patterns go to SDPA)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if pattern.covers_all(q.shape[-2]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    out, _ = torch.ops.ratplus.pattern_attention(
        q, k, v, pattern.dilation, pattern.local_window, pattern.sinks, scale
    )
    return out


__all__ = ["pattern_attention_triton", "pattern_attention_op", "CONFIG_OVERRIDE"]
