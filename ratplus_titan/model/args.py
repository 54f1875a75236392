"""RAT+ model hyperparameters, validated on construction, and the FLOP/parameter count."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn
from torchtitan.protocols.model import BaseModelArgs
from torchtitan.tools import utils as tt_utils

from ratplus_titan.config import ConfigError, per_layer
from ratplus_titan.head_groups import HeadGroups, LayerPattern, group_members, resolve_layer_patterns
from ratplus_titan.pattern import DENSE, Pattern, check_dilation, resolve_patterns

ATTENTION_BACKENDS = ("auto", "sdpa", "reference", "compact", "flex", "triton")


def training_backends(on_gpu: bool) -> tuple[str, ...]:
    """The attention backends that can train here: ``triton`` needs a CUDA GPU (or Triton's
    interpreter, ``TRITON_INTERPRET=1``, as the tests run it); ``flex`` has no backward on CPU."""
    if on_gpu:
        return ATTENTION_BACKENDS
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return tuple(b for b in ATTENTION_BACKENDS if b != "flex" and (b != "triton" or interpreted))


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
    # Layer pattern specs, one for every layer or one per layer, replacing dilation/local_window/sinks:
    # plain patterns ("d16w256s4") or head groups ("8:dense+8:d64w0s0"). Empty: use dilation/...
    head_groups: list[str] = field(default_factory=list)
    attention_backend: str = "auto"
    patterns: list[LayerPattern] = field(init=False, repr=False, default_factory=list)

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
                f"ratplus.attention_backend={self.attention_backend!r} is invalid: "
                f"allowed values are {', '.join(ATTENTION_BACKENDS)}"
            )
        self.patterns = self._resolve_patterns()

    def _resolve_patterns(self) -> list[LayerPattern]:
        patterns = resolve_patterns(self.n_layers, self.dilation, self.local_window, self.sinks, "ratplus.")
        if isinstance(self.head_groups, str):
            self.head_groups = [self.head_groups]
        if not self.head_groups:
            return patterns
        if any(p != DENSE for p in patterns):
            raise ValueError(
                "ratplus.head_groups and ratplus.dilation/local_window/sinks are both set: give the pattern one way "
                "(head_groups entries may be plain patterns too, e.g. 'd16w256s4')"
            )
        return resolve_layer_patterns(self.head_groups, self.n_layers, self.n_heads, "ratplus.head_groups", training=True)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def set_pattern(
        self,
        dilation: int | list[int],
        local_window: int | list[int],
        sinks: int | list[int],
        head_groups: list[str] | None = None,
    ) -> None:
        self.dilation, self.local_window, self.sinks = dilation, local_window, sinks
        self.head_groups = list(head_groups or [])
        self.patterns = self._resolve_patterns()

    def check_seq_len(self, seq_len: int, extra: tuple[Pattern, ...] = ()) -> None:
        """Raise if ``seq_len`` is one that a configured pattern cannot serve."""
        if seq_len <= 0:
            raise ValueError(f"training.seq_len={seq_len} is invalid: allowed values are >= 1")
        for pattern in [m for p in [*self.patterns, *extra] for m in group_members(p)]:
            if isinstance(pattern, Pattern) and pattern.dilation > seq_len:
                raise ValueError(
                    f"training.seq_len={seq_len} cannot serve pattern {pattern}: no position would be a dilated key; "
                    f"use seq_len >= {pattern.dilation} or a dilation in [1, {seq_len}] (or -1)"
                )

    def update_from_config(self, job_config, **kwargs) -> None:
        """Take seq_len and the ``[ratplus]`` section of a torchtitan job config.

        A value the model cannot take raises ``ConfigError`` naming the ``[ratplus]`` (or ``training``) field.
        """
        section = getattr(job_config, "ratplus", None)
        try:
            if section is not None:
                if section.apply_re is not None:
                    self.apply_re = section.apply_re
                if section.attention_backend:
                    self.attention_backend = section.attention_backend
                self.__post_init__()
                self._check_backend_trains_here()
                columns = (per_layer(section.dilation), per_layer(section.local_window), per_layer(section.sinks))
                self.set_pattern(*columns, section.head_groups)
            joint = ()
            if section is not None and section.joint_train:
                check_dilation("ratplus.joint_dilation", section.joint_dilation)
                joint = (Pattern(section.joint_dilation),)
            self.check_seq_len(job_config.training.seq_len, joint)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        self.max_seq_len = job_config.training.seq_len

    def _check_backend_trains_here(self) -> None:
        """Raise unless ``attention_backend`` can train on the trainer's device (torchtitan's ``device_type``)."""
        allowed = training_backends(tt_utils.device_type == "cuda" and torch.cuda.is_available())
        if self.attention_backend not in allowed:
            raise ValueError(
                f"ratplus.attention_backend={self.attention_backend!r} cannot train on this machine (no CUDA GPU): "
                f"allowed values here are {', '.join(allowed)}"
            )

    def dense_patterns(self, seq_len: int) -> list[Pattern]:
        """The sparse patterns configured (per layer, per head group) that are dense attention at ``seq_len``:
        their local window (``>= seq_len - 1``) or sinks (``>= seq_len``) cover every earlier key."""
        members = {m for p in self.patterns for m in group_members(p) if isinstance(m, Pattern)}
        return sorted((m for m in members if not m.is_dense and m.covers_all(seq_len)), key=str)

    # ---- counts -------------------------------------------------------------
    def attention_pairs(self, seq_len: int, pattern: LayerPattern) -> float:
        """Average number of (query, key) pairs a query attends to, over positions 0..T-1 (and heads)."""
        if pattern.covers_all(seq_len):
            return (seq_len + 1) / 2
        if isinstance(pattern, HeadGroups):
            return sum(n * self.attention_pairs(seq_len, p) for n, p in pattern.groups) / pattern.n_heads
        if not isinstance(pattern, Pattern):
            raise TypeError(f"no training FLOP count for {pattern}: top-k patterns are inference only")
        return float(pattern.dense_mask(seq_len).sum()) / seq_len

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int, patterns: list[LayerPattern] | None = None) -> tuple[int, int]:
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
