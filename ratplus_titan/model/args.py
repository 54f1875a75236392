"""RAT+ model hyperparameters, validated on construction, and the FLOP/parameter count."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torchtitan.protocols.model import BaseModelArgs

from ratplus_titan.pattern import Pattern, resolve_patterns

ATTENTION_BACKENDS = ("auto", "sdpa", "reference", "compact", "flex", "triton")


@dataclass
class RATPlusModelArgs(BaseModelArgs):
    dim: int = 2048
    n_layers: int = 24
    n_heads: int = 16
    vocab_size: int = 32000
    ffn_multiplier: int = 4
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    init_std: float = 0.02
    # False: the attention baseline (no forget gate, keys/values are k, x directly).
    apply_re: bool = True
    # Training pattern, one value or one per layer (hybrids). Default: dense.
    dilation: int | list[int] = 1
    local_window: int | list[int] = 0
    sinks: int | list[int] = 0
    attention_backend: str = "auto"
    patterns: list[Pattern] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} is invalid: allowed values are >= 1")
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.n_heads} must be even for RoPE")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend={self.attention_backend!r} is invalid: allowed values are {', '.join(ATTENTION_BACKENDS)}"
            )
        self.patterns = resolve_patterns(self.n_layers, self.dilation, self.local_window, self.sinks, "ratplus.")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def set_pattern(
        self, dilation: int | list[int], local_window: int | list[int], sinks: int | list[int]
    ) -> None:
        self.dilation, self.local_window, self.sinks = dilation, local_window, sinks
        self.patterns = resolve_patterns(self.n_layers, dilation, local_window, sinks, "ratplus.")

    def check_seq_len(self, seq_len: int, extra: tuple[Pattern, ...] = ()) -> None:
        """Raise if ``seq_len`` is one that a configured pattern cannot serve."""
        if seq_len <= 0:
            raise ValueError(f"training.seq_len={seq_len} is invalid: allowed values are >= 1")
        for pattern in [*self.patterns, *extra]:
            if pattern.dilation > seq_len:
                raise ValueError(
                    f"training.seq_len={seq_len} cannot serve pattern {pattern}: no position would be a dilated key; "
                    f"use seq_len >= {pattern.dilation} or a dilation in [1, {seq_len}] (or -1)"
                )

    def update_from_config(self, job_config, **kwargs) -> None:
        """Take seq_len and the ``[ratplus]`` section of a torchtitan job config."""
        section = getattr(job_config, "ratplus", None)
        if section is not None:
            if section.apply_re is not None:
                self.apply_re = section.apply_re
            if section.attention_backend:
                self.attention_backend = section.attention_backend
            self.__post_init__()
            from ratplus_titan.config import per_layer

            self.set_pattern(per_layer(section.dilation), per_layer(section.local_window), per_layer(section.sinks))
        seq_len = job_config.training.seq_len
        joint = (Pattern(section.joint_dilation),) if section is not None and section.joint_train else ()
        self.check_seq_len(seq_len, joint)
        self.max_seq_len = seq_len

    # ---- counts -------------------------------------------------------------
    def attention_pairs(self, seq_len: int, pattern: Pattern) -> float:
        """Average number of (query, key) pairs a query attends to, over positions 0..T-1."""
        if pattern.covers_all(seq_len):
            return (seq_len + 1) / 2
        return float(pattern.dense_mask(seq_len).sum()) / seq_len

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int, patterns: list[Pattern] | None = None) -> tuple[int, int]:
        """Parameters, and training FLOPs per token (forward + backward = 3x forward).

        Counts the matmuls (6 per parameter, embedding excluded as a lookup but the tied
        head included), the attention of each layer's real pattern (QK^T and PV), and the
        recurrence (a handful of elementwise FLOPs per channel: sigmoid, two fused
        multiply-adds for K and V).
        """
        nparams = sum(p.numel() for p in model.parameters())
        # The embedding lookup is free but the tied head multiplies by the same weights,
        # so every parameter but the norm scales is one matmul weight.
        matmul_params = nparams - (2 * self.n_layers + 1) * self.dim
        patterns = self.patterns if patterns is None else patterns
        attention = sum(4 * self.dim * self.attention_pairs(seq_len, p) for p in patterns)  # fwd: 2*QK + 2*PV
        recurrence = (10 * self.dim * self.n_layers) if self.apply_re else 0
        flops = 6 * matmul_params + 3 * attention + 3 * recurrence
        return nparams, int(flops)
