"""Decode attention and the cache update (``decode.py`` for the shapes), choosing the implementation.

``backend``: ``auto`` (Triton on CUDA, the reference elsewhere), ``triton`` (``decode_triton.py``)
or ``reference`` (``decode.py``). The Triton module is imported only when chosen.
"""

from __future__ import annotations

import torch

from ratplus_titan.kernels.decode import cache_update_reference, decode_attention_reference


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    valid: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``decode_attention_reference``'s contract, by ``backend``: ``auto``, ``triton`` or ``reference``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend == "auto":
        backend = "triton" if q.is_cuda else "reference"
    if backend == "reference":
        return decode_attention_reference(q, k_cache, v_cache, valid, k_new, v_new, scale)
    if backend == "triton":
        from ratplus_titan.kernels.decode_triton import decode_attention_triton

        return decode_attention_triton(q, k_cache, v_cache, valid, k_new, v_new, scale)
    raise ValueError(f"decode attention backend {backend!r} is unknown: allowed values are auto, triton, reference")


def cache_update(
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
    backend: str = "auto",
) -> None:
    """Dispatch ``cache_update_reference``'s contract: one Triton kernel on CUDA, the reference elsewhere."""
    if backend == "auto":
        backend = "triton" if k_cache.is_cuda else "reference"
    if backend == "reference":
        return cache_update_reference(k_cache, v_cache, k_new, v_new, move_src, move_dst, move, slot, write, move_from_new)
    if backend == "triton":
        from ratplus_titan.kernels.decode_triton import cache_update_triton

        return cache_update_triton(k_cache, v_cache, k_new, v_new, move_src, move_dst, move, slot, write, move_from_new)
    raise ValueError(f"cache update backend {backend!r} is unknown: allowed values are auto, triton, reference")
