"""Triton split-K decode attention (forward only): one query per sequence over its cache rows.

Same contract as ``decode.decode_attention_reference``::

    q [B, H, hd], k_cache/v_cache [B, H, R, hd], valid [B, R] bool, k_new/v_new [B, H, hd] -> [B, H, hd]

Decoding is memory bound: every cache row is read once per step. Long caches are split
along the rows ("split-K", flash-decoding): program ``(b*H + h, split)`` streams rows
``[split * rows_per_split, ...)`` of one head of one sequence through an online softmax
(exp2 domain, fp32 statistics) and writes a partial output and its log-sum-exp; a second
small kernel merges the partials of each head together with the new token's own row.

Ragged batches: ``valid`` is either a ``[B, R]`` bool mask (rows a sequence may not see
have ``False``; their loads are predicated off, so they cost no memory traffic) or ``[B]``
counts (rows ``[0, count)`` are valid: the decode cache's sparse layout and the dense
pattern keep their valid rows as a prefix). With counts, a program's loop ends at the count
and no row load waits for a mask load. The number of splits depends only on the
static shapes (B, H, R) and the GPU, so a captured CUDA graph replays unchanged.

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


@dataclass
class DecodeConfig:
    """Launch parameters of the split kernel (bench/decode.py sweeps them)."""

    # Defaults: the best geometric mean of a 128-config sweep on an H100 (bench/decode.py,
    # bench/results/decode_h100.json); the top ten were within 2% of one another.
    block_n: int = 128  # cache rows per loop iteration
    num_warps: int = 8
    num_stages: int = 2
    programs_per_sm: int = 64  # split the rows until about this many programs per SM ...
    min_rows_per_split: int = 256  # ... but keep at least this many rows per program


CONFIG = DecodeConfig()


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def split_plan(
    batch: int, heads: int, rows: int, device: torch.device, config: DecodeConfig | None = None
) -> tuple[int, int]:
    """(num_splits, rows_per_split) from the static shapes only (CUDA-graph safe)."""
    config = config or CONFIG
    target = config.programs_per_sm * _num_sms(device) if device.type == "cuda" else 8
    max_splits = max(1, math.ceil(rows / config.min_rows_per_split))
    num_splits = min(max_splits, max(1, math.ceil(target / (batch * heads))))
    rows_per_split = math.ceil(math.ceil(rows / num_splits) / config.block_n) * config.block_n
    num_splits = max(1, math.ceil(rows / rows_per_split)) if rows else 1
    return num_splits, max(rows_per_split, config.block_n)


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
    batch, heads, rows, head_dim = k_cache.shape
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        if t.stride(-1) != 1:
            raise ValueError(f"decode_attention_triton: {name} needs a unit stride on its last dim")
    has_mask = valid.dtype == torch.bool
    if has_mask and (valid.shape != (batch, rows) or valid.stride(-1) != 1):
        raise ValueError(f"decode_attention_triton: a valid mask must be [B, R] = {(batch, rows)} bool, unit last stride")
    if not has_mask and (valid.shape != (batch,) or valid.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"decode_attention_triton: valid counts must be [B] = ({batch},) int32/int64")
    config = CONFIG
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
