"""Decode attention: one new query per sequence over its cache rows (DESIGN §4), plain PyTorch references.

Shapes::

    q               [B, H, hd]      the new token's rotated query
    k_cache, v_cache [B, H, R, hd]  the cache rows (rotated keys, values)
    valid           [B, R] bool     which rows this sequence's query may see, or
                    [B] int         a count: rows [0, count) are valid (a prefix)
    k_new, v_new    [B, H, hd]      the new token's own rotated key and value ("itself")
    out             [B, H, hd]

The new token's own row is a separate argument rather than a cache row, so the cache
needs no spare slot: the row leaving the local window at this step is still visible to
this query and is only overwritten after the attention (``inference/cache.py``).

This module imports no fast path: ``decode_dispatch.py`` chooses between these references
and the Triton kernels (``decode_triton.py``) on CUDA.
"""

from __future__ import annotations

import torch

from ratplus_titan.kernels.pattern_attention import masked_attention, merge_by_lse


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    valid: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax over the valid cache rows plus the new row, merged by log-sum-exp (plain PyTorch)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if valid.dtype != torch.bool:  # counts -> prefix mask
        valid = torch.arange(k_cache.shape[2], device=valid.device)[None, :] < valid[:, None]
    # Cache part: one query row per (sequence, head); the mask broadcasts over heads.
    out, lse = masked_attention(q[:, :, None], k_cache, v_cache, valid[:, None, None, :], scale)  # [B,H,1,hd], [B,H,1]
    # The new row alone: softmax over one key is that key's value, with lse = its score.
    self_lse = (q.float() * k_new.float()).sum(-1, keepdim=True) * scale  # [B, H, 1]
    return merge_by_lse(out, lse, v_new[:, :, None].to(out.dtype), self_lse)[:, :, 0]


def cache_update_reference(
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
    """In place, per sequence ``b`` (all ``[B]`` index tensors), fixed shapes::

        if move[b]:  cache[b, :, move_dst[b]] = cache[b, :, move_src[b]]   (or the new row if move_from_new)
        if write[b]: cache[b, :, slot[b]] = new[b]

    for the key and the value caches ``[B, H, R, hd]`` and new rows ``[B, H, hd]``. Conditional
    writes re-store the old row, so every index must be in range.
    """
    batch_idx = torch.arange(k_cache.shape[0], device=k_cache.device)
    for cache, new in ((k_cache, k_new), (v_cache, v_new)):
        src = new if move_from_new else cache[batch_idx, :, move_src]  # [B, H, hd]
        cache[batch_idx, :, move_dst] = torch.where(move[:, None, None], src, cache[batch_idx, :, move_dst])
        cache[batch_idx, :, slot] = torch.where(write[:, None, None], new.to(cache.dtype), cache[batch_idx, :, slot])
