"""The decode cache of a top-k block attention layer (``ratplus_titan/topk.py``).

Selection may pick any earlier block, so the cache keeps every row: ``k, v [B, H, T, hd]``,
row ``j`` = position ``j`` (no ``D``-fold saving). Beside them, one summary per complete
block, ``summaries [B, H, T // bs, n, hd]`` (min and max for ``quest``, the mean for
``moba``, the closing key for ``ratplus``), written when a block's last row arrives, so a
step scores ``T / bs`` summaries instead of ``T`` keys and then reads only
``S + bs + top_k * bs`` rows (``kernels/topk_attention.py``). Fixed shapes; conditional
writes are ``torch.where`` selections (CUDA-graph safe).
"""

from __future__ import annotations

import torch
from torch import nn

from ratplus_titan.inference.state import register_recurrence_state
from ratplus_titan.kernels.topk_attention import topk_decode_attention
from ratplus_titan.topk import TopKPattern


class TopKLayerCache(nn.Module):
    """``k, v [B, H, T, hd]`` and ``summaries [B, H, T // bs, n, hd]`` (activation dtype); states ``[B, H, hd]`` (fp32)."""

    def __init__(
        self,
        pattern: TopKPattern,
        batch_size: int,
        max_seq_len: int,
        n_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        recurrent: bool = True,
    ):
        super().__init__()
        self.pattern = pattern
        shape = (batch_size, n_heads, pattern.cache_rows(max_seq_len), head_dim)
        summary_shape = (batch_size, n_heads, pattern.num_blocks(max_seq_len), pattern.summary_rows, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("summaries", torch.zeros(summary_shape, dtype=dtype, device=device), persistent=False)
        register_recurrence_state(self, batch_size, n_heads, head_dim, recurrent, device)

    def fill(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        lengths: torch.Tensor,
        key_state: torch.Tensor | None = None,
        value_state: torch.Tensor | None = None,
    ) -> None:
        """After a prefill of ``lengths [B]`` tokens: ``keys, values [B, T, H, hd]`` (rotated), states ``[B, H, hd]``."""
        batch, seq_len = keys.shape[:2]
        filled = (torch.arange(seq_len, device=keys.device) < lengths[:, None])[:, None, :, None]  # [B, 1, T, 1]
        for cache, rows in ((self.k, keys), (self.v, values)):
            cache[:batch].zero_()
            cache[:batch, :, :seq_len].copy_(torch.where(filled, rows.transpose(1, 2), torch.zeros_like(rows.transpose(1, 2))))
        blocks = torch.arange(self.summaries.shape[2], device=keys.device)
        complete = ((blocks + 1) * self.pattern.block_size <= lengths[:, None])[:, None, :, None, None]  # [B, 1, NB, 1, 1]
        summaries = self.pattern.summaries(self.k[:batch])  # [B, H, NB, n, hd]
        self.summaries[:batch].copy_(torch.where(complete, summaries, torch.zeros_like(summaries)))
        if key_state is not None and self.key_state.numel():
            self.key_state[:batch].copy_(key_state)
            self.value_state[:batch].copy_(value_state)

    def attend(
        self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor, plans: dict,
        backend: str = "auto",
    ) -> torch.Tensor:  # fmt: skip
        """One decode step ``q, k_new, v_new [B, H, hd]`` at positions ``pos [B]`` -> ``[B, H, hd]``; files the row.

        ``plans`` (row-layout plans of the sparse caches) is unused. ``backend``: ``auto`` (Triton on
        CUDA, PyTorch elsewhere), ``triton`` (``kernels/topk_attention_triton.py``) or ``reference``.
        """
        if backend == "triton" or (backend == "auto" and q.is_cuda):
            from ratplus_titan.kernels.topk_attention_triton import topk_decode_attention_triton

            out = topk_decode_attention_triton(self.pattern, q, self.k, self.v, self.summaries, pos, k_new, v_new)
        elif backend in ("auto", "reference"):
            out = topk_decode_attention(self.pattern, q, self.k, self.v, self.summaries, pos, k_new, v_new)
        else:
            raise ValueError(f"top-k decode backend {backend!r} is unknown: allowed values are auto, triton, reference")
        self.store(pos, k_new, v_new)
        return out

    def store(self, pos: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Write row ``pos [B]``; when it closes a block, write that block's summary."""
        batch_idx = torch.arange(self.k.shape[0], device=pos.device)
        rows = self.k.shape[2]
        slot, write = pos.clamp(max=rows - 1), (pos < rows)[:, None, None]
        for cache, new in ((self.k, k_new), (self.v, v_new)):
            cache[batch_idx, :, slot] = torch.where(write, new.to(cache.dtype), cache[batch_idx, :, slot])
        n_blocks, bs = self.summaries.shape[2], self.pattern.block_size
        if n_blocks == 0:
            return
        block = torch.div(pos, bs, rounding_mode="floor")  # [B]
        closes = (torch.remainder(pos + 1, bs) == 0) & (block < n_blocks)
        block = block.clamp(max=n_blocks - 1)
        index = (block[:, None] * bs + torch.arange(bs, device=pos.device))[:, None, :, None]  # [B, 1, bs, 1]
        block_keys = self.k.gather(2, index.expand(-1, self.k.shape[1], -1, self.k.shape[3]))  # [B, H, bs, hd]
        summary = self.pattern.summaries(block_keys)[:, :, 0]  # [B, H, n, hd]
        old = self.summaries[batch_idx, :, block]
        self.summaries[batch_idx, :, block] = torch.where(closes[:, None, None, None], summary, old)

    def row_layouts(self) -> list:
        return []

    def kv_bytes_per_sequence(self) -> int:
        return sum(b[0].numel() * b.element_size() for b in (self.k, self.v, self.summaries))

    def state_bytes_per_sequence(self) -> int:
        return 2 * self.key_state[0].numel() * self.key_state.element_size() if self.key_state.numel() else 0

    def reset(self) -> None:
        for buffer in (self.k, self.v, self.summaries, self.key_state, self.value_state):
            buffer.zero_()
