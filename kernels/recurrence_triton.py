"""Triton kernels for the gated recurrence of the RAT+ layer (DESIGN §1 step 3), forward and backward.

Per channel, fp32 state starting at zero::

    a_t = sigmoid(f_t);  K_t = a_t K_{t-1} + (1 - a_t) k_t;  V_t = a_t V_{t-1} + (1 - a_t) x_t

Inputs are ``[B, T, H, hd]`` views with a unit last stride (any strides for B, T, H: in the
model they are ``fused.view(B, T, H, 5, hd).unbind(3)``); bf16 or fp32. Outputs are
contiguous ``[B, T, H, hd]`` in the input dtype.

**Design: one pass over the data, chunked over T, with decoupled look-back.** A tile is
``CHUNK`` time steps x ``BLOCK_C`` channels of one batch row (inside one head when ``hd`` allows,
so loads are 16 bytes per thread). Tiles are handed out in time order by an atomic counter (so
a program only ever waits on tiles that running programs already own). For each tile:

1. load it once (``f, k, x``), compute ``a`` and ``1 - a`` from one exp, and scan it along T
   with ``tl.associative_scan`` over the affine maps ``s -> a s + (1-a) k`` (key and value
   share the gate product);
2. publish the tile's aggregate (gate product, local end states) and flag it;
3. look back over earlier chunks of the same channels: fold in aggregates until a chunk that
   has published its *inclusive* end state, which gives this chunk's start state; publish
   this chunk's inclusive end state at once (that store is also the fp32 chunk-boundary state
   the backward needs, 8 bytes per channel per chunk);
4. fix the tile up (``K_t = K_local_t + prod(a) * K_start``) and write ``K, V``.

Each input element is read once and each output written once; the look-back traffic is a
few fp32 values per channel per chunk. There are ``T/CHUNK x B*H*hd/BLOCK_C`` tiles: 2048
channels at T = 256K give 262K tiles of 32 x 64. Programs are one per tile (default), or
persistent (``programs per SM`` > 0 in the configs) and then load their next tile while they
wait on the look-back of the current one.

Measured on an H100 (bench/results/scan_check_H100.json and kernels_H100.json, 2026-11-23):
at [4, 16384, 16, 128] bf16 the forward moves its bytes at 63% of the device-to-device copy
bandwidth (0.705 ms) and the backward at 52% (1.37 ms); 54% / 47% at [1, 262144, 16, 128].
Smaller tiles and fewer warps run faster (a program's life is latency: load, cross-lane scan,
look-back round trips), up to the point where per-tile costs dominate. Two variants were timed
and rejected (scan_check_H100_rejected.json): storing the aggregate and inclusive rows straight
from the tile instead of the cross-row sums (backward 1.7x slower), and a vectorized look-back
that reads 4-16 chunk flags at once and composes them with one scan (forward 1.45x slower).

The backward runs the same scheme in reverse time. Per tile it recomputes the forward
scan from the saved chunk-start states (no fp32 intermediates over T are stored), runs
the reverse scan of ``G_t = gK_t + a_{t+1} G_{t+1}`` (``a_{t+1}`` from a one-row-shifted
load of ``f`` that hits the cache) with look-back over *later* chunks, and writes::

    dk_t = G_t (1 - a_t);   dx_t = G^V_t (1 - a_t)
    df_t = (G_t (K_{t-1} - k_t) + G^V_t (V_{t-1} - x_t)) a_t (1 - a_t)
         = (G_t (K_t - k_t) + G^V_t (V_t - x_t)) (1 - a_t)       [a_t (K_{t-1} - k_t) = K_t - k_t]

Memory ordering of the look-back: all threads store the payload, a CTA barrier, then one
release atomic sets the flag; readers spin on an acquire atomic (block-uniform), then read
the payload with L2-only loads (``.cg``). Under ``TRITON_INTERPRET=1`` programs run one at
a time in counter order, so every look-back finds its predecessor finished.

``recurrence_triton`` is the entry point; the ops are ``torch.ops.ratplus.recurrence_scan``
and ``torch.ops.ratplus.recurrence_scan_backward`` (``torch.library.custom_op`` with fakes
and an autograd formula), so ``torch.compile`` traces through them without a graph break
and activation checkpointing recomputes the forward like any other op.
``recurrence_step_triton`` is the fused single-token decode update.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ratplus_titan.kernels.recurrence import recurrence_reference

# Publish the inclusive state of every ``_INCLUSIVE_EVERY``-th chunk only (and the aggregate of
# all): 1 in production; tests raise it so the look-back must walk over aggregates.
_INCLUSIVE_EVERY = 1


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _affine_combine(a1, k1, v1, a2, k2, v2):
    """Compose ``s -> a1 s + k1`` (earlier) with ``s -> a2 s + k2`` (later)."""
    return a1 * a2, a2 * k1 + k2, a2 * v1 + v2


@triton.jit
def _gates(f):
    """``(sigmoid(f), 1 - sigmoid(f))`` in fp32, both accurate, from one exp; no overflow."""
    e = tl.exp(-tl.abs(f))
    r = tl.fdiv(1.0, 1.0 + e)  # approximate division (2 ulp), not the IEEE sequence
    big = r  # sigmoid(|f|)
    small = e * r  # sigmoid(-|f|)
    pos = f >= 0
    return tl.where(pos, big, small), tl.where(pos, small, big)


@triton.jit
def _pick(values, index, which):
    """Row ``which`` of a ``[CHUNK, BLOCK_C]`` tile (``index`` enumerates the rows)."""
    return tl.sum(tl.where(index[:, None] == which, values, 0.0), axis=0)


@triton.jit
def _publish(flag_ptr, status, payload_ok):
    """Make this program's payload stores visible, then set ``flag = status`` (release)."""
    tl.debug_barrier()
    if payload_ok:
        tl.atomic_xchg(flag_ptr, status, sem="release")


@triton.jit
def _look_back(
    flag_ptr,
    agg_ptr,
    incl_ptr,
    first,
    last,
    step,
    flag_stride,
    agg_stride,
    incl_stride,
    incl_which_stride,
    cols,
    col_mask,
    BLOCK_C: tl.constexpr,
):
    """Fold chunks ``first, first+step, ...`` (towards ``last``, exclusive) until an inclusive state.

    Chunk ``j``'s aggregate maps the state entering it to the state leaving it:
    ``s -> A_j s + K_j``. Returns the state entering the current chunk (zero beyond ``last``).
    """
    run_a = tl.full([BLOCK_C], 1.0, tl.float32)
    run_k = tl.zeros([BLOCK_C], tl.float32)
    run_v = tl.zeros([BLOCK_C], tl.float32)
    j = first
    while j != last:
        status = tl.atomic_add(flag_ptr + j * flag_stride, 0, sem="acquire")
        if status == 2:
            inc = incl_ptr + j * incl_stride + cols
            pk = tl.load(inc, mask=col_mask, other=0.0, cache_modifier=".cg")
            pv = tl.load(inc + incl_which_stride, mask=col_mask, other=0.0, cache_modifier=".cg")
            run_k = run_k + run_a * pk
            run_v = run_v + run_a * pv
            j = last
        elif status == 1:
            agg = agg_ptr + j * agg_stride + tl.arange(0, BLOCK_C)
            ga = tl.load(agg, cache_modifier=".cg")
            gk = tl.load(agg + BLOCK_C, cache_modifier=".cg")
            gv = tl.load(agg + 2 * BLOCK_C, cache_modifier=".cg")
            run_k = run_k + run_a * gk
            run_v = run_v + run_a * gv
            run_a = run_a * ga
            j = j + step
    return run_k, run_v


@triton.jit
def _tile_coords(tile, NC, NCB, NCB_B, C, HD: tl.constexpr, BLOCK_C: tl.constexpr, REVERSE: tl.constexpr):
    """Chunk, (batch, channel block) and channels ``ch = head * HD + d`` of tile number ``tile``.

    Tiles are numbered in time order (reverse time for the backward). ``head`` is a scalar and
    ``d`` contiguous when the block lies in one head (``HD % BLOCK_C == 0``: 16-byte loads).
    """
    chunk = tile // NCB
    if REVERSE:
        chunk = NC - 1 - chunk
    cb = tile % NCB
    b = (cb // NCB_B).to(tl.int64)
    ch0 = (cb % NCB_B) * BLOCK_C
    if HD % BLOCK_C == 0:
        head = ch0 // HD
        d = ch0 % HD + tl.arange(0, BLOCK_C)
        ch = head * HD + d
    else:
        ch = ch0 + tl.arange(0, BLOCK_C)
        head = ch // HD
        d = ch % HD
    return chunk, cb, b, ch, ch < C, head, d


@triton.jit
def _load_tile(ptr, b, row0, head, d, row_ok, col_ok, s_b, s_t: tl.constexpr, s_h, CHUNK: tl.constexpr):
    """``[CHUNK, BLOCK_C]`` rows ``row0 ..`` of a ``[B, T, H, hd]`` view (zeros where masked)."""
    base = ptr + (b * s_b + row0.to(tl.int64) * s_t) + (head * s_h + d)
    rows = tl.arange(0, CHUNK)
    return tl.load(base[None, :] + rows[:, None] * s_t, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _store_tile(ptr, values, b, row0, T, ch, row_ok, col_ok, C: tl.constexpr, CHUNK: tl.constexpr):
    """Store a tile into a contiguous ``[B, T, C]`` output."""
    base = ptr + ((b * T + row0.to(tl.int64)) * C + ch)
    rows = tl.arange(0, CHUNK)
    tl.store(base[None, :] + rows[:, None] * C, values.to(ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _scan_fwd_kernel(
    f_ptr,
    k_ptr,
    x_ptr,
    out_k_ptr,
    out_v_ptr,
    state_ptr,  # [NC, 2, B, C] fp32: state at the end of each chunk
    agg_ptr,  # [NC, NCB, 3, BLOCK_C] fp32: each tile's aggregate
    flag_ptr,  # [1 + NC * NCB] int32, zeroed: tile counter, then one flag per tile
    T,
    C: tl.constexpr,
    NCB_B,
    NCB,
    NC,
    BC,
    s_fb,
    s_ft: tl.constexpr,
    s_fh,
    s_kb,
    s_kt: tl.constexpr,
    s_kh,
    s_xb,
    s_xt: tl.constexpr,
    s_xh,
    HD: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INCLUSIVE_EVERY: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    # Persistent: each program takes tiles from the counter in time order until none is left,
    # and loads the next tile while it waits on the look-back of the current one.
    total = NC * NCB
    rows = tl.arange(0, CHUNK)
    offs_c = tl.arange(0, BLOCK_C)
    tile = tl.atomic_add(flag_ptr, 1)
    chunk, cb, b, ch, col_ok, head, d = _tile_coords(tile, NC, NCB, NCB_B, C, HD, BLOCK_C, False)
    row_ok = chunk * CHUNK + rows < T
    f = _load_tile(f_ptr, b, chunk * CHUNK, head, d, row_ok, col_ok, s_fb, s_ft, s_fh, CHUNK)
    k = _load_tile(k_ptr, b, chunk * CHUNK, head, d, row_ok, col_ok, s_kb, s_kt, s_kh, CHUNK)
    x = _load_tile(x_ptr, b, chunk * CHUNK, head, d, row_ok, col_ok, s_xb, s_xt, s_xh, CHUNK)
    while tile < total:
        chunk, cb, b, ch, col_ok, head, d = _tile_coords(tile, NC, NCB, NCB_B, C, HD, BLOCK_C, False)
        row0 = chunk * CHUNK
        row_ok = row0 + rows < T
        if PREFETCH:
            nxt = tl.atomic_add(flag_ptr, 1)
        else:
            nxt = total + tile * 0  # one tile per program

        # 1. gates, scan of the tile along T (affine maps s -> a s + (1-a) k), publish the aggregate
        a, om = _gates(f.to(tl.float32))
        a = tl.where(row_ok[:, None], a, 1.0)  # rows past T: identity maps
        om = tl.where(row_ok[:, None], om, 0.0)
        cum_a, loc_k, loc_v = tl.associative_scan((a, om * k.to(tl.float32), om * x.to(tl.float32)), 0, _affine_combine)
        agg_a = _pick(cum_a, rows, CHUNK - 1)  # rows past T are identities: the last row is the aggregate
        agg_k = _pick(loc_k, rows, CHUNK - 1)
        agg_v = _pick(loc_v, rows, CHUNK - 1)
        flag_row = flag_ptr + 1 + cb  # + j * NCB for chunk j
        agg_base = agg_ptr + cb * (3 * BLOCK_C)  # + j * NCB * 3 * BLOCK_C for chunk j
        agg_here = agg_base + chunk.to(tl.int64) * NCB * 3 * BLOCK_C + offs_c
        tl.store(agg_here, agg_a)
        tl.store(agg_here + BLOCK_C, agg_k)
        tl.store(agg_here + 2 * BLOCK_C, agg_v)
        _publish(flag_row + chunk * NCB, 1, True)

        # 2. prefetch the next tile (masked off past the last one)
        if PREFETCH:
            n_chunk, _, n_b, _, n_col_ok, n_head, n_d = _tile_coords(nxt, NC, NCB, NCB_B, C, HD, BLOCK_C, False)
            n_row_ok = n_chunk * CHUNK + rows < T
            n_row0 = n_chunk * CHUNK
            f = _load_tile(f_ptr, n_b, n_row0, n_head, n_d, n_row_ok, n_col_ok, s_fb, s_ft, s_fh, CHUNK)
            k = _load_tile(k_ptr, n_b, n_row0, n_head, n_d, n_row_ok, n_col_ok, s_kb, s_kt, s_kh, CHUNK)
            x = _load_tile(x_ptr, n_b, n_row0, n_head, n_d, n_row_ok, n_col_ok, s_xb, s_xt, s_xh, CHUNK)

        # 3. look back to the state entering this chunk; publish the inclusive end state
        incl_base = state_ptr + b * C  # + j * 2 * BC (+ BC for V)
        start_k, start_v = _look_back(
            flag_row,
            agg_base,
            incl_base,
            chunk - 1,
            chunk * 0 - 1,
            -1,
            NCB,
            NCB * 3 * BLOCK_C,
            2 * BC,
            BC,
            ch,
            col_ok,
            BLOCK_C,
        )
        incl_here = incl_base + chunk.to(tl.int64) * 2 * BC + ch
        tl.store(incl_here, agg_a * start_k + agg_k, mask=col_ok)
        tl.store(incl_here + BC, agg_a * start_v + agg_v, mask=col_ok)
        _publish(flag_row + chunk * NCB, 2, (chunk % INCLUSIVE_EVERY) == 0)

        # 4. fix up and write
        _store_tile(out_k_ptr, loc_k + cum_a * start_k[None, :], b, row0, T, ch, row_ok, col_ok, C, CHUNK)
        _store_tile(out_v_ptr, loc_v + cum_a * start_v[None, :], b, row0, T, ch, row_ok, col_ok, C, CHUNK)
        tile = nxt


@triton.jit
def _bwd_forward_part(f, k, x, state_ptr, chunk, b, ch, row_ok, col_ok, C: tl.constexpr, BC):
    """Recompute the tile's forward states from the saved chunk-start state.

    Returns ``1 - a_t`` and ``(K_t - k_t)(1 - a_t)``, ``(V_t - x_t)(1 - a_t)``: the gate gradient is
    ``G_t (K_t - k_t)(1 - a_t) + G^V_t (V_t - x_t)(1 - a_t)`` since ``a_t (K_{t-1} - k_t) = K_t - k_t``.
    """
    a, om = _gates(f.to(tl.float32))
    a = tl.where(row_ok[:, None], a, 1.0)
    om = tl.where(row_ok[:, None], om, 0.0)
    k32 = k.to(tl.float32)
    x32 = x.to(tl.float32)
    prev = tl.maximum(chunk - 1, 0).to(tl.int64)
    start = state_ptr + prev * 2 * BC + b * C + ch
    start_k = tl.where(chunk > 0, tl.load(start, mask=col_ok, other=0.0), 0.0)
    start_v = tl.where(chunk > 0, tl.load(start + BC, mask=col_ok, other=0.0), 0.0)
    cum_a, loc_k, loc_v = tl.associative_scan((a, om * k32, om * x32), 0, _affine_combine)
    diff_k = (loc_k + cum_a * start_k[None, :] - k32) * om
    diff_v = (loc_v + cum_a * start_v[None, :] - x32) * om
    return om, diff_k, diff_v


@triton.jit
def _scan_bwd_kernel(
    f_ptr,
    k_ptr,
    x_ptr,
    gk_ptr,
    gv_ptr,
    df_ptr,
    dk_ptr,
    dx_ptr,
    state_ptr,  # [NC, 2, B, C] fp32 from the forward: state at the end of each chunk
    agg_ptr,  # [NC, NCB, 3, BLOCK_C] fp32 workspace
    incl_ptr,  # [NC, 2, B, C] fp32 workspace: gradient state entering each chunk's first row
    flag_ptr,  # [1 + NC * NCB] int32, zeroed
    T,
    C: tl.constexpr,
    NCB_B,
    NCB,
    NC,
    BC,
    s_fb,
    s_ft: tl.constexpr,
    s_fh,
    s_kb,
    s_kt: tl.constexpr,
    s_kh,
    s_xb,
    s_xt: tl.constexpr,
    s_xh,
    s_gkb,
    s_gkt: tl.constexpr,
    s_gkh,
    s_gvb,
    s_gvt: tl.constexpr,
    s_gvh,
    HD: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INCLUSIVE_EVERY: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    total = NC * NCB
    rows = tl.arange(0, CHUNK)
    offs_c = tl.arange(0, BLOCK_C)
    tile = tl.atomic_add(flag_ptr, 1)
    chunk, cb, b, ch, col_ok, head, d = _tile_coords(tile, NC, NCB, NCB_B, C, HD, BLOCK_C, True)
    row_ok = (chunk * CHUNK + rows < T) & (rows * 0 + tile < total)  # vector compares only
    gk = _load_tile(gk_ptr, b, chunk * CHUNK, head, d, row_ok, col_ok, s_gkb, s_gkt, s_gkh, CHUNK)
    gv = _load_tile(gv_ptr, b, chunk * CHUNK, head, d, row_ok, col_ok, s_gvb, s_gvt, s_gvh, CHUNK)
    f = _load_tile(f_ptr, b, chunk * CHUNK, head, d, row_ok, col_ok, s_fb, s_ft, s_fh, CHUNK)
    k = _load_tile(k_ptr, b, chunk * CHUNK, head, d, row_ok, col_ok, s_kb, s_kt, s_kh, CHUNK)
    x = _load_tile(x_ptr, b, chunk * CHUNK, head, d, row_ok, col_ok, s_xb, s_xt, s_xh, CHUNK)
    while tile < total:
        chunk, cb, b, ch, col_ok, head, d = _tile_coords(tile, NC, NCB, NCB_B, C, HD, BLOCK_C, True)
        row0 = chunk * CHUNK
        row_ok = row0 + rows < T
        next_ok = row0 + rows + 1 < T
        if PREFETCH:
            nxt = tl.atomic_add(flag_ptr, 1)
        else:
            nxt = total + tile * 0  # one tile per program

        # 1. reverse scan of G_t = g_t + a_{t+1} G_{t+1} in the tile; publish its aggregate (first row)
        f_next = _load_tile(f_ptr, b, row0 + 1, head, d, next_ok, col_ok, s_fb, s_ft, s_fh, CHUNK)  # cache hits
        a_next, _ = _gates(f_next.to(tl.float32))
        a_next = tl.where(next_ok[:, None], a_next, 0.0)  # G_{T-1} = gK_{T-1}
        cum_b, loc_gk, loc_gv = tl.associative_scan(
            (a_next, gk.to(tl.float32), gv.to(tl.float32)), 0, _affine_combine, reverse=True
        )
        agg_b = _pick(cum_b, rows, 0)
        agg_gk = _pick(loc_gk, rows, 0)
        agg_gv = _pick(loc_gv, rows, 0)
        flag_row = flag_ptr + 1 + cb
        agg_base = agg_ptr + cb * (3 * BLOCK_C)
        agg_here = agg_base + chunk.to(tl.int64) * NCB * 3 * BLOCK_C + offs_c
        tl.store(agg_here, agg_b)
        tl.store(agg_here + BLOCK_C, agg_gk)
        tl.store(agg_here + 2 * BLOCK_C, agg_gv)
        _publish(flag_row + chunk * NCB, 1, True)

        # 2. forward states of this tile (before the prefetch reuses f, k, x)
        if PREFETCH:
            om, diff_k, diff_v = _bwd_forward_part(f, k, x, state_ptr, chunk, b, ch, row_ok, col_ok, C, BC)

        # 3. prefetch the next tile (masked off past the last one)
        if PREFETCH:
            n_chunk, _, n_b, _, n_col_ok, n_head, n_d = _tile_coords(nxt, NC, NCB, NCB_B, C, HD, BLOCK_C, True)
            n_row_ok = (n_chunk * CHUNK + rows < T) & (rows * 0 + nxt < total)
            n_row0 = n_chunk * CHUNK
            gk = _load_tile(gk_ptr, n_b, n_row0, n_head, n_d, n_row_ok, n_col_ok, s_gkb, s_gkt, s_gkh, CHUNK)
            gv = _load_tile(gv_ptr, n_b, n_row0, n_head, n_d, n_row_ok, n_col_ok, s_gvb, s_gvt, s_gvh, CHUNK)
            f = _load_tile(f_ptr, n_b, n_row0, n_head, n_d, n_row_ok, n_col_ok, s_fb, s_ft, s_fh, CHUNK)
            k = _load_tile(k_ptr, n_b, n_row0, n_head, n_d, n_row_ok, n_col_ok, s_kb, s_kt, s_kh, CHUNK)
            x = _load_tile(x_ptr, n_b, n_row0, n_head, n_d, n_row_ok, n_col_ok, s_xb, s_xt, s_xh, CHUNK)

        # 4. look back over later chunks to the gradient state entering this chunk from the right
        incl_base = incl_ptr + b * C
        carry_k, carry_v = _look_back(
            flag_row,
            agg_base,
            incl_base,
            chunk + 1,
            NC,
            1,
            NCB,
            NCB * 3 * BLOCK_C,
            2 * BC,
            BC,
            ch,
            col_ok,
            BLOCK_C,
        )
        incl_here = incl_base + chunk.to(tl.int64) * 2 * BC + ch
        tl.store(incl_here, agg_b * carry_k + agg_gk, mask=col_ok)
        tl.store(incl_here + BC, agg_b * carry_v + agg_gv, mask=col_ok)
        _publish(flag_row + chunk * NCB, 2, ((NC - 1 - chunk) % INCLUSIVE_EVERY) == 0)

        # 5. gradients (without prefetch, the forward part waits here: bf16 tiles are cheaper to keep)
        if not PREFETCH:
            om, diff_k, diff_v = _bwd_forward_part(f, k, x, state_ptr, chunk, b, ch, row_ok, col_ok, C, BC)
        grad_k = loc_gk + cum_b * carry_k[None, :]
        grad_v = loc_gv + cum_b * carry_v[None, :]
        _store_tile(df_ptr, grad_k * diff_k + grad_v * diff_v, b, row0, T, ch, row_ok, col_ok, C, CHUNK)
        _store_tile(dk_ptr, grad_k * om, b, row0, T, ch, row_ok, col_ok, C, CHUNK)
        _store_tile(dx_ptr, grad_v * om, b, row0, T, ch, row_ok, col_ok, C, CHUNK)
        tile = nxt


@triton.jit
def _step_kernel(
    f_ptr,
    k_ptr,
    x_ptr,
    ks_ptr,
    vs_ptr,
    out_k_ptr,
    out_v_ptr,
    N,
    s_f,
    s_k,
    s_x,
    s_ks,
    s_vs,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    a, om = _gates(tl.load(f_ptr + row * s_f + cols, mask=ok, other=0.0).to(tl.float32))
    k = tl.load(k_ptr + row * s_k + cols, mask=ok, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * s_x + cols, mask=ok, other=0.0).to(tl.float32)
    ks = tl.load(ks_ptr + row * s_ks + cols, mask=ok, other=0.0)
    vs = tl.load(vs_ptr + row * s_vs + cols, mask=ok, other=0.0)
    tl.store(out_k_ptr + row * N + cols, a * ks + om * k, mask=ok)
    tl.store(out_v_ptr + row * N + cols, a * vs + om * x, mask=ok)


# --------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------

# Per input dtype: forward (chunk, block_c cap, warps, programs per SM, 0 = one program per tile);
# backward (block_c cap, warps, programs per SM), same chunk. bf16 from the H100 sweep of this tile
# layout (bench/results/scan_check_H100.json, 2026-11-23: forward (16, 64, 2) and backward (16, 64, 2)
# were the fastest pair sharing a chunk); persistent programs (programs per SM > 0) were slower.
_FWD_CONFIG = {torch.bfloat16: (16, 64, 2, 0), torch.float16: (16, 64, 2, 0), torch.float32: (32, 32, 2, 0)}
_BWD_CONFIG = {torch.bfloat16: (64, 2, 0), torch.float16: (64, 2, 0), torch.float32: (32, 2, 0)}


def _pow2_at_least(n: int, low: int) -> int:
    return max(low, triton.next_power_of_2(n))


def _block_c(head_dim: int, channels: int, cap: int) -> int:
    """Channels per tile: a power of two dividing ``head_dim`` (tiles inside one head, vector loads)
    when one of 16 or more exists, else a power of two over whole rows of heads."""
    in_head = head_dim & -head_dim
    if in_head >= min(cap, 16):
        return min(cap, in_head)
    return min(cap, _pow2_at_least(channels, 16))


def _config(dtype: torch.dtype, table: dict) -> tuple:
    return table.get(dtype, table[torch.float32])


def default_tiles(seq_len: int, heads: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """``(chunk, block_c, bwd_block_c)``: time steps per tile, channels per forward and backward tile."""
    chunk, fwd_cap = _config(dtype, _FWD_CONFIG)[:2]
    bwd_cap = _config(dtype, _BWD_CONFIG)[0]
    channels = heads * head_dim
    chunk = min(chunk, _pow2_at_least(seq_len, 1))
    return chunk, _block_c(head_dim, channels, fwd_cap), _block_c(head_dim, channels, bwd_cap)


def default_configs(shape, dtype: torch.dtype) -> tuple[tuple, tuple]:
    """Launch configs for ``[B, T, H, hd]`` inputs: ``_scan_fwd(f, k, x, *fwd)``, ``_scan_bwd(..., *bwd)``."""
    chunk, block_c, bwd_block_c = default_tiles(*shape[1:], dtype)
    return (chunk, block_c, *_config(dtype, _FWD_CONFIG)[2:]), (chunk, bwd_block_c, *_config(dtype, _BWD_CONFIG)[1:])


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _launch_args(device, head_dim, total_tiles, chunk, block_c, warps, per_sm):
    """``per_sm`` > 0: persistent programs (that many per SM) that prefetch their next tile;
    0: one program per tile."""
    grid = (max(1, min(total_tiles, _num_sms(device) * per_sm)) if per_sm else total_tiles,)
    meta = dict(HD=head_dim, CHUNK=chunk, BLOCK_C=block_c, INCLUSIVE_EVERY=_INCLUSIVE_EVERY, num_warps=warps)
    return grid, dict(meta, PREFETCH=per_sm > 0)


def _scan_fwd(f, k, x, chunk, block_c, warps, per_sm):
    """Forward launch: ``(K, V, chunk-end states)``."""
    batch, seq_len, heads, head_dim = k.shape
    f, k, x = (_unit_last_stride(t) for t in (f, k, x))
    channels = heads * head_dim
    n_chunks = triton.cdiv(seq_len, chunk)
    ncb_b = triton.cdiv(channels, block_c)
    ncb = batch * ncb_b
    out_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    out_v = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    states = torch.empty(n_chunks, 2, batch, heads, head_dim, dtype=torch.float32, device=k.device)
    if out_k.numel() == 0:
        return out_k, out_v, states
    agg = torch.empty(n_chunks * ncb * 3 * block_c, dtype=torch.float32, device=k.device)
    flags = torch.zeros(1 + n_chunks * ncb, dtype=torch.int32, device=k.device)
    grid, meta = _launch_args(k.device, head_dim, n_chunks * ncb, chunk, block_c, warps, per_sm)
    _scan_fwd_kernel[grid](
        f, k, x, out_k, out_v, states, agg, flags,
        seq_len, channels, ncb_b, ncb, n_chunks, batch * channels,
        *_strides(f), *_strides(k), *_strides(x), **meta,
    )  # fmt: skip
    return out_k, out_v, states


def _scan_bwd(f, k, x, states, gk, gv, chunk, block_c, warps, per_sm):
    """Backward launch: ``(d gate_logits, d keys, d values)``."""
    batch, seq_len, heads, head_dim = k.shape
    f, k, x, gk, gv = (_unit_last_stride(t) for t in (f, k, x, gk, gv))
    channels = heads * head_dim
    n_chunks = states.shape[0]
    ncb_b = triton.cdiv(channels, block_c)
    ncb = batch * ncb_b
    d_f = torch.empty(f.shape, dtype=f.dtype, device=f.device)
    d_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    d_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if d_k.numel() == 0:
        return d_f, d_k, d_x
    incl = torch.empty_like(states)
    agg = torch.empty(n_chunks * ncb * 3 * block_c, dtype=torch.float32, device=k.device)
    flags = torch.zeros(1 + n_chunks * ncb, dtype=torch.int32, device=k.device)
    grid, meta = _launch_args(k.device, head_dim, n_chunks * ncb, chunk, block_c, warps, per_sm)
    _scan_bwd_kernel[grid](
        f, k, x, gk, gv, d_f, d_k, d_x, states, agg, incl, flags,
        seq_len, channels, ncb_b, ncb, n_chunks, batch * channels,
        *_strides(f), *_strides(k), *_strides(x), *_strides(gk), *_strides(gv), **meta,
    )  # fmt: skip
    return d_f, d_k, d_x


# --------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------


def _check(gate_logits, keys, values):
    if not (gate_logits.shape == keys.shape == values.shape) or keys.dim() != 4:
        raise ValueError(f"expected three [B, T, H, hd] tensors, got {gate_logits.shape}, {keys.shape}, {values.shape}")


@torch.library.custom_op("ratplus::recurrence_scan", mutates_args=())
def recurrence_scan(
    gate_logits: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chunk: int, block_c: int, bwd_block_c: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(K, V, states)``: ``[B, T, H, hd]`` outputs and the fp32 ``[T/chunk, 2, B, H, hd]`` chunk-end states.

    ``bwd_block_c`` is the backward's channels per tile (used by the autograd formula only).
    """
    _check(gate_logits, keys, values)
    warps, per_sm = _config(keys.dtype, _FWD_CONFIG)[2:]
    return _scan_fwd(gate_logits, keys, values, chunk, block_c, warps, per_sm)


@recurrence_scan.register_fake
def _(gate_logits, keys, values, chunk, block_c, bwd_block_c):
    _check(gate_logits, keys, values)
    batch, seq_len, heads, head_dim = keys.shape
    n_chunks = (seq_len + chunk - 1) // chunk
    states = keys.new_empty(n_chunks, 2, batch, heads, head_dim, dtype=torch.float32)
    return keys.new_empty(keys.shape), values.new_empty(values.shape), states


@torch.library.custom_op("ratplus::recurrence_scan_backward", mutates_args=())
def recurrence_scan_backward(
    gate_logits: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    states: torch.Tensor,
    grad_key_states: torch.Tensor,
    grad_value_states: torch.Tensor,
    chunk: int,
    block_c: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(d gate_logits, d keys, d values)`` of ``recurrence_scan``'s ``(K, V)``."""
    warps, per_sm = _config(keys.dtype, _BWD_CONFIG)[1:]
    grads = (grad_key_states, grad_value_states)
    return _scan_bwd(gate_logits, keys, values, states, *grads, chunk, block_c, warps, per_sm)


@recurrence_scan_backward.register_fake
def _(gate_logits, keys, values, states, grad_key_states, grad_value_states, chunk, block_c):
    return gate_logits.new_empty(gate_logits.shape), keys.new_empty(keys.shape), values.new_empty(values.shape)


def _setup_context(ctx, inputs, output):
    gate_logits, keys, values, chunk, _, bwd_block_c = inputs
    ctx.save_for_backward(gate_logits, keys, values, output[2])
    ctx.chunk, ctx.block_c = chunk, bwd_block_c


def _backward(ctx, grad_key_states, grad_value_states, _grad_states):
    gate_logits, keys, values, states = ctx.saved_tensors
    if grad_key_states is None:
        grad_key_states = torch.zeros_like(keys)
    if grad_value_states is None:
        grad_value_states = torch.zeros_like(values)
    d_f, d_k, d_x = torch.ops.ratplus.recurrence_scan_backward(
        gate_logits, keys, values, states, grad_key_states, grad_value_states, ctx.chunk, ctx.block_c
    )
    return d_f, d_k, d_x, None, None, None


recurrence_scan.register_autograd(_backward, setup_context=_setup_context)


def recurrence_triton(
    gate_logits: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    chunk: int | None = None,
    block_c: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K, V)`` for ``[B, T, H, hd]`` (or ``[B, T, C]``) gate logits, keys and values; Triton scan.

    Same contract as ``recurrence_reference``: fp32 state from zero, outputs contiguous in
    the input dtype (float64 inputs go to the reference). ``chunk`` (time steps per tile, a power of two) and ``block_c``
    (channels per tile, forward and backward, a power of two) default to the tuned values.
    """
    if keys.dtype == torch.float64:  # the kernels keep fp32 state; float64 (gradcheck) takes the reference
        return recurrence_reference(gate_logits, keys, values)
    shape = keys.shape
    if keys.dim() == 3:
        gate_logits, keys, values = (t.unsqueeze(2) for t in (gate_logits, keys, values))
    elif keys.dim() != 4:
        gate_logits, keys, values = (t.reshape(*t.shape[:2], -1, t.shape[-1]) for t in (gate_logits, keys, values))
    default_chunk, fwd_block_c, bwd_block_c = default_tiles(*keys.shape[1:], keys.dtype)
    chunk = chunk or default_chunk
    fwd_block_c, bwd_block_c = block_c or fwd_block_c, block_c or bwd_block_c
    key_states, value_states, _ = recurrence_scan(gate_logits, keys, values, chunk, fwd_block_c, bwd_block_c)
    return key_states.view(shape), value_states.view(shape)


@torch.library.custom_op("ratplus::recurrence_step", mutates_args=())
def _recurrence_step_op(
    gate_logits: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_state: torch.Tensor,
    value_state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    width = keys.shape[-1]
    f, k, x, ks, vs = (t.reshape(-1, width) for t in (gate_logits, keys, values, key_state, value_state))
    f, k, x, ks, vs = (_unit_last_stride(t) for t in (f, k, x, ks, vs))
    out_k = torch.empty(key_state.shape, dtype=torch.float32, device=keys.device)
    out_v = torch.empty(value_state.shape, dtype=torch.float32, device=keys.device)
    if out_k.numel():
        block = min(1024, _pow2_at_least(width, 16))
        grid = (f.shape[0], triton.cdiv(width, block))
        _step_kernel[grid](
            f, k, x, ks, vs, out_k, out_v, width,
            f.stride(0), k.stride(0), x.stride(0), ks.stride(0), vs.stride(0), BLOCK=block,
        )  # fmt: skip
    return out_k, out_v


@_recurrence_step_op.register_fake
def _(gate_logits, keys, values, key_state, value_state):
    return key_state.new_empty(key_state.shape, dtype=torch.float32), value_state.new_empty(
        value_state.shape, dtype=torch.float32
    )


def recurrence_step_triton(
    gate_logits: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_state: torch.Tensor,
    value_state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step (same contract as ``recurrence_step_reference``): ``[B, ...]`` inputs, fp32 states -> new fp32 states."""
    return torch.ops.ratplus.recurrence_step(gate_logits, keys, values, key_state.float(), value_state.float())
