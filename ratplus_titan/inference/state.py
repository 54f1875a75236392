"""The per-layer recurrence state every decoding cache holds (DESIGN §4): one fp32 row each for K_t, V_t."""

from __future__ import annotations

import torch
from torch import nn


def register_recurrence_state(
    cache: nn.Module, batch_size: int, n_heads: int, head_dim: int, recurrent: bool, device=None
) -> None:
    """fp32 ``key_state``/``value_state`` ``[B, H, hd]`` buffers (empty for a layer without recurrence)."""
    shape = (batch_size, n_heads, head_dim) if recurrent else (0,)
    cache.register_buffer("key_state", torch.zeros(shape, dtype=torch.float32, device=device), persistent=False)
    cache.register_buffer("value_state", torch.zeros(shape, dtype=torch.float32, device=device), persistent=False)
