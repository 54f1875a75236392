"""The RAT+ language model (DESIGN §1), top to bottom.

Block = RAT+ sequence layer, then FFN, each pre-norm with a residual; final RMSNorm;
LM head tied to the token embedding. The model knows nothing of parallelism.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ratplus_titan.head_groups import LayerPattern
from ratplus_titan.kernels.pattern_attention_dispatch import pattern_attention
from ratplus_titan.kernels.recurrence_dispatch import gated_recurrence
from ratplus_titan.model.args import RATPlusModelArgs

# The fused input projection is split in this order (DESIGN §1 step 2).
PROJECTION_PARTS = ("output_gate", "query", "key", "value", "forget_gate")


def rope_cache(head_dim: int, max_seq_len: int, theta: float, device=None) -> torch.Tensor:
    """``[max_seq_len, 2, head_dim]``: cos and sin for the rotate-half convention, fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # [T, hd]: pairs are (i, i + hd/2)
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, H, hd]`` by ``cos_sin [T, 2, hd]`` (rotate-half pairs), in fp32 (or wider)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    cos, sin = cos_sin[:, 0, None, :].to(acc), cos_sin[:, 1, None, :].to(acc)  # [T, 1, hd]
    x32 = x.to(acc)
    first, second = x32.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class RATPlusLayer(nn.Module):
    """The RAT+ sequence layer: norm -> in_proj -> recurrence -> RoPE -> pattern attention -> gate -> out_proj."""

    def __init__(self, args: RATPlusModelArgs, pattern: LayerPattern):
        super().__init__()
        self.n_heads, self.head_dim, self.apply_re = args.n_heads, args.head_dim, args.apply_re
        self.pattern = pattern
        self.attention_backend = args.attention_backend
        n_parts = 5 if args.apply_re else 4
        self.input_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.in_proj = nn.Linear(args.dim, n_parts * args.dim, bias=False)
        self.out_proj = nn.Linear(args.dim, args.dim, bias=False)

    def project(self, u: torch.Tensor) -> list[torch.Tensor]:
        """``[B, T, d] -> 4 or 5 x [B, T, H_local, hd]`` views: (o, q, k, x[, f]).

        ``in_proj`` rows are head-interleaved: ``[head][part][hd]``. A column split
        (tensor parallel) therefore hands each rank whole heads of every part; the
        adapters convert to and from the official ``[o; q; k; x; f]`` row order.
        """
        n_parts = 5 if self.apply_re else 4
        fused = self.in_proj(self.input_norm(u))  # [B, T, H_local * parts * hd]; under TP+SP, T is whole here
        return list(fused.unflatten(-1, (-1, n_parts, self.head_dim)).unbind(dim=3))

    def forward(self, u: torch.Tensor, cos_sin: torch.Tensor, pattern: LayerPattern | None = None) -> torch.Tensor:
        pattern = self.pattern if pattern is None else pattern
        parts = self.project(u)
        output_gate, query, key, value = parts[:4]  # [B, T, H, hd] each
        if self.apply_re:
            key, value = gated_recurrence(parts[4], key, value)  # fp32 scan, back in activation dtype
        q = apply_rope(query, cos_sin).transpose(1, 2)  # [B, H, T, hd]
        k = apply_rope(key, cos_sin).transpose(1, 2)
        v = value.transpose(1, 2)
        # [B, H, T, hd]; under HeadGroups each group of heads attends under its own pattern
        attn = pattern_attention(q, k, v, pattern, backend=self.attention_backend)
        attn = attn.transpose(1, 2) * torch.sigmoid(output_gate)  # [B, T, H, hd]
        return u + self.out_proj(attn.flatten(2))


class FeedForward(nn.Module):
    def __init__(self, args: RATPlusModelArgs):
        super().__init__()
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.fc1 = nn.Linear(args.dim, args.ffn_multiplier * args.dim, bias=False)
        self.fc2 = nn.Linear(args.ffn_multiplier * args.dim, args.dim, bias=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u + self.fc2(F.gelu(self.fc1(self.norm(u))))


class RATPlusBlock(nn.Module):
    def __init__(self, args: RATPlusModelArgs, layer_id: int):
        super().__init__()
        self.seq_layer = RATPlusLayer(args, args.patterns[layer_id])
        self.ffn = FeedForward(args)

    def forward(self, u: torch.Tensor, cos_sin: torch.Tensor, pattern: LayerPattern | None = None) -> torch.Tensor:
        return self.ffn(self.seq_layer(u, cos_sin, pattern))


class RATPlusModel(nn.Module):
    """tokens ``[B, T]`` -> logits ``[B, T, vocab]``.

    ``pattern`` overrides every layer's configured pattern for one call (joint training
    switches between the sparse ``D=64`` pattern and dense attention this way).
    """

    def __init__(self, args: RATPlusModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A dict keyed by str(index), as torchtitan's models do, so FSDP/AC wrap per block.
        self.layers = nn.ModuleDict({str(i): RATPlusBlock(args, i) for i in range(args.n_layers)})
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.register_buffer("cos_sin", rope_cache(args.head_dim, args.max_seq_len, args.rope_theta), persistent=False)

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """normal(0, 0.02) for every linear and embedding weight, 1 for norm scales (DESIGN §1)."""
        device = buffer_device or self.cos_sin.device
        self.cos_sin = rope_cache(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, device=device)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.args.init_std)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)

    def set_patterns(self, patterns: list[LayerPattern]) -> None:
        """Switch every layer's configured pattern (inference, adaptation)."""
        for layer, pattern in zip(self.layers.values(), patterns, strict=True):
            layer.seq_layer.pattern = pattern

    def hidden_states(self, tokens: torch.Tensor, pattern: LayerPattern | None = None) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        cos_sin = self.cos_sin[: tokens.shape[1]]
        for layer in self.layers.values():
            h = layer(h, cos_sin, pattern)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, pattern: LayerPattern | None = None) -> torch.Tensor:
        h = self.hidden_states(tokens, pattern)
        return F.linear(h, self.tok_embeddings.weight)
