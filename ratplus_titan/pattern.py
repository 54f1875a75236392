"""The RAT+ attention pattern: one definition, reused by every attention path.

A query at position ``t`` may see a key ``j <= t`` when any of these holds
(DESIGN §2):

- dilated ``D``: ``(j + 1) % D == 0`` (the recurrent state closing a length-D stretch);
- local ``W``:   ``t - j <= W``;
- sinks ``S``:   ``j < S``.

``Pattern(dilation=1)`` is dense causal attention; ``dilation=-1`` turns the
dilated part off (sliding window + sinks).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

_SPEC = re.compile(r"^d(-?\d+)w(\d+)s(\d+)$")

MAX_PATTERN_INT = 2**31 - 1
"""The largest dilation, window, sink count, block size or head count a pattern takes: positions are
32-bit in the kernels, and a larger value would mean nothing for any sequence that fits in memory."""


def check_count(field: str, value: int, minimum: int) -> None:
    """Raise ``ValueError`` naming ``field`` unless ``minimum <= value <= MAX_PATTERN_INT``."""
    if not minimum <= value <= MAX_PATTERN_INT:
        raise ValueError(f"{field}={value} is invalid: allowed values are >= {minimum} (at most {MAX_PATTERN_INT})")


def check_dilation(field: str, value: int) -> None:
    """Raise ``ValueError`` naming ``field`` unless ``value`` is -1 or in ``[1, MAX_PATTERN_INT]``."""
    if value != -1 and not 1 <= value <= MAX_PATTERN_INT:
        raise ValueError(
            f"{field}={value} is invalid: allowed values are -1 (no dilated keys) or an integer >= 1 (1 = dense), "
            f"at most {MAX_PATTERN_INT}"
        )


@dataclass(frozen=True)
class Pattern:
    dilation: int = 1
    local_window: int = 0
    sinks: int = 0

    def __post_init__(self) -> None:
        for name in ("dilation", "local_window", "sinks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Pattern.{name} must be an int, got {value!r}")
        check_dilation("Pattern.dilation", self.dilation)
        check_count("Pattern.local_window", self.local_window, 0)
        check_count("Pattern.sinks", self.sinks, 0)

    # ---- construction -------------------------------------------------------
    @classmethod
    def parse(cls, spec: str) -> Pattern:
        """``"dense"`` or ``"d16w256s4"`` (dilation 16, window 256, sinks 4)."""
        if spec == "dense":
            return cls()
        match = _SPEC.match(spec.strip())
        if match is None:
            raise ValueError(f"pattern {spec!r} is invalid: use 'dense' or 'd<dilation>w<window>s<sinks>', e.g. 'd16w256s4'")
        return cls(int(match[1]), int(match[2]), int(match[3]))

    def __str__(self) -> str:
        return "dense" if self.is_dense else f"d{self.dilation}w{self.local_window}s{self.sinks}"

    # ---- properties ---------------------------------------------------------
    @property
    def is_dense(self) -> bool:
        return self.dilation == 1

    def covers_all(self, seq_len: int) -> bool:
        """True when the pattern is dense causal attention for sequences of ``seq_len``."""
        return self.is_dense or self.local_window >= seq_len - 1 or self.sinks >= seq_len

    def num_dilated_rows(self, seq_len: int) -> int:
        """Positions ``j < seq_len`` with ``(j + 1) % D == 0``."""
        return 0 if self.dilation == -1 else seq_len // self.dilation

    def cache_rows(self, seq_len: int) -> int:
        """KV rows a decoder keeps for ``seq_len`` tokens: sinks + window + ceil(T / D) (DESIGN §4)."""
        if self.is_dense:
            return seq_len
        dilated = 0 if self.dilation == -1 else math.ceil(seq_len / self.dilation)
        return min(seq_len, self.sinks + self.local_window + dilated)

    # ---- the mask, as a pure function of (query index, key index) -----------
    def allows(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """Boolean mask (broadcasting): may query ``q_idx`` attend to key ``kv_idx``?"""
        causal = kv_idx <= q_idx
        visible = (q_idx - kv_idx <= self.local_window) | (kv_idx < self.sinks)
        if self.dilation != -1:
            visible = visible | ((kv_idx + 1) % self.dilation == 0)
        return causal & visible

    def mask_mod(self):
        """FlexAttention ``mask_mod`` of this pattern."""

        def mask(b, h, q_idx, kv_idx):
            return self.allows(q_idx, kv_idx)

        return mask

    def dense_mask(self, q_len: int, kv_len: int | None = None, device=None) -> torch.Tensor:
        """Explicit ``[q_len, kv_len]`` boolean mask (queries are the last ``q_len`` positions)."""
        kv_len = q_len if kv_len is None else kv_len
        q_idx = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        kv_idx = torch.arange(kv_len, device=device)[None, :]
        return self.allows(q_idx, kv_idx)

    # ---- the compact (dilated-rows-only) part of the fast prefill ----------
    def compact_position(self, row: torch.Tensor) -> torch.Tensor:
        """Sequence position of compact dilated row ``row``: ``row * D + D - 1``."""
        return row * self.dilation + (self.dilation - 1)

    def compact_allows(self, q_idx: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """May query ``q_idx`` see compact row ``row`` without the local/sink part also covering it?"""
        pos = self.compact_position(row)
        return (pos >= self.sinks) & (pos < q_idx - self.local_window)

    def local_allows(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """The local-window + sinks part of the pattern (no dilated keys)."""
        return (kv_idx <= q_idx) & ((q_idx - kv_idx <= self.local_window) | (kv_idx < self.sinks))


DENSE = Pattern()


def resolve_patterns(
    n_layers: int,
    dilation: int | list[int],
    local_window: int | list[int],
    sinks: int | list[int],
    field_prefix: str = "",
) -> list[Pattern]:
    """One ``Pattern`` per layer from scalars or per-layer lists (hybrids), validated.

    Errors name the field as ``{field_prefix}dilation`` (one value) or ``{field_prefix}dilation[i]`` (a list).
    """
    columns = {}
    for name, value in (("dilation", dilation), ("local_window", local_window), ("sinks", sinks)):
        if isinstance(value, (list, tuple)):
            if len(value) != n_layers:
                raise ValueError(
                    f"{field_prefix}{name} has {len(value)} values but the model has {n_layers} layers: "
                    f"give one int, or a list of exactly {n_layers} ints"
                )
            named = [(f"{field_prefix}{name}[{layer}]", v) for layer, v in enumerate(value)]
        else:
            named = [(f"{field_prefix}{name}", value)] * n_layers
        for field, v in named:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{field}={v!r} is invalid: allowed values are integers")
            if name == "dilation":
                check_dilation(field, v)
            else:
                check_count(field, v, 0)
        columns[name] = [v for _, v in named]
    return [Pattern(*row) for row in zip(columns["dilation"], columns["local_window"], columns["sinks"])]
