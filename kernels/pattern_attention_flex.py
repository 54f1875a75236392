"""FlexAttention path of the sparse prefill (CUDA): compact dilated rows + local/sinks, merged."""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from ratplus_titan.kernels.pattern_attention import compact_rows, merge_by_lse
from ratplus_titan.pattern import Pattern

_flex_attention = torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=64)
def _block_masks(pattern: Pattern, seq_len: int, device: str):
    def local_mask(b, h, q_idx, kv_idx):
        return pattern.local_allows(q_idx, kv_idx)

    def compact_mask(b, h, q_idx, row):
        return pattern.compact_allows(q_idx, row)

    local = create_block_mask(local_mask, None, None, seq_len, seq_len, device=device)
    num_rows = pattern.num_dilated_rows(seq_len)
    compact = create_block_mask(compact_mask, None, None, seq_len, num_rows, device=device) if num_rows else None
    return local, compact


def flex_pattern_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float
) -> torch.Tensor:
    """``[B, H, T, hd]`` attention under ``pattern`` with two FlexAttention calls and a merge."""
    seq_len = q.shape[-2]
    local_mask, compact_mask = _block_masks(pattern, seq_len, str(q.device))
    out, lse = _flex_attention(q, k, v, block_mask=local_mask, scale=scale, return_lse=True)
    if compact_mask is None:
        return out
    compact_out, compact_lse = _flex_attention(
        q,
        compact_rows(k, pattern).contiguous(),
        compact_rows(v, pattern).contiguous(),
        block_mask=compact_mask,
        scale=scale,
        return_lse=True,
    )
    return merge_by_lse(out, lse, compact_out, compact_lse)
