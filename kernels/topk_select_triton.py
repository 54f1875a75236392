"""Triton block selection of top-k attention (``ratplus_titan/topk.py``), shared by prefill and decode.

**Scores.** ``q . summary`` (``quest``: ``q+ . max + q- . min``, ``moba``: mean key, ``ratplus``: the key
closing the block), ``tl.dot`` products accumulated in fp32 over head-dim chunks of ``DK`` (products of
16-bit inputs are exact in fp32; fp32 inputs use IEEE fp32 dots, never tf32), so they equal the
reference's fp32 scores up to summation order. Summaries come from ``TopKPattern.summaries`` (the
reference's own function, so they are bitwise the reference's).

**Top-k of a row** (``_top_k_select``): each score is mapped to an unsigned 32-bit key with the same order
(the fp32 bit pattern, sign-flipped), and the ``k``-th largest key is found bit by bit from the top: 32
count passes at most (each ``count(key >= x)`` over the row), fewer when every row of the tile already
has exactly ``k`` keys at or above its threshold, none when every row takes all its candidates. Exact, whatever the score distribution (no tolerance,
no value bisection). Equal scores at the threshold go to the lowest block indices (``torch.topk`` leaves
tie order unspecified; with real activations ties do not happen). ``-0.0`` counts as ``0.0``.
The alternative ``_top_k_select_sorted`` (``SELECT_OVERRIDE["top_k"] = "sorted"``, prefill only; to be timed
against the radix search, whose serial count passes are each a reduction over the whole tile) packs each
candidate as the uint64 ``key << 32 | ~block`` (distinct, ordered as score descending then block ascending),
takes the row's top ``next_power_of_2(top_k)`` with a bitonic top-k (``tl.topk``) and picks the candidates at or
above the ``top_k``-th: the same picks, bit for bit. The alternative ``_top_k_select_interp`` (``"interp"``) searches
the same threshold with fewer count passes: each row keeps a bracket of keys ``[lo, hi)`` with ``count(>= lo) >= k >
count(>= hi)`` and tries the key its counts interpolate to (regula falsi on the row's count curve), the bracket's
midpoint when the last two passes did not halve it: on smooth score distributions it needs fewer passes than the
32-bit radix search (untimed on a GPU so far). Exact, the same picks bit for bit.

**Prefill** (``select_prefill``): ``_select_kernel`` writes each query's picks as bits (``bits [B*H, T, NW]``
int32, bit ``b % 32`` of word ``b // 32``) and, per chunk of ``LIST_M`` queries, how many of them picked
each block. An exclusive prefix sum over (block, chunk) gives every (block, chunk) its place in one list
per (batch, head); ``_pair_list_kernel`` expands the bits again and writes each (query, pick) pair there:
``pairs [B*H, P]`` int32, the query position ``t``, grouped by block in block order, queries ascending within
a block; ``starts [B*H, NB + 1]``: block ``b``'s pairs are
``pairs[:, starts[b]:starts[b + 1]]``. Every query picks exactly ``min(top_k, t // bs)`` blocks, so
``P = sum_t min(top_k, t // bs)`` is known from the shapes (``pair_count``). Deterministic (no atomics).

**Decode** (``_decode_select_kernel``): one query per (sequence, head) against the cached summaries; writes a
table of row spans (sink blocks not otherwise seen, the own block up to the query, the picked blocks) for the
flat decode kernel of ``decode_triton.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ratplus_titan.kernels.pattern_attention_triton import _UPCAST_DOT, _interpreting, _unit_last
from ratplus_titan.topk import TopKPattern

_SCORES_PER_PROGRAM = 16384  # fp32 scores a selection program holds at once (rows x padded blocks)
_WARP_CHOICES = (1, 2, 4, 8, 16, 32)
# Launch settings of ``select_prefill``'s two kernels, for tuning (``bench/topk.py --phases select``) and tests;
# empty: the defaults of ``select_launch``. ``scores_per_program``: a power of two >= 16 in place of
# ``_SCORES_PER_PROGRAM`` (rows per pass ``SEL_M`` = it // padded blocks, clamped to [16, list_m]);
# ``num_warps``: warps of ``_select_kernel`` and ``_pair_list_kernel`` (both hold ``[SEL_M, NB_PAD]`` tiles);
# ``top_k``: a name of ``TOP_K_ALGORITHMS``, how ``_select_kernel`` finds each row's top-k (the same picks).
SELECT_OVERRIDE: dict = {}
TOP_K_ALGORITHMS = ("radix", "sorted", "interp")  # _top_k_select (the default), _top_k_select_sorted, _top_k_select_interp


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
def _order_key(s):
    """fp32 scores -> uint32 keys in the order of the scores (the bit pattern, sign-flipped; ``-0.0`` as ``0.0``)."""
    bits = tl.where(s == 0.0, 0.0, s).to(tl.uint32, bitcast=True)  # -0.0 -> 0.0
    return tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)


@triton.jit
def _count_search_start(s, cand, top_k):
    """What the count searches start from: ``(key [M, N], n_cand [M], k [M], done [M], x [M])``. Keys of the
    candidates (0 elsewhere), ``k = min(top_k, #cand)``; rows that take every candidate (or none) are done, with
    ``x = 1``, below every candidate's key (all >= 1)."""
    n_cand = tl.sum(cand.to(tl.int32), 1)
    k = tl.minimum(n_cand, top_k)
    done = k == n_cand
    return tl.where(cand, _order_key(s), 0), n_cand, k, done, done.to(tl.uint32)


@triton.jit
def _top_k_select(s, cand, top_k):
    """``s [M, N]`` fp32 scores, ``cand [M, N]`` candidates -> ``[M, N]`` bool: each row's ``min(top_k, #cand)``
    highest-scoring candidates (ties at the threshold: lowest indices first)."""
    # x: the largest value with count(key >= x) >= k, built from the top bit down (the k-th largest key)
    key, _, k, done, x = _count_search_start(s, cand, top_k)
    step = tl.full([], 0x80000000, tl.uint32)
    while (step > 0) & (tl.sum((~done).to(tl.int32), 0) > 0):
        trial = x | step
        c = tl.sum((key >= trial[:, None]).to(tl.int32), 1)
        take = (c >= k) & ~done
        x = tl.where(take, trial, x)
        done = done | (take & (c == k))  # exactly k keys reach x: x is a valid threshold already
        step = step >> 1
    return _picks_at(key, x, k, cand)


@triton.jit
def _picks_at(key, x, k, cand):
    """The picks of rows whose ``k``-th largest candidate key is at or above threshold ``x [M]`` and every key above
    ``x`` is among the ``k``: the keys above ``x``, then keys equal to ``x`` in index order up to ``k``."""
    above = key > x[:, None]
    at = key == x[:, None]
    need = k - tl.sum(above.to(tl.int32), 1)
    rank = tl.cumsum(at.to(tl.int32), 1)
    return (above | (at & (rank <= need[:, None]))) & cand & (k > 0)[:, None]


@triton.jit
def _top_k_select_interp(s, cand, top_k):
    """``_top_k_select``'s picks (the same bits) with fewer count passes: per row a bracket of keys ``[lo, hi)``
    with ``count(key >= lo) >= k > count(key >= hi)``; each pass counts at the key the bracket's counts
    interpolate to, or at the bracket's midpoint when the last two passes did not halve it (so the bracket halves
    within any three passes: at most ~99 passes). A pass that counts exactly ``k``
    ends the row; so does a bracket one key wide (``lo`` is then the ``k``-th largest key, tied)."""
    key, n_cand, k, done, x = _count_search_start(s, cand, top_k)
    lo = tl.min(tl.where(cand, key, 0xFFFFFFFF), 1).to(tl.int64)  # count(>= lo) = n_cand
    hi = tl.max(key, 1).to(tl.int64) + 1  # count(>= hi) = 0
    c_lo = n_cand.to(tl.float32)
    c_hi = tl.zeros_like(c_lo)
    k_f = k.to(tl.float32)
    width_1 = hi - lo  # the bracket's width one and two passes ago
    width_2 = width_1
    while tl.sum((~done).to(tl.int32), 0) > 0:
        width = hi - lo
        guess = lo + (width.to(tl.float32) * ((c_lo - k_f) / tl.maximum(c_lo - c_hi, 1.0))).to(tl.int64)
        bisect = (width * 2 > width_2) | (guess <= lo) | (guess >= hi)
        trial = tl.where(bisect, lo + width // 2, guess)
        c = tl.sum((key >= trial.to(tl.uint32)[:, None]).to(tl.int32), 1)
        live = ~done
        hit = live & (c == k)
        up = live & (c > k)  # trial is the new lo
        down = live & (c < k)  # trial is the new hi
        x = tl.where(hit, trial.to(tl.uint32), x)
        width_2 = width_1
        width_1 = width
        lo = tl.where(up, trial, lo)
        c_lo = tl.where(up, c.to(tl.float32), c_lo)
        hi = tl.where(down, trial, hi)
        c_hi = tl.where(down, c.to(tl.float32), c_hi)
        narrow = live & ~hit & (hi - lo <= 1)
        x = tl.where(narrow, lo.to(tl.uint32), x)
        done = done | hit | narrow
    return _picks_at(key, x, k, cand)


@triton.jit
def _top_k_select_sorted(s, cand, top_k, TOPK_PAD: tl.constexpr):
    """``_top_k_select``'s picks (the same bits) from a bitonic top-k instead of the radix search. Each candidate
    is packed as ``key << 32 | ~index`` (uint64; non-candidates 0): the packed values of a row are distinct and
    ordered as (score descending, index ascending), so the picks are the candidates at or above the row's
    ``top_k``-th largest packed value. ``TOPK_PAD``: a power of two >= ``top_k`` (or the columns ``N``, when
    ``top_k`` exceeds them: then every candidate is picked)."""
    cols = tl.arange(0, s.shape[1])
    packed = (_order_key(s).to(tl.uint64) << 32) | (~cols.to(tl.uint32)).to(tl.uint64)[None, :]
    packed = tl.where(cand, packed, 0)  # every candidate's is >= ~index >= 1
    if TOPK_PAD == 1:
        top = tl.max(packed, 1, keep_dims=True)
    else:
        top = tl.topk(packed, TOPK_PAD)  # [M, TOPK_PAD], descending
    # the top_k-th largest (0 where the row has fewer candidates, or top_k > TOPK_PAD: every candidate then)
    kth = tl.max(tl.where(tl.arange(0, TOPK_PAD)[None, :] == top_k - 1, top, 0), 1)
    return cand & (packed >= kth[:, None]) & (top_k > 0)


@triton.jit
def _top_k_select_row(s, cand, top_k, ALGORITHM: tl.constexpr, TOPK_PAD: tl.constexpr):
    """Each row's top-k picks by ``TOP_K_ALGORITHMS[ALGORITHM]`` (the same bits whichever)."""
    if ALGORITHM == 1:
        return _top_k_select_sorted(s, cand, top_k, TOPK_PAD)
    elif ALGORITHM == 2:
        return _top_k_select_interp(s, cand, top_k)
    else:
        return _top_k_select(s, cand, top_k)


@triton.jit
def _block_scores(q_base, s_base, rows, row_ok, sqt, ssr, block_ok, quest,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SEL_M: tl.constexpr, NB_PAD: tl.constexpr,
                  DK: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """``[SEL_M, NB_PAD]`` fp32 scores of query ``rows`` against the summaries at ``s_base [1, NB_PAD]``."""
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
    return acc


# Integer arguments that only address bits and lists are not specialized on their values (Triton would
# compile again for each divisibility by 16): one compile serves every sequence length. ``quest`` is a
# runtime flag for the same reason (one kernel for the three scores).
@triton.jit(do_not_specialize=["T", "NB", "n_chunks", "top_k", "quest", "chunk0", "NWT"])
def _select_kernel(
    Q, SUMM, BITS, COUNTS,
    sqb, sqh, sqt, ssb, ssh, ssn, ssr,
    H, T, NB, top_k, BS, n_chunks, quest, chunk0, NWT,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, LIST_M: tl.constexpr, SEL_M: tl.constexpr,
    NB_PAD: tl.constexpr, DK: tl.constexpr, IEEE: tl.constexpr, ALGORITHM: tl.constexpr, TOPK_PAD: tl.constexpr,
):
    """Picks of queries ``[m0, m0 + LIST_M)`` (``SEL_M`` rows at a time) as bits; per block, how many picked it.
    The launch covers chunks from ``chunk0`` on, whose queries' candidates all lie in the first ``NB_PAD`` blocks
    (``select_buckets``); rows of ``BITS`` hold ``NWT`` words. ``ALGORITHM``: the index in ``TOP_K_ALGORITHMS`` of
    each row's top-k (the same picks); ``TOPK_PAD``: the sorted top-k's padded k."""
    chunk = chunk0 + tl.program_id(0)  # grid (chunks, B*H): one head's chunks run together (see select_prefill)
    bh = tl.program_id(1)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    blocks = tl.arange(0, NB_PAD)
    block_ok = blocks < NB
    NW: tl.constexpr = NB_PAD // 32
    q_base = Q + b64 * sqb + h64 * sqh
    s_base = SUMM + b64 * ssb + h64 * ssh + blocks[None, :] * ssn  # [1, NB_PAD]
    counts = tl.zeros([NB_PAD], dtype=tl.int32)
    for sub in tl.static_range(LIST_M // SEL_M):
        rows = chunk * LIST_M + sub * SEL_M + tl.arange(0, SEL_M)
        row_ok = rows < T
        acc = _block_scores(q_base, s_base, rows, row_ok, sqt, ssr, block_ok, quest, HEAD_DIM, BLOCK_D, SEL_M,
                            NB_PAD, DK, IEEE)
        cand = (blocks[None, :] < (rows // BS)[:, None]) & block_ok[None, :] & row_ok[:, None]
        sel = _top_k_select_row(acc, cand, top_k, ALGORITHM, TOPK_PAD)  # [SEL_M, NB_PAD]
        bits = tl.reshape(sel.to(tl.int32), (SEL_M, NW, 32)) << tl.arange(0, 32)[None, None, :]
        words = tl.reduce(bits, 2, _bit_or)  # [SEL_M, NW]
        offs_w = tl.arange(0, NW)
        tl.store(BITS + (bh.to(tl.int64) * T + rows[:, None]) * NWT + offs_w[None, :], words, mask=row_ok[:, None])
        counts += tl.sum(sel.to(tl.int32), 0)
    tl.store(COUNTS + (bh.to(tl.int64) * NB + blocks) * n_chunks + chunk, counts, mask=block_ok)


@triton.jit(do_not_specialize=["T", "NB", "n_chunks", "P", "chunk0", "NWT"])
def _pair_list_kernel(
    BITS, OFFSETS, PAIRS,
    T, NB, n_chunks, P, chunk0, NWT,
    LIST_M: tl.constexpr, SEL_M: tl.constexpr, NB_PAD: tl.constexpr,
):
    """The (query, pick) pairs of queries ``[m0, m0 + LIST_M)`` at their places in the block-major list (chunks from
    ``chunk0`` on, their picks in the first ``NB_PAD`` blocks, as ``_select_kernel``'s launch)."""
    chunk = chunk0 + tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    blocks = tl.arange(0, NB_PAD)
    block_ok = blocks < NB
    NW: tl.constexpr = NB_PAD // 32
    # first place of this chunk's pairs of each block
    place = tl.load(OFFSETS + (bh * NB + blocks) * n_chunks + chunk, mask=block_ok, other=0)
    for sub in tl.static_range(LIST_M // SEL_M):
        rows = chunk * LIST_M + sub * SEL_M + tl.arange(0, SEL_M)
        row_ok = rows < T
        offs_w = tl.arange(0, NW)
        words = tl.load(BITS + (bh * T + rows[:, None]) * NWT + offs_w[None, :], mask=row_ok[:, None], other=0)
        picked = tl.reshape((words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1, (SEL_M, NB_PAD))
        rank = tl.cumsum(picked, 0) - 1  # rank of the query among this sub-tile's queries picking the block
        ok = (picked != 0) & block_ok[None, :]
        tl.store(PAIRS + bh * P + place[None, :] + rank, rows[:, None] + tl.zeros_like(rank), mask=ok)
        place += tl.sum(picked, 0)


def pair_count(seq_len: int, block_size: int, top_k: int) -> int:
    """``sum_t min(top_k, t // block_size)``: the (query, picked block) pairs of one (batch, head)."""
    nb = seq_len // block_size
    below = min(nb, top_k)  # blocks c whose queries take every earlier block: sum_{c < below} c
    full = below * (below - 1) // 2 + top_k * (nb - below)  # sum over complete blocks c of min(top_k, c)
    return block_size * full + (seq_len - nb * block_size) * min(top_k, nb)


def blocks_padded(num_blocks: int) -> int:
    """Score columns per row: a power of two, at least 32 (one bit word)."""
    return max(32, triton.next_power_of_2(max(num_blocks, 1)))


def select_launch(nb_pad: int, list_m: int, sel_m: int | None = None) -> tuple[int, int, str]:
    """``(SEL_M, num_warps, top-k algorithm)`` of ``select_prefill``'s kernels for ``nb_pad`` padded blocks and chunks
    of ``list_m`` queries: ``sel_m`` when given (``CONFIG_OVERRIDE["sel_m"]``), else from the scores a program holds;
    then ``SELECT_OVERRIDE``, checked (``ValueError`` naming the key)."""
    unknown = sorted(set(SELECT_OVERRIDE) - {"scores_per_program", "num_warps", "top_k"})
    if unknown:
        raise ValueError(f"SELECT_OVERRIDE key {unknown[0]!r} is unknown: allowed keys are scores_per_program, "
                         "num_warps, top_k")
    algorithm = SELECT_OVERRIDE.get("top_k", TOP_K_ALGORITHMS[0])
    if type(algorithm) is not str or algorithm not in TOP_K_ALGORITHMS:
        raise ValueError(f"SELECT_OVERRIDE top_k={algorithm!r} is invalid: allowed values are "
                         f"{', '.join(TOP_K_ALGORITHMS)}")
    per_program = SELECT_OVERRIDE.get("scores_per_program", _SCORES_PER_PROGRAM)
    if type(per_program) is not int or per_program < 16 or per_program != triton.next_power_of_2(per_program):
        raise ValueError(f"SELECT_OVERRIDE scores_per_program={per_program!r} is invalid: allowed values are powers "
                         "of two >= 16")
    if sel_m is None:  # rows of scores held at once
        sel_m = max(16, min(list_m, per_program // nb_pad))
    sel_m = min(sel_m, list_m)
    if sel_m < 16 or sel_m != triton.next_power_of_2(sel_m) or list_m % sel_m:
        raise ValueError(f"selection rows per pass SEL_M={sel_m} (list_m={list_m}) is invalid: allowed values are "
                         "powers of two >= 16 that divide list_m")
    warps = SELECT_OVERRIDE.get("num_warps")
    if warps is None:
        warps = 1 if _interpreting() else max(4, min(16, sel_m * nb_pad // 2048))  # 64 score registers a thread
    elif type(warps) is not int or warps not in _WARP_CHOICES:
        raise ValueError(f"SELECT_OVERRIDE num_warps={warps!r} is invalid: allowed values are "
                         f"{', '.join(map(str, _WARP_CHOICES))}")
    return sel_m, warps, algorithm


def select_prefill(
    q: torch.Tensor, k: torch.Tensor, pattern: TopKPattern, list_m: int, sel_m: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k [B, H, T, hd]`` -> ``(bits [B*H, T, NW] int32, pairs [B*H, P] int32, starts [B*H, NB + 1] int32)``."""
    q = _unit_last(q)
    batch, heads, seq_len, head_dim = q.shape
    bs, top_k = pattern.block_size, pattern.top_k
    nb, nb_pad = seq_len // bs, blocks_padded(triton.cdiv(seq_len, bs))
    n_pairs = pair_count(seq_len, bs, top_k)
    launches = [(c0, c1, pad, *select_launch(pad, list_m, sel_m)) for c0, c1, pad in
                select_buckets(seq_len, bs, list_m, nb_pad)]
    if seq_len >= 2**31:  # pairs are int32 query positions
        raise ValueError(f"topk prefill needs T < 2^31, got T={seq_len}")
    bits = torch.zeros(batch * heads, seq_len, nb_pad // 32, dtype=torch.int32, device=q.device)
    pairs = torch.empty(batch * heads, n_pairs, dtype=torch.int32, device=q.device)
    starts = torch.zeros(batch * heads, nb + 1, dtype=torch.int32, device=q.device)
    if n_pairs == 0:  # no query has a candidate (or top_k = 0): no bit set, no pair
        return bits, pairs, starts
    summaries = _unit_last(pattern.summaries(k))  # [B, H, NB, n, hd] (views for ratplus)
    n_chunks = triton.cdiv(seq_len, list_m)
    counts = torch.zeros(batch * heads, nb, n_chunks, dtype=torch.int32, device=q.device)  # 0 past a launch's pad
    # Grids (chunks, B*H): the programs running at once belong to one (batch, head), so the counts and pair
    # entries that neighbouring chunks write (adjacent places) meet in L2 while that head's list (T * top_k * 4
    # bytes: 16 MB at T=64K) fits there, instead of partial sectors of every head's list going out to memory.
    for c0, c1, pad, launch_m, warps, algorithm in launches:
        _select_kernel[(c1 - c0, batch * heads)](
            q, summaries, bits, counts,
            *q.stride()[:3], summaries.stride(0), summaries.stride(1), summaries.stride(2), summaries.stride(3),
            heads, seq_len, nb, top_k, bs, n_chunks, int(pattern.score == "quest"), c0, nb_pad // 32,
            HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), LIST_M=list_m, SEL_M=launch_m,
            NB_PAD=pad, DK=16, IEEE=q.dtype == torch.float32, ALGORITHM=TOP_K_ALGORITHMS.index(algorithm),
            TOPK_PAD=min(triton.next_power_of_2(max(top_k, 1)), pad) if algorithm == "sorted" else 1,
            num_warps=warps, num_stages=1,
        )  # fmt: skip
    ends = counts.view(batch * heads, -1).cumsum(1, dtype=torch.int32)  # [B*H, NB * n_chunks]
    offsets = ends - counts.view(batch * heads, -1)  # exclusive: each (block, chunk)'s first place
    starts[:, :nb] = offsets.view(batch * heads, nb, n_chunks)[:, :, 0]
    starts[:, nb] = n_pairs
    for c0, c1, pad, launch_m, warps, _ in launches:
        _pair_list_kernel[(c1 - c0, batch * heads)](
            bits, offsets, pairs, seq_len, nb, n_chunks, n_pairs, c0, nb_pad // 32,
            LIST_M=list_m, SEL_M=launch_m, NB_PAD=pad, num_warps=warps, num_stages=1,
        )  # fmt: skip
    return bits, pairs, starts


def select_buckets(seq_len: int, block_size: int, list_m: int, nb_pad: int) -> list[tuple[int, int, int]]:
    """``[(first chunk, end chunk, padded blocks)]`` of ``select_prefill``'s launches: query ``t`` chooses among the
    blocks before its own (``t // block_size`` of them), so the chunks of queries below ``(pad + 1) * block_size``
    run with ``pad = nb_pad / 4`` or ``nb_pad / 2`` score columns instead of ``nb_pad`` (at least 32): a quarter of
    the queries with a quarter of the columns, a quarter with half. At T=64K (1024 blocks of 64) that is 69% of
    the (query, column) work of one launch over every chunk."""
    n_chunks = triton.cdiv(seq_len, list_m)
    launches, first = [], 0
    for pad in (nb_pad // 4, nb_pad // 2):
        end = min(n_chunks, (pad + 1) * block_size // list_m)
        if pad >= 32 and end > first:
            launches.append((first, end, pad))
            first = end
    if first < n_chunks:
        launches.append((first, n_chunks, nb_pad))
    return launches


# --------------------------------------------------------------------------------------
# decode: one query's blocks as row spans
# --------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["NB", "R", "top_k", "N_SPANS", "quest"])
def _decode_select_kernel(
    Q, SUMM, POS, SPANS,
    sqb, sqh, ssb, ssh, ssn, ssr,
    H, NB, R, top_k, BS, S, NSB, N_SPANS, quest,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NB_PAD: tl.constexpr, DK: tl.constexpr,
    PICK_PAD: tl.constexpr, NSB_PAD: tl.constexpr,
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
    sel = tl.reshape(_top_k_select(acc[None, :], cand[None, :], top_k), (NB_PAD,))
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


def decode_spans(
    q: torch.Tensor, summaries: torch.Tensor, pos: torch.Tensor, rows: int, pattern: TopKPattern
) -> torch.Tensor:
    """``q [B, H, hd]``, cached ``summaries [B, H, NB, n, hd]``, positions ``pos [B]`` -> spans ``[B*H, N, 2]`` int32."""
    batch, heads, head_dim = q.shape
    bs, top_k, sinks = pattern.block_size, pattern.top_k, pattern.sinks
    num_blocks = summaries.shape[2]
    sink_blocks = triton.cdiv(min(sinks, rows), bs)
    picks = min(top_k, num_blocks)
    n_spans = sink_blocks + 1 + picks
    spans = torch.empty(batch * heads, n_spans, 2, dtype=torch.int32, device=q.device)
    summaries = _unit_last(summaries) if num_blocks else q.new_zeros(batch, heads, 1, 2, head_dim)
    nb_pad = blocks_padded(num_blocks)
    _decode_select_kernel[(batch * heads,)](
        q, summaries, pos, spans,
        q.stride(0), q.stride(1), summaries.stride(0), summaries.stride(1), summaries.stride(2), summaries.stride(3),
        heads, num_blocks, rows, top_k, bs, sinks, sink_blocks, n_spans, int(pattern.score == "quest"),
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), NB_PAD=nb_pad, DK=16,
        PICK_PAD=triton.next_power_of_2(max(picks, 1)), NSB_PAD=triton.next_power_of_2(max(sink_blocks, 1)),
        num_warps=1 if _interpreting() else max(4, min(16, nb_pad // 128)),
    )  # fmt: skip
    return spans
