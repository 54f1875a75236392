"""Softmax attention under a RAT+ pattern (DESIGN §2): the plain PyTorch references.

Shapes: ``q, k, v`` are ``[B, H, T, hd]``; outputs ``[B, H, T, hd]``.

- ``pattern_attention_reference``: one softmax over the explicit boolean mask.
- ``pattern_attention_compact``: the fast exact prefill in plain PyTorch: the
  compact dilated rows (positions ``D-1 mod D``) with a block-causal mask that
  leaves out what the local/sink part covers, the local window + sinks
  separately, merged by their log-sum-exp weights.
- ``masked_attention`` / ``merge_by_lse``: the softmax over a boolean mask and the log-sum-exp
  merge of two softmaxes, reused by the top-k and decode references and the Flex path.

This module imports no fast path; ``pattern_attention_dispatch.py`` chooses between it, the
Triton kernel (``pattern_attention_triton.py``) and FlexAttention (``pattern_attention_flex.py``).
"""

from __future__ import annotations

import torch

from ratplus_titan.pattern import Pattern


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over a boolean ``[Tq, Tk]`` mask -> (out ``[B,H,Tq,hd]``, lse ``[B,H,Tq]``).

    Rows with no visible key give out 0 and lse -inf.
    """
    scores = (q @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(scores.dtype).min))
    out = (probs.to(v.dtype) @ v).to(q.dtype)
    return out, lse


def merge_by_lse(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Combine two softmax attentions over disjoint key sets into the one over their union."""
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - lse).unsqueeze(-1)
    weight_b = torch.exp(lse_b - lse).unsqueeze(-1)
    acc = torch.promote_types(out_a.dtype, torch.float32)
    return (out_a.to(acc) * weight_a + out_b.to(acc) * weight_b).to(out_a.dtype)


def pattern_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float | None = None
) -> torch.Tensor:
    """One softmax over the pattern's explicit mask."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = pattern.dense_mask(q.shape[-2], k.shape[-2], device=q.device)
    return masked_attention(q, k, v, mask, scale)[0]


def compact_rows(x: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Rows at positions ``D-1, 2D-1, ...`` of ``[B, H, T, hd]`` -> ``[B, H, T // D, hd]``."""
    return x[..., pattern.dilation - 1 :: pattern.dilation, :]


def pattern_attention_compact(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float | None = None
) -> torch.Tensor:
    """The compact + local/sink + log-sum-exp merge prefill, in plain PyTorch."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    seq_len = q.shape[-2]
    q_idx = torch.arange(seq_len, device=q.device)[:, None]
    kv_idx = torch.arange(seq_len, device=q.device)[None, :]
    out, lse = masked_attention(q, k, v, pattern.local_allows(q_idx, kv_idx), scale)
    num_rows = pattern.num_dilated_rows(seq_len)
    if num_rows == 0:
        return out
    rows = torch.arange(num_rows, device=q.device)[None, :]
    compact_out, compact_lse = masked_attention(
        q, compact_rows(k, pattern), compact_rows(v, pattern), pattern.compact_allows(q_idx, rows), scale
    )
    return merge_by_lse(out, lse, compact_out, compact_lse)
