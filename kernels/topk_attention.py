"""Top-k block attention (``ratplus_titan/topk.py``): full-sequence and decode references, plain PyTorch.

- ``topk_attention_reference``: ``q, k, v [B, H, T, hd]`` -> ``[B, H, T, hd]``. Scores every
  complete block against every query, selects per query, builds the explicit
  ``[B, H, T, T]`` key mask and runs one masked softmax.
- ``topk_decode_attention``: one query per sequence over a cache that keeps every row
  plus per-block summaries. It selects blocks with the same scoring, gathers only the rows
  the query may see (sinks, own block, selected blocks: ``S + bs + top_k * bs`` rows) and
  merges them with the new token's own row by log-sum-exp. Fixed shapes (CUDA-graph safe).
"""

from __future__ import annotations

import torch

from ratplus_titan.kernels.pattern_attention import masked_attention, merge_by_lse
from ratplus_titan.topk import TopKPattern


def topk_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: TopKPattern, scale: float | None = None
) -> torch.Tensor:
    """One softmax over the explicit per-query mask built from the block scores (queries = the last ``Tq`` keys)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_len, kv_len = q.shape[-2], k.shape[-2]
    q_idx = torch.arange(kv_len - q_len, kv_len, device=q.device)
    kv_idx = torch.arange(kv_len, device=q.device)
    scores = pattern.scores(q, pattern.summaries(k))  # [B, H, Tq, NB]
    selected = pattern.selected_blocks(scores, q_idx)  # [B, H, Tq, NB]
    mask = pattern.allows(q_idx[:, None], kv_idx[None, :], selected)  # [B, H, Tq, Tk]
    return masked_attention(q, k, v, mask, scale)[0]


def topk_decode_rows(
    pattern: TopKPattern, q: torch.Tensor, summaries: torch.Tensor, pos: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache rows query ``q [B, H, hd]`` at positions ``pos [B]`` may see (its own row aside).

    ``summaries [B, H, NB, n, hd]`` of the complete blocks; ``n_rows``: rows of the cache.
    Returns row indices and validity, ``[B, H, N]`` with ``N = S + bs + K * bs``; each visible row
    appears exactly once.
    """
    bs, sinks = pattern.block_size, min(pattern.sinks, n_rows)
    t = pos[:, None, None]  # [B, 1, 1]
    device = q.device
    scores = pattern.scores(q[:, :, None], summaries)[:, :, 0]  # [B, H, NB]
    blocks, picked = pattern.top_blocks(scores, pos[:, None])  # [B, H, K]
    own_block = torch.div(t, bs, rounding_mode="floor")  # [B, 1, 1]
    # selected blocks: complete, earlier, all in the cache
    sel_rows = (blocks[..., None] * bs + torch.arange(bs, device=device)).flatten(-2)  # [B, H, K * bs]
    sel_valid = picked[..., None].expand(*picked.shape, bs).flatten(-2)
    # own block, up to (not including) the query's own row
    own_rows = (own_block * bs + torch.arange(bs, device=device)).expand(*blocks.shape[:2], bs)  # [B, H, bs]
    own_valid = own_rows < t
    # sinks not already counted in the own block or a selected block
    sink_rows = torch.arange(sinks, device=device).expand(*blocks.shape[:2], sinks)  # [B, H, S]
    sink_block = torch.div(sink_rows, bs, rounding_mode="floor")
    in_selected = ((sink_block[..., None] == blocks[..., None, :]) & picked[..., None, :]).any(-1)
    sink_valid = (sink_rows < t) & (sink_block != own_block) & ~in_selected
    rows = torch.cat([sink_rows, own_rows, sel_rows], dim=-1).clamp(max=n_rows - 1)
    valid = torch.cat([sink_valid, own_valid, sel_valid], dim=-1)
    return rows, valid


def topk_decode_attention(
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
    """``q, k_new, v_new [B, H, hd]``; caches ``[B, H, R, hd]`` (row ``j`` = position ``j``) -> ``[B, H, hd]``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rows, valid = topk_decode_rows(pattern, q, summaries, pos, k_cache.shape[2])  # [B, H, N]
    index = rows[..., None].expand(*rows.shape, k_cache.shape[-1])
    keys, values = k_cache.gather(2, index), v_cache.gather(2, index)  # [B, H, N, hd]
    out, lse = masked_attention(q[:, :, None], keys, values, valid[:, :, None, :], scale)  # [B, H, 1, hd], [B, H, 1]
    self_lse = (q.float() * k_new.float()).sum(-1, keepdim=True) * scale  # [B, H, 1]
    return merge_by_lse(out, lse, v_new[:, :, None].to(out.dtype), self_lse)[:, :, 0]
