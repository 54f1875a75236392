"""Triton decode attention (forward only): one query per sequence over its cache rows.

Same contract as ``decode.decode_attention_reference``::

    q [B, H, hd], k_cache/v_cache [B, H, R, hd], valid [B, R] bool, k_new/v_new [B, H, hd] -> [B, H, hd]

Decoding is memory bound: every cache row is read once per step, so the kernel should stream the
cache at copy bandwidth. Two paths (``DecodeConfig.kernel``):

``flat`` (default): one launch of about ``programs_per_sm x SMs`` programs, all resident at once. The row
tiles of all (sequence, head) pairs form one sequence, head after head; each program streams a
contiguous run of it through an online softmax (exp2 domain, fp32 statistics) in a single loop, so a
program does not ramp up and drain per head, every program reads about the same number of bytes and
there is no tail wave. With ``row_stats`` (default) each row slot of a tile keeps its own online-softmax
statistics, merged once at a head's end, so the loop has no cross-warp reduction and no barrier: every
warp issues its next loads as soon as its own rows are done. When the runs are whole heads (the usual case: many heads), a program writes
each head's output itself, merged with the new token's own row. When a head is cut between programs
(few heads, long rows: stream-K), each contributor writes a partial (output, log-sum-exp) and bumps the
head's arrival counter (an atomic); the last to arrive merges them, so no program waits and there is
no second kernel.

``split``: the previous flash-decoding path: program ``(b*H + h, split)`` streams rows
``[split * rows_per_split, ...)`` of one head and writes a partial; a second small kernel merges the
partials of each head together with the new token's own row. Small sparse caches lose to its fixed
costs: few tiles per program (each program ramps up and drains), a nearly empty last split per head
(R = sinks + window + T/D is 4 rows past a multiple of 256), and the second launch.

Ragged batches: ``valid`` is either a ``[B, R]`` bool mask (rows a sequence may not see
have ``False``; their loads are predicated off, so they cost no memory traffic) or ``[B]``
counts (rows ``[0, count)`` are valid: the decode cache's sparse layout and the dense
pattern keep their valid rows as a prefix). With counts no row load waits for a mask load. The flat
kernel also reads a per-head table of row spans instead (``_flat_launch(..., nsub=...)``): top-k decode
(``topk_attention_triton.py``) streams the blocks each head picked that way. The
partition depends only on the static shapes (B, H, R) and the GPU, so a captured CUDA graph replays
unchanged.

The op is ``torch.ops.ratplus.decode_attention`` (a ``torch.library.custom_op`` with a
fake), so ``torch.compile`` and CUDA-graph capture treat it as one opaque call.
Under ``TRITON_INTERPRET=1`` it runs on CPU tensors (the tests do this).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    Q, K, V, VALID, O_PART, LSE_PART,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kr,
    stride_vb, stride_vh, stride_vr,
    stride_mb,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    H, R, rows_per_split, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    # qk_scale = softmax scale * log2(e): scores live in the exp2 domain.
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d, mask=d_mask, other=0.0).to(tl.float32) * qk_scale
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    lo = split * rows_per_split
    hi = tl.minimum(lo + rows_per_split, R)
    if not HAS_MASK:
        # VALID holds a count per sequence: rows [0, count) are valid. The loop stops there, and
        # no load waits on another load (a mask would have to arrive before the rows it guards).
        hi = tl.minimum(hi, tl.load(VALID + b).to(tl.int32))

    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        if HAS_MASK:
            visible = tl.load(VALID + b.to(tl.int64) * stride_mb + rows, mask=rows < hi, other=0) != 0  # [BLOCK_N]
        else:
            visible = rows < hi
        load_mask = visible[:, None] & d_mask[None, :]
        k = tl.load(k_base + rows[:, None].to(tl.int64) * stride_kr + offs_d[None, :], mask=load_mask, other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)  # [BLOCK_N]
        scores = tl.where(visible, scores, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # all masked so far: keep exp2 finite
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe)  # [BLOCK_N], 0 where masked
        v = tl.load(v_base + rows[:, None].to(tl.int64) * stride_vr + offs_d[None, :], mask=load_mask, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    # Partial: normalised output and its lse (exp2 domain); -inf lse marks an empty split.
    has_rows = l_i > 0.0
    out = acc / tl.where(has_rows, l_i, 1.0)
    lse = tl.where(has_rows, m_i + tl.log2(tl.where(has_rows, l_i, 1.0)), -float("inf"))
    tl.store(O_PART + b * stride_ob + h * stride_oh + split * stride_os + offs_d, out, mask=d_mask)
    tl.store(LSE_PART + b * stride_lb + h * stride_lh + split, lse)


@triton.jit
def _decode_merge_kernel(
    Q, K_NEW, V_NEW, O_PART, LSE_PART, OUT,
    stride_qb, stride_qh,
    stride_knb, stride_knh,
    stride_vnb, stride_vnh,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_outb, stride_outh,
    H, num_splits, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < num_splits
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d, mask=d_mask, other=0.0).to(tl.float32) * qk_scale
    k_new = tl.load(K_NEW + b * stride_knb + h * stride_knh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    v_new = tl.load(V_NEW + b * stride_vnb + h * stride_vnh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    self_score = tl.sum(q * k_new, axis=0)  # the new row is always visible: the max is finite

    lse = tl.load(LSE_PART + b * stride_lb + h * stride_lh + offs_s, mask=s_mask, other=-float("inf"))
    m = tl.maximum(tl.max(lse, axis=0), self_score)
    weights = tl.exp2(lse - m)  # [BLOCK_S], 0 for empty splits
    part = tl.load(
        O_PART + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    self_weight = tl.exp2(self_score - m)
    total = tl.sum(weights, axis=0) + self_weight
    out = (tl.sum(weights[:, None] * part, axis=0) + self_weight * v_new) / total
    tl.store(OUT + b * stride_outb + h * stride_outh + offs_d, out.to(OUT.dtype.element_ty), mask=d_mask)


# --------------------------------------------------------------------------------------
# flat (persistent, stream-K) decode: one launch, the programs stream a contiguous run of row tiles
# --------------------------------------------------------------------------------------
@triton.jit
def _flat_load_tile(
    Q, K, V, VALID, t, t_end, NB, NSUB, H, R,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kr, stride_vb, stride_vh, stride_vr, stride_mb,
    offs_n, offs_d, d_mask, qk_scale,
    BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, SPANS: tl.constexpr,
):
    """Loads of tile ``t`` (head ``t // NB``, rows ``(t % NB) * BLOCK_N + [0, BLOCK_N)``); all masked off when ``t >= t_end``.

    ``SPANS``: VALID is a per-head table ``[B*H, NB // NSUB, 2]`` of row spans (first row, row count), each
    read as ``NSUB`` tiles: tile ``t % NB`` is sub-tile ``t % NSUB`` of span ``(t % NB) // NSUB`` (top-k decode).
    """
    in_range = t < t_end
    bh = tl.minimum(t, t_end - 1) // NB  # past the end (the last prefetch): address the last tile, load nothing
    b = bh // H
    h = bh - b * H
    tile = tl.minimum(t, t_end - 1) - bh * NB
    if SPANS:
        span = VALID + (bh.to(tl.int64) * (NB // NSUB) + tile // NSUB) * 2
        offs = (tile % NSUB) * BLOCK_N + offs_n
        visible = offs < tl.where(in_range, tl.load(span + 1), 0)
        rows = tl.load(span) + offs
    elif HAS_MASK:
        rows = tile * BLOCK_N + offs_n
        limit = tl.where(in_range, R, 0)
        visible = tl.load(VALID + b.to(tl.int64) * stride_mb + rows, mask=rows < limit, other=0) != 0
    else:
        rows = tile * BLOCK_N + offs_n
        # counts: rows [0, count) are valid; no row load waits on a mask load
        limit = tl.where(in_range, tl.minimum(tl.load(VALID + b).to(tl.int32), R), 0)
        visible = rows < limit
    load_mask = visible[:, None] & d_mask[None, :]
    k_ptrs = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + rows[:, None].to(tl.int64) * stride_kr
    v_ptrs = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + rows[:, None].to(tl.int64) * stride_vr
    # both loads are issued before either is used: a tile's key and value bytes are in flight together
    k = tl.load(k_ptrs + offs_d[None, :], mask=load_mask, other=0.0, eviction_policy="evict_first")
    v = tl.load(v_ptrs + offs_d[None, :], mask=load_mask, other=0.0, eviction_policy="evict_first")
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d, mask=d_mask, other=0.0).to(tl.float32) * qk_scale
    return q, k, v, visible


@triton.jit
def _flat_finish(q, m_i, l_i, acc, K_NEW, V_NEW, OUT, b, h,
                 stride_knb, stride_knh, stride_vnb, stride_vnh, stride_outb, stride_outh, offs_d, d_mask):
    """Output of a head from its (unnormalised) cache statistics merged with the new token's own row."""
    k_new = tl.load(K_NEW + b * stride_knb + h * stride_knh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    v_new = tl.load(V_NEW + b * stride_vnb + h * stride_vnh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    self_score = tl.sum(q * k_new, axis=0)  # the new row is always visible: m is finite
    m = tl.maximum(m_i, self_score)
    alpha = tl.exp2(m_i - m)  # 0 when the cache part is empty (m_i = -inf)
    self_weight = tl.exp2(self_score - m)
    out = (acc * alpha + self_weight * v_new) / (l_i * alpha + self_weight)
    tl.store(OUT + b * stride_outb + h * stride_outh + offs_d, out.to(OUT.dtype.element_ty), mask=d_mask)


@triton.jit
def _flat_epilogue(
    q, m_i, l_i, acc, t, t0, pid, tiles_per_program, NB, H,
    K_NEW, V_NEW, OUT, O_PART, LSE_PART, COUNT,
    stride_knb, stride_knh, stride_vnb, stride_vnh, stride_outb, stride_outh, offs_d, d_mask,
    HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr, MERGE: tl.constexpr,
):
    """End of a head's run of tiles in this program: the head's output, or a partial the last contributor merges."""
    bh = t // NB
    b = bh // H
    h = bh - b * H
    if MERGE:
        # programs p own tiles [p * tiles_per_program, ...): the head's contributors are first_p..last_p
        first_p = (bh * NB) // tiles_per_program
        last_p = (bh * NB + NB - 1) // tiles_per_program
        if first_p == last_p:
            _flat_finish(q, m_i, l_i, acc, K_NEW, V_NEW, OUT, b, h,
                         stride_knb, stride_knh, stride_vnb, stride_vnh, stride_outb, stride_outh, offs_d, d_mask)
        else:
            # partial: normalised output and lse (exp2 domain); -inf lse marks a run with no visible row
            has_rows = l_i > 0.0
            part = acc / tl.where(has_rows, l_i, 1.0)
            lse = tl.where(has_rows, m_i + tl.log2(tl.where(has_rows, l_i, 1.0)), -float("inf"))
            slot = pid - first_p
            tl.store(O_PART + (bh.to(tl.int64) * BLOCK_C + slot) * HEAD_DIM + offs_d, part, mask=d_mask)
            tl.store(LSE_PART + bh.to(tl.int64) * BLOCK_C + slot, lse)
            tl.debug_barrier()  # every thread's partial is written before the arrival is counted
            arrived = tl.atomic_add(COUNT + bh, 1, sem="acq_rel", scope="gpu")
            if arrived == last_p - first_p:  # the last contributor to arrive merges (no program ever waits)
                tl.debug_barrier()
                offs_c = tl.arange(0, BLOCK_C)
                c_mask = offs_c <= last_p - first_p
                lses = tl.load(LSE_PART + bh.to(tl.int64) * BLOCK_C + offs_c, mask=c_mask, other=-float("inf"),
                               cache_modifier=".cg")
                parts = tl.load(O_PART + (bh.to(tl.int64) * BLOCK_C + offs_c[:, None]) * HEAD_DIM + offs_d[None, :],
                                mask=c_mask[:, None] & d_mask[None, :], other=0.0, cache_modifier=".cg")
                k_new = tl.load(K_NEW + b * stride_knb + h * stride_knh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
                v_new = tl.load(V_NEW + b * stride_vnb + h * stride_vnh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
                self_score = tl.sum(q * k_new, axis=0)
                m = tl.maximum(tl.max(lses, axis=0), self_score)
                weights = tl.exp2(lses - m)  # 0 for empty partials
                self_weight = tl.exp2(self_score - m)
                out = (tl.sum(weights[:, None] * parts, axis=0) + self_weight * v_new) / (tl.sum(weights, axis=0) + self_weight)
                tl.store(OUT + b * stride_outb + h * stride_outh + offs_d, out.to(OUT.dtype.element_ty), mask=d_mask)
    else:
        _flat_finish(q, m_i, l_i, acc, K_NEW, V_NEW, OUT, b, h,
                     stride_knb, stride_knh, stride_vnb, stride_vnh, stride_outb, stride_outh, offs_d, d_mask)


@triton.jit(do_not_specialize=["R", "NB", "total_tiles", "tiles_per_program", "NSUB"])  # one compile for all shapes
def _decode_flat_kernel(
    Q, K, V, VALID, K_NEW, V_NEW, OUT, O_PART, LSE_PART, COUNT,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kr,
    stride_vb, stride_vh, stride_vr,
    stride_mb,
    stride_knb, stride_knh,
    stride_vnb, stride_vnh,
    stride_outb, stride_outh,
    H, R, NB, total_tiles, tiles_per_program, NSUB, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_MASK: tl.constexpr, MERGE: tl.constexpr, PREFETCH: tl.constexpr, ROW_STATS: tl.constexpr,
    SPANS: tl.constexpr,
):
    # The tiles of all heads form one sequence, head after head (NB tiles of BLOCK_N rows per head); program
    # ``pid`` streams tiles [t0, t1) in one loop, whatever heads they belong to, so no program ramps up or
    # drains per head and every program reads about the same number of bytes. A head's statistics reset at
    # its first tile and are written out at its last tile (or at the program's last tile: a partial).
    pid = tl.program_id(0)
    t0 = pid * tiles_per_program
    t1 = tl.minimum(t0 + tiles_per_program, total_tiles)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    if ROW_STATS:
        # One online softmax per row slot of the tile (max, sum, output row): the loop reduces nothing
        # across rows, so no warp waits on another (no shared memory, no barrier); the slots are merged
        # once per head, at its end.
        m_i = tl.full([BLOCK_N], -float("inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    else:
        m_i = -float("inf")
        l_i = 0.0
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    if PREFETCH:
        q_next, k_next, v_next, vis_next = _flat_load_tile(
            Q, K, V, VALID, t0, t1, NB, NSUB, H, R,
            stride_qb, stride_qh, stride_kb, stride_kh, stride_kr, stride_vb, stride_vh, stride_vr, stride_mb,
            offs_n, offs_d, d_mask, qk_scale, BLOCK_N, HAS_MASK, SPANS,
        )
    for t in range(t0, t1):
        if PREFETCH:
            # this tile was loaded during the previous iteration; issue the next tile's loads before computing
            q = q_next
            k = k_next
            v = v_next
            visible = vis_next
            q_next, k_next, v_next, vis_next = _flat_load_tile(
                Q, K, V, VALID, t + 1, t1, NB, NSUB, H, R,
                stride_qb, stride_qh, stride_kb, stride_kh, stride_kr, stride_vb, stride_vh, stride_vr, stride_mb,
                offs_n, offs_d, d_mask, qk_scale, BLOCK_N, HAS_MASK, SPANS,
            )
        else:
            q, k, v, visible = _flat_load_tile(
                Q, K, V, VALID, t, t1, NB, NSUB, H, R,
                stride_qb, stride_qh, stride_kb, stride_kh, stride_kr, stride_vb, stride_vh, stride_vr, stride_mb,
                offs_n, offs_d, d_mask, qk_scale, BLOCK_N, HAS_MASK, SPANS,
            )
        blk = t % NB
        first = (blk == 0) | (t == t0)  # a new head starts: reset its statistics
        m_i = tl.where(first, -float("inf"), m_i)
        l_i = tl.where(first, 0.0, l_i)
        acc = tl.where(first, 0.0, acc)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)  # [BLOCK_N], exp2 domain
        scores = tl.where(visible, scores, -float("inf"))
        if ROW_STATS:
            m_new = tl.maximum(m_i, scores)
        else:
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # all masked so far: keep exp2 finite
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe)  # 0 where masked
        if ROW_STATS:
            acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)
            l_i = l_i * alpha + p
        else:
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
        if (blk == NB - 1) | (t == t1 - 1):
            if ROW_STATS:  # merge the row slots: one max, sum and output row for the head
                m_head = tl.max(m_i, axis=0)
                weights = tl.exp2(m_i - tl.where(m_head == -float("inf"), 0.0, m_head))  # 0 for empty slots
                l_head = tl.sum(l_i * weights, axis=0)
                acc_head = tl.sum(acc * weights[:, None], axis=0)
            else:
                m_head = m_i
                l_head = l_i
                acc_head = acc
            _flat_epilogue(
                q, m_head, l_head, acc_head, t, t0, pid, tiles_per_program, NB, H,
                K_NEW, V_NEW, OUT, O_PART, LSE_PART, COUNT,
                stride_knb, stride_knh, stride_vnb, stride_vnh, stride_outb, stride_outh, offs_d, d_mask,
                HEAD_DIM, BLOCK_C, MERGE,
            )


@dataclass
class DecodeConfig:
    """Launch parameters (``python -m bench.decode --phases kernel`` times both kernels at their defaults).

    ``kernel="flat"`` (default): one launch of ``_decode_flat_kernel``, a fixed number of resident programs
    that each stream a contiguous run of row tiles across heads (stream-K); heads cut between programs are
    merged by their last-arriving contributor (an atomic counter), so there is no second kernel.
    ``kernel="split"``: the previous path, ``_decode_split_kernel`` over (head, split) + ``_decode_merge_kernel``.
    """

    # split path. Its defaults were the best geometric mean of a 128-config sweep on an H100 (bench/results/decode_h100.json).
    block_n: int = 128  # cache rows per loop iteration
    num_warps: int = 8
    num_stages: int = 2
    programs_per_sm: int = 64  # split the rows until about this many programs per SM ...
    min_rows_per_split: int = 256  # ... but keep at least this many rows per program
    kernel: str = "flat"  # "flat" or "split"
    # flat path. Defaults: the best geometric mean of the H100 sweep (bench/results/gpu_decode_sweep_h100.json,
    # 2026-11-23): 32-row tiles, 4 warps, 4 resident programs per SM, per-row statistics (no barrier in the loop)
    # read the cache at 81-101% of the copy bandwidth (batch 64; 16K/64K context; dense, d16w256s4, d64w256s4).
    flat_block_n: int = 32  # cache rows per tile
    flat_num_warps: int = 4
    flat_num_stages: int = 1  # Triton does not pipeline these (non-dot) loads; flat_prefetch double-buffers instead
    flat_programs_per_sm: int = 4  # programs per SM, all resident at once (one wave): must fit the registers
    flat_prefetch: bool = False  # load tile t + 1 while computing tile t (registers double-buffered)
    flat_row_stats: bool = True  # softmax statistics per row slot, merged at the head's end: no per-tile reduction
    flat_whole_heads: bool = True  # whole heads per program (no merge) when that balances within whole_heads_slack
    flat_whole_heads_slack: float = 0.04
    flat_fit_resident: bool = True  # on CUDA, lower programs_per_sm to what the compiled kernel's registers allow


CONFIG = DecodeConfig()


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def split_plan(
    batch: int, heads: int, rows: int, device: torch.device, config: DecodeConfig | None = None
) -> tuple[int, int]:
    """(num_splits, rows_per_split) of the split path, from the static shapes only (CUDA-graph safe)."""
    config = config or CONFIG
    target = config.programs_per_sm * _num_sms(device) if device.type == "cuda" else 8
    max_splits = max(1, math.ceil(rows / config.min_rows_per_split))
    num_splits = min(max_splits, max(1, math.ceil(target / (batch * heads))))
    rows_per_split = math.ceil(math.ceil(rows / num_splits) / config.block_n) * config.block_n
    num_splits = max(1, math.ceil(rows / rows_per_split)) if rows else 1
    return num_splits, max(rows_per_split, config.block_n)


@dataclass(frozen=True)
class FlatPlan:
    """Work of the flat kernel: ``num_programs`` programs, program ``p`` owns tiles ``[p * tiles_per_program, ...)``."""

    tiles_per_head: int  # ceil(rows / block_n), at least 1
    total_tiles: int  # batch * heads * tiles_per_head
    tiles_per_program: int
    num_programs: int
    max_contributors: int  # most programs one head's tiles are spread over (1: no merge)

    @property
    def merge(self) -> bool:
        return self.max_contributors > 1


def flat_plan(
    batch: int, heads: int, rows: int, device: torch.device, config: DecodeConfig | None = None,
    programs_per_sm: int | None = None,
) -> FlatPlan:
    """The flat kernel's partition, from the static shapes only (CUDA-graph safe).

    ``slots = programs_per_sm * SMs`` programs run at once; the tiles are cut into at most that many equal
    runs (stream-K), or into runs of whole heads when that is within ``whole_heads_slack`` as long (no merge).
    """
    config = config or CONFIG
    nb = max(1, math.ceil(rows / config.flat_block_n))
    bh = batch * heads
    total = bh * nb
    per_sm = config.flat_programs_per_sm if programs_per_sm is None else programs_per_sm
    slots = max(1, per_sm * _num_sms(device))
    tpp = math.ceil(total / slots)  # stream-K: every program within one tile of the mean
    if config.flat_whole_heads:
        heads_per_program = math.ceil(bh / slots)
        if heads_per_program * nb <= tpp * (1.0 + config.flat_whole_heads_slack):
            tpp = heads_per_program * nb
    num_programs = math.ceil(total / tpp)
    if tpp % nb == 0:
        contributors = 1
    else:  # a head's nb consecutive tiles meet at most ceil((nb - 1) / tpp) + 1 runs
        contributors = min(num_programs, math.ceil((nb - 1) / tpp) + 1)
    return FlatPlan(nb, total, tpp, num_programs, contributors)


def _check_args(q, k_cache, v_cache, valid, k_new, v_new) -> bool:
    batch, heads, rows, head_dim = k_cache.shape
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        if t.stride(-1) != 1:
            raise ValueError(f"decode_attention_triton: {name} needs a unit stride on its last dim")
    has_mask = valid.dtype == torch.bool
    if has_mask and (valid.shape != (batch, rows) or valid.stride(-1) != 1):
        raise ValueError(f"decode_attention_triton: a valid mask must be [B, R] = {(batch, rows)} bool, unit last stride")
    if not has_mask and (valid.shape != (batch,) or valid.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"decode_attention_triton: valid counts must be [B] = ({batch},) int32/int64")
    return has_mask


def _split_forward(q, k_cache, v_cache, valid, k_new, v_new, scale, config: DecodeConfig) -> torch.Tensor:
    batch, heads, rows, head_dim = k_cache.shape
    has_mask = valid.dtype == torch.bool
    num_splits, rows_per_split = split_plan(batch, heads, rows, q.device, config)
    o_part = torch.empty(batch, heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(batch, heads, num_splits, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, heads, head_dim, dtype=q.dtype, device=q.device)
    block_d = triton.next_power_of_2(head_dim)
    qk_scale = scale * _LOG2E
    valid_arg = valid.view(torch.uint8) if has_mask else valid.contiguous()
    _decode_split_kernel[(batch * heads, num_splits)](
        q, k_cache, v_cache, valid_arg, o_part, lse_part,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        valid_arg.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        heads, rows, rows_per_split, qk_scale,
        HEAD_DIM=head_dim, BLOCK_N=config.block_n, BLOCK_D=block_d, HAS_MASK=has_mask,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    _decode_merge_kernel[(batch * heads,)](
        q, k_new, v_new, o_part, lse_part, out,
        q.stride(0), q.stride(1),
        k_new.stride(0), k_new.stride(1),
        v_new.stride(0), v_new.stride(1),
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1),
        heads, num_splits, qk_scale,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits),
        num_warps=4,
    )
    return out


def _flat_launch(q, k_cache, v_cache, valid, k_new, v_new, scale, config: DecodeConfig, plan: FlatPlan, warmup: bool,
                 nsub: int = 0):
    """Launch the flat kernel for ``plan`` (``warmup``: compile only and return the compiled kernel).

    ``nsub > 0``: ``valid`` is an int32 table of row spans ``[B*H, n_spans, 2]`` (first row, row count), each
    read as ``nsub`` tiles (``_flat_load_tile``'s ``SPANS``).
    """
    batch, heads, rows, head_dim = k_cache.shape
    has_mask = valid.dtype == torch.bool and not nsub
    out = torch.empty(batch, heads, head_dim, dtype=q.dtype, device=q.device)
    block_c = triton.next_power_of_2(plan.max_contributors)
    if plan.merge and not warmup:  # partials of the heads cut between programs, one arrival counter per head
        o_part = torch.empty(batch * heads, block_c, head_dim, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(batch * heads, block_c, dtype=torch.float32, device=q.device)
        count = torch.zeros(batch * heads, dtype=torch.int32, device=q.device)
    elif plan.merge:  # same types, nothing to allocate
        o_part = lse_part = torch.empty(1, dtype=torch.float32, device=q.device)
        count = torch.empty(1, dtype=torch.int32, device=q.device)
    else:  # never touched (MERGE is a compile-time False)
        o_part = lse_part = count = out
    valid_arg = valid.view(torch.uint8) if has_mask else valid.contiguous()
    args = (
        q, k_cache, v_cache, valid_arg, k_new, v_new, out, o_part, lse_part, count,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        valid_arg.stride(0),
        k_new.stride(0), k_new.stride(1),
        v_new.stride(0), v_new.stride(1),
        out.stride(0), out.stride(1),
        heads, rows, plan.tiles_per_head, plan.total_tiles, plan.tiles_per_program, max(nsub, 1), scale * _LOG2E,
    )  # fmt: skip
    kwargs = dict(
        HEAD_DIM=head_dim, BLOCK_N=config.flat_block_n, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_C=block_c,
        HAS_MASK=has_mask, MERGE=plan.merge, PREFETCH=config.flat_prefetch, ROW_STATS=config.flat_row_stats,
        SPANS=nsub > 0, num_warps=config.flat_num_warps, num_stages=config.flat_num_stages,
    )
    if warmup:
        return _decode_flat_kernel.warmup(*args, grid=(1,), **kwargs)
    _decode_flat_kernel[(plan.num_programs,)](*args, **kwargs)
    return out


_RESIDENT: dict[tuple, int] = {}


def resident_programs_per_sm(
    q, k_cache, v_cache, valid, k_new, v_new, config: DecodeConfig, plan: FlatPlan, compile: bool = True,
    nsub: int = 0,
) -> int:
    """How many programs of the flat kernel fit on one SM at once (registers, shared memory, threads), on CUDA.

    From the compiled kernel's register count; ``config.flat_programs_per_sm`` where that is not available
    (or not yet known and ``compile`` is False).
    """
    key = (q.device, q.dtype, k_cache.dtype, k_cache.shape[-1], valid.dtype == torch.bool, plan.merge,
           plan.max_contributors, config.flat_block_n, config.flat_num_warps, config.flat_num_stages,
           config.flat_prefetch, config.flat_row_stats, nsub > 0)  # fmt: skip
    if key not in _RESIDENT and not compile:
        return config.flat_programs_per_sm
    if key not in _RESIDENT:
        try:
            kernel = _flat_launch(q, k_cache, v_cache, valid, k_new, v_new, 1.0, config, plan, warmup=True, nsub=nsub)
            kernel._init_handles()
            props = torch.cuda.get_device_properties(q.device)
            warps = config.flat_num_warps
            regs_per_warp = math.ceil(max(int(kernel.n_regs), 1) * 32 / 256) * 256
            by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * warps)
            by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps)
            by_smem = getattr(props, "shared_memory_per_multiprocessor", 233472) // (int(kernel.metadata.shared) + 1024)
            _RESIDENT[key] = max(1, min(by_regs, by_threads, by_smem, 32))
        except Exception:  # an older/newer Triton without these attributes: trust the config
            _RESIDENT[key] = config.flat_programs_per_sm
    return _RESIDENT[key]


def _flat_forward(q, k_cache, v_cache, valid, k_new, v_new, scale, config: DecodeConfig, nsub: int = 0) -> torch.Tensor:
    """The flat kernel over the rows ``valid`` allows (a mask, counts, or with ``nsub`` a table of row spans)."""
    batch, heads, rows, _ = k_cache.shape
    if nsub:  # the plan counts tiles: nsub per span
        rows = valid.shape[1] * nsub * config.flat_block_n
    plan = flat_plan(batch, heads, rows, q.device, config)
    if q.is_cuda and config.flat_fit_resident:
        # One wave: every program resident from the start. Fewer programs per SM if the registers say so.
        # While a CUDA graph is being captured nothing is compiled or loaded (not allowed then): the eager
        # warm-up call before the capture has cached the count, which the same plan reuses.
        capturing = torch.cuda.is_current_stream_capturing()
        per_sm = config.flat_programs_per_sm
        for _ in range(2):  # the plan's MERGE changes the kernel (and its registers) at most once more
            fit = resident_programs_per_sm(q, k_cache, v_cache, valid, k_new, v_new, config, plan, not capturing, nsub)
            if fit >= per_sm:
                break
            per_sm = fit
            plan = flat_plan(batch, heads, rows, q.device, config, programs_per_sm=per_sm)
    return _flat_launch(q, k_cache, v_cache, valid, k_new, v_new, scale, config, plan, warmup=False, nsub=nsub)


@torch.library.custom_op("ratplus::decode_attention", mutates_args=())
def _decode_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    valid: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    _check_args(q, k_cache, v_cache, valid, k_new, v_new)
    config = CONFIG
    if config.kernel == "split":
        return _split_forward(q, k_cache, v_cache, valid, k_new, v_new, scale, config)
    if config.kernel == "flat":
        return _flat_forward(q, k_cache, v_cache, valid, k_new, v_new, scale, config)
    raise ValueError(f"decode_attention_triton: kernel {config.kernel!r} is unknown: allowed values are flat, split")


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, valid, k_new, v_new, scale):
    return torch.empty_like(q)


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    valid: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """``[B, H, hd]`` attention of ``q`` over the valid cache rows plus the new row (Triton)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _decode_attention_op(q, k_cache, v_cache, valid, k_new, v_new, float(scale))


# --------------------------------------------------------------------------------------
# cache update: one launch per layer and step instead of a dozen small gathers/scatters
# --------------------------------------------------------------------------------------
@triton.jit
def _cache_update_kernel(
    K, V, K_NEW, V_NEW, MOVE_SRC, MOVE_DST, MOVE, SLOT, WRITE,
    stride_kb, stride_kh, stride_kr,
    stride_vb, stride_vh, stride_vr,
    stride_knb, stride_knh,
    stride_vnb, stride_vnh,
    H,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MOVE_FROM_NEW: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    zeros = tl.zeros([BLOCK_D], dtype=tl.int32)
    move_mask = d_mask & ((zeros + tl.load(MOVE + b).to(tl.int32)) != 0)  # [BLOCK_D]
    write_mask = d_mask & ((zeros + tl.load(WRITE + b).to(tl.int32)) != 0)
    src = tl.load(MOVE_SRC + b).to(tl.int64)
    dst = tl.load(MOVE_DST + b).to(tl.int64)
    slot = tl.load(SLOT + b).to(tl.int64)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    k_new = tl.load(K_NEW + b * stride_knb + h * stride_knh + offs_d, mask=d_mask)
    v_new = tl.load(V_NEW + b * stride_vnb + h * stride_vnh + offs_d, mask=d_mask)
    if MOVE_FROM_NEW:
        k_src = k_new
        v_src = v_new
    else:
        k_src = tl.load(k_base + src * stride_kr + offs_d, mask=move_mask)
        v_src = tl.load(v_base + src * stride_vr + offs_d, mask=move_mask)
    tl.store(k_base + dst * stride_kr + offs_d, k_src.to(K.dtype.element_ty), mask=move_mask)
    tl.store(v_base + dst * stride_vr + offs_d, v_src.to(V.dtype.element_ty), mask=move_mask)
    tl.debug_barrier()  # the moved row is read before the new row may overwrite its slot
    tl.store(k_base + slot * stride_kr + offs_d, k_new.to(K.dtype.element_ty), mask=write_mask)
    tl.store(v_base + slot * stride_vr + offs_d, v_new.to(V.dtype.element_ty), mask=write_mask)


@torch.library.custom_op("ratplus::decode_cache_update", mutates_args=("k_cache", "v_cache"))
def _cache_update_op(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    move_src: torch.Tensor,
    move_dst: torch.Tensor,
    move: torch.Tensor,
    slot: torch.Tensor,
    write: torch.Tensor,
    move_from_new: bool,
) -> None:
    batch, heads, _, head_dim = k_cache.shape
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        if t.stride(-1) != 1:
            raise ValueError(f"cache_update_triton: {name} needs a unit stride on its last dim")
    move_src, move_dst, slot = (t.contiguous() for t in (move_src, move_dst, slot))
    move_u8, write_u8 = move.contiguous().view(torch.uint8), write.contiguous().view(torch.uint8)
    _cache_update_kernel[(batch * heads,)](
        k_cache, v_cache, k_new, v_new, move_src, move_dst, move_u8, slot, write_u8,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_new.stride(0), k_new.stride(1),
        v_new.stride(0), v_new.stride(1),
        heads,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), MOVE_FROM_NEW=move_from_new,
        num_warps=1,
    )  # fmt: skip


def cache_update_triton(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    move_src: torch.Tensor,
    move_dst: torch.Tensor,
    move: torch.Tensor,
    slot: torch.Tensor,
    write: torch.Tensor,
    move_from_new: bool = False,
) -> None:
    """``decode.cache_update_reference``'s contract in one Triton launch (one program per sequence and head)."""
    _cache_update_op(k_cache, v_cache, k_new, v_new, move_src, move_dst, move, slot, write, bool(move_from_new))
