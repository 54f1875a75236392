"""``prefill`` and ``decode_one_token``: plain functions over a ``RATPlusModel`` and a ``DecodeCache``.

They reuse the model's own pieces (``RATPlusLayer.project``, ``gated_recurrence`` /
``recurrence_step``, ``apply_rope``, ``pattern_attention``, ``out_proj``, ``FeedForward``);
what differs from ``RATPlusLayer.forward`` is only that they keep what the cache needs.
``decode_one_token`` has fixed shapes and no Python state that depends on the step, so it
can be compiled once or captured in a CUDA graph (``generate.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ratplus_titan.inference.cache import AnyLayerCache, DecodeCache, StepPlans
from ratplus_titan.kernels.pattern_attention_dispatch import pattern_attention
from ratplus_titan.kernels.recurrence_dispatch import gated_recurrence, recurrence_step
from ratplus_titan.model.model import RATPlusBlock, RATPlusModel, apply_rope


def _prefill_block(
    block: RATPlusBlock, h: torch.Tensor, cos_sin: torch.Tensor, lengths: torch.Tensor, cache: AnyLayerCache
) -> torch.Tensor:
    """``h [B, T, d]`` -> ``[B, T, d]``; fills ``cache`` with the rows of the first ``lengths[b]`` positions."""
    layer = block.seq_layer
    batch, seq_len, _ = h.shape
    parts = layer.project(h)
    output_gate, query, key, value = parts[:4]  # [B, T, H, hd]
    key_state = value_state = None
    if layer.apply_re:
        # fp32 inputs give the scan's fp32 states: the decode continues from them exactly.
        key32, value32 = gated_recurrence(parts[4].float(), key.float(), value.float())  # [B, T, H, hd]
        last = (lengths - 1).clamp(min=0)
        batch_idx = torch.arange(batch, device=h.device)
        key_state, value_state = key32[batch_idx, last], value32[batch_idx, last]  # [B, H, hd]
        key, value = key32.to(h.dtype), value32.to(h.dtype)
    q = apply_rope(query, cos_sin)  # [B, T, H, hd]
    k = apply_rope(key, cos_sin)
    cache.fill(k, value, lengths, key_state, value_state)
    attn = pattern_attention(
        q.transpose(1, 2), k.transpose(1, 2), value.transpose(1, 2), layer.pattern, backend=layer.attention_backend
    )  # [B, H, T, hd]
    attn = attn.transpose(1, 2) * torch.sigmoid(output_gate)
    h = h + layer.out_proj(attn.reshape(batch, seq_len, -1))
    return block.ffn(h)


@torch.no_grad()
def prefill(
    model: RATPlusModel, cache: DecodeCache, tokens: torch.Tensor, lengths: torch.Tensor, all_logits: bool = False
) -> torch.Tensor:
    """Run right-padded prompts ``tokens [B, T]`` of ``lengths [B]`` tokens; fill ``cache``; set ``cache.pos``.

    Returns the logits of each prompt's last token ``[B, V]`` (``all_logits``: ``[B, T, V]``).
    Right padding never changes a prompt's results: everything is causal.
    """
    batch, seq_len = tokens.shape
    if batch != cache.batch_size:
        raise ValueError(f"prefill batch {batch} != cache batch {cache.batch_size}")
    h = model.tok_embeddings(tokens)
    cos_sin = model.cos_sin[:seq_len]
    for block, layer_cache in zip(model.layers.values(), cache.layers, strict=True):
        h = _prefill_block(block, h, cos_sin, lengths, layer_cache)
    cache.pos.copy_(lengths)
    if not all_logits:
        h = h[torch.arange(batch, device=h.device), (lengths - 1).clamp(min=0)]  # [B, d]
    return F.linear(model.norm(h), model.tok_embeddings.weight)


def _decode_block(
    block: RATPlusBlock,
    h: torch.Tensor,
    cos_sin: torch.Tensor,
    pos: torch.Tensor,
    plans: StepPlans,
    cache: AnyLayerCache,
    backend: str,
) -> torch.Tensor:
    """``h [B, d]`` of one token per sequence (RoPE rows ``cos_sin [B, 2, hd]``) -> ``[B, d]``; files its rows in ``cache``."""
    layer = block.seq_layer
    batch = h.shape[0]
    parts = [p[:, 0] for p in layer.project(h[:, None])]  # [B, H, hd] each
    output_gate, query, key, value = parts[:4]
    if layer.apply_re:
        key_state, value_state = recurrence_step(parts[4], key, value, cache.key_state, cache.value_state)
        cache.key_state.copy_(key_state)
        cache.value_state.copy_(value_state)
        key, value = key_state.to(h.dtype), value_state.to(h.dtype)
    # apply_rope rotates [B, T, H, hd] by [T, 2, hd]: put the batch on the time axis so each
    # sequence is rotated at its own position.
    q = apply_rope(query[None], cos_sin)[0]  # [B, H, hd]
    k = apply_rope(key[None], cos_sin)[0]
    attn = cache.attend(q, k, value, pos, plans, backend)  # [B, H, hd]; files the new row
    h = h + layer.out_proj((attn * torch.sigmoid(output_gate)).reshape(batch, -1))
    return block.ffn(h)


@torch.no_grad()
def decode_one_token(
    model: RATPlusModel, cache: DecodeCache, tokens: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """One token per sequence ``tokens [B]`` at positions ``cache.pos`` -> logits ``[B, V]``; advances ``pos``."""
    pos = cache.pos
    cos_sin = model.cos_sin[pos.clamp(max=model.cos_sin.shape[0] - 1)]  # [B, 2, hd]
    h = model.tok_embeddings(tokens)  # [B, d]
    plans = cache.step_plans()  # [B, R] masks and row moves, once per distinct row layout
    for block, layer_cache in zip(model.layers.values(), cache.layers, strict=True):
        h = _decode_block(block, h, cos_sin, pos, plans, layer_cache, backend)
    cache.pos.add_(1)
    return F.linear(model.norm(h), model.tok_embeddings.weight)
