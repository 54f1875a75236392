"""Top-k block attention (``ratplus_titan/topk.py``) in Triton: the custom ops, their launch settings, decode.

The semantics are those of ``topk_attention.py`` (the reference): query ``t`` (own block ``t // bs``)
sees its own block causally, the sinks ``j < S``, and the ``top_k`` earlier complete blocks whose
summary scores highest against it (``quest``: per-channel key min/max, ``moba``: mean key,
``ratplus``: the key closing the block). Selection is per query and not differentiable: gradients
are those of softmax attention under the fixed mask (no gradient reaches the summaries), as in the
reference, where the mask is a boolean tensor.

The pieces, one implementation each:

- ``topk_select_triton.py``: block scores (a tiled matmul of queries x block summaries) and each query's
  exact top-k (a 32-step radix search on the fp32 bit pattern, ties to the lowest block), as bits and
  as block-major (query, pick) pair lists; the decode selection.
- ``topk_prefill_triton.py``: the prefill forward and backward. Own block + sinks query-major; the picked
  blocks key-block-major over the pair lists (gathered query tiles against one key block), every term scaled
  by the query's local max in one pass (a device-gated redo against the true max where that would overflow).
  No query tile computes a key block none of its queries picked.
  Forward output and dQ are summed with fp32 atomics (not bitwise deterministic; dK/dV are).

The ops are ``torch.ops.ratplus.topk_select`` (no autograd: the selection), ``topk_attention``
(returns ``(out, lse)``, differentiable in q, k, v and both outputs) and ``topk_decode_attention``,
all ``torch.library.custom_op`` with fake implementations, so ``torch.compile`` traces through them.
Under ``TRITON_INTERPRET=1`` they run on CPU tensors (the tests do this).

**Decode** (``topk_decode_attention_triton``): ``_decode_select_kernel`` scores the cached block
summaries of one query per (sequence, head), selects as above, and writes a table of row spans
(sink blocks not otherwise seen, the own block up to the query, the picked blocks); the flat decode
kernel of ``decode_triton.py`` streams those spans (its ``SPANS`` mode) and merges the new token's
own row, so a step reads ``S + (top_k + 1) * bs`` rows plus ``T / bs`` summaries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from ratplus_titan.kernels.pattern_attention_triton import _interpreting, _unit_last
from ratplus_titan.kernels.topk_prefill_triton import prefill_backward, prefill_forward
from ratplus_titan.kernels.topk_select_triton import blocks_padded, decode_spans, pair_count, select_prefill
from ratplus_titan.topk import SCORES, TopKPattern

# --------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------
# tile_m: query tile of the local kernels and gathered rows per tile of the key-block kernels; block_n: key
# tile (shrinks to the block size); list_m: queries per selection program (the granularity of the pair
# lists' counting sort); split: query rows per sink-gradient program. GPU values are untimed first
# choices (bench/topk.py times them); the selection's rows per pass (sel_m) follow from the block count
# (``topk_select_triton.SELECT_OVERRIDE`` changes them and its warps: bench/topk.py --phases select).
_GPU_CONFIG = dict(tile_m=64, block_n=64, warps=4, stages=2, list_m=64, split=2048)
_GPU_CONFIG_FP32 = dict(_GPU_CONFIG, tile_m=32, block_n=32)
_CPU_CONFIG = dict(tile_m=16, block_n=16, warps=1, stages=1, list_m=16, split=32)
# Any key of the configs above, and "sel_m"; tests and bench/topk.py set this.
CONFIG_OVERRIDE: dict = {}


def _config(dtype: torch.dtype, block_size: int) -> dict:
    """Launch settings: the defaults of the device and dtype, then ``CONFIG_OVERRIDE``; ``block_n`` at least 16."""
    if _interpreting():
        config = dict(_CPU_CONFIG)
    else:
        config = dict(_GPU_CONFIG_FP32 if dtype == torch.float32 else _GPU_CONFIG)
    config.update(CONFIG_OVERRIDE)
    config["block_n"] = max(16, min(config["block_n"], triton.next_power_of_2(block_size)))
    return config


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


# --------------------------------------------------------------------------------------
# the custom ops
# --------------------------------------------------------------------------------------
def _shapes(q: torch.Tensor, block_size: int, top_k: int) -> tuple[int, int, int]:
    """(bit words per query, pairs per (batch, head), complete blocks) of a prefill of ``q [B, H, T, hd]``."""
    seq_len = q.shape[2]
    nw = blocks_padded(triton.cdiv(seq_len, block_size)) // 32
    return nw, pair_count(seq_len, block_size, top_k), seq_len // block_size


@torch.library.custom_op("ratplus::topk_select", mutates_args=(), device_types=("cuda", "cpu"))
def topk_select_op(
    q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int, sinks: int, score: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The picks of every query: ``(bits [B*H, T, NW] int32, pairs [B*H, P] int32, starts [B*H, NB + 1] int32)``
    (``topk_select_triton.select_prefill``)."""
    _check(q, k, k, block_size, score)
    config = _config(q.dtype, block_size)
    return select_prefill(q, k, TopKPattern(block_size, top_k, score, sinks), config["list_m"], config.get("sel_m"))


@topk_select_op.register_fake
def _(q, k, block_size, top_k, sinks, score):
    batch, heads, seq_len, _ = q.shape
    nw, n_pairs, nb = _shapes(q, block_size, top_k)
    return (q.new_empty(batch * heads, seq_len, nw, dtype=torch.int32),
            q.new_empty(batch * heads, n_pairs, dtype=torch.int32),
            q.new_empty(batch * heads, nb + 1, dtype=torch.int32))


@torch.library.custom_op("ratplus::topk_attention", mutates_args=(), device_types=("cuda", "cpu"))
def topk_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pairs: torch.Tensor, starts: torch.Tensor,
    block_size: int, sinks: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B,H,T,hd], lse [B,H,T] fp32, natural log)`` under the pairs of ``topk_select``."""
    q, k, v = (_unit_last(x) for x in (q, k, v))
    if q.shape[2] == 0:
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)
    config = _config(q.dtype, block_size)
    return prefill_forward(q, k, v, pairs, starts, block_size, sinks, scale, config)


@topk_attention_op.register_fake
def _(q, k, v, pairs, starts, block_size, sinks, scale):
    batch, heads, seq_len, _ = q.shape
    return torch.empty_like(q), q.new_empty(batch, heads, seq_len, dtype=torch.float32)


@torch.library.custom_op("ratplus::topk_attention_backward", mutates_args=(), device_types=("cuda", "cpu"))
def topk_attention_backward_op(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, pairs: torch.Tensor, starts: torch.Tensor, block_size: int, sinks: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, out, grad_out = (_unit_last(x) for x in (q, k, v, out, grad_out))
    if q.shape[2] == 0:
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    config = _config(q.dtype, block_size)
    return prefill_backward(grad_out, grad_lse, q, k, v, out, lse, pairs, starts, block_size, sinks, scale, config)


@topk_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, pairs, starts, block_size, sinks, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, pairs, starts, block_size, sinks, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, pairs, starts)
    ctx.args = (block_size, sinks, scale)


def _backward_formula(ctx, grad_out, grad_lse):
    q, k, v, out, lse, pairs, starts = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = topk_attention_backward_op(grad_out, grad_lse, q, k, v, out, lse, pairs, starts, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


topk_attention_op.register_autograd(_backward_formula, setup_context=_setup_context)


def topk_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: TopKPattern, scale: float | None = None
) -> torch.Tensor:
    """``[B, H, T, hd]`` top-k block attention (Triton; patterns that cover every key go to SDPA)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if pattern.covers_all(q.shape[-2]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    _, pairs, starts = torch.ops.ratplus.topk_select(
        q.detach(), k.detach(), pattern.block_size, pattern.top_k, pattern.sinks, pattern.score
    )
    out, _ = torch.ops.ratplus.topk_attention(q, k, v, pairs, starts, pattern.block_size, pattern.sinks, scale)
    return out


@torch.library.custom_op("ratplus::topk_decode_attention", mutates_args=(), device_types=("cuda", "cpu"))
def topk_decode_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, summaries: torch.Tensor, pos: torch.Tensor,
    k_new: torch.Tensor, v_new: torch.Tensor, block_size: int, top_k: int, sinks: int, score: str, scale: float,
) -> torch.Tensor:
    from ratplus_titan.kernels import decode_triton

    pattern = TopKPattern(block_size, top_k, score, sinks)
    spans = decode_spans(q, summaries, pos, k_cache.shape[2], pattern)
    config = decode_triton.CONFIG
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
