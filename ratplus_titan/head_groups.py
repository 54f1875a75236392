"""Per-head-group hybrids (DESIGN §2): one layer's heads split into groups, each with its own pattern.

``HeadGroups(((8, DENSE), (8, Pattern(64))))``, written ``"8:dense+8:d64w0s0"``: heads 0-7 attend
densely, heads 8-15 under ``D = 64``. Attention runs per group (slice the heads, attend, concatenate);
the decode cache keeps one cache per group.

This file also holds what every pattern kind shares: ``LayerPattern`` (what one layer runs:
a ``Pattern``, a ``TopKPattern`` or ``HeadGroups``) and ``parse_layer_pattern`` (its spec string).

Tensor parallel gives rank ``r`` of ``tp`` the contiguous heads ``[r*H/tp, (r+1)*H/tp)``;
``HeadGroups.shard`` cuts the groups at those bounds (``infra/parallelize.py`` applies it), so
a group may span ranks: each rank runs its part of it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ratplus_titan.pattern import Pattern, check_count
from ratplus_titan.topk import TopKPattern

GroupPattern = Pattern | TopKPattern

_PLAIN = re.compile(r"^(dense|d-?\d+w\d+s\d+)$")  # Pattern.parse's syntax


@dataclass(frozen=True)
class HeadGroups:
    groups: tuple[tuple[int, GroupPattern], ...]

    def __post_init__(self) -> None:
        groups = tuple((count, pattern) for count, pattern in self.groups)
        object.__setattr__(self, "groups", groups)  # lists in, a hashable tuple kept
        if not groups:
            raise ValueError("HeadGroups.groups is empty: give at least one (n_heads, pattern) group")
        for i, (count, pattern) in enumerate(groups):
            if isinstance(count, bool) or not isinstance(count, int):
                raise ValueError(f"HeadGroups.groups[{i}]: n_heads={count!r} is invalid: allowed values are ints >= 1")
            check_count(f"HeadGroups.groups[{i}]: n_heads", count, 1)
            if not isinstance(pattern, (Pattern, TopKPattern)):
                raise TypeError(f"HeadGroups.groups[{i}]: {pattern!r} is not a Pattern or TopKPattern")

    # ---- construction -------------------------------------------------------
    @classmethod
    def parse(cls, spec: str) -> HeadGroups:
        """``"8:dense+8:d64w0s0"``: groups ``<n_heads>:<pattern>`` joined by ``+``, in head order."""
        groups = []
        for part in spec.strip().split("+"):
            count, sep, pattern = part.strip().partition(":")
            if not sep or not count.strip().isdigit():
                raise ValueError(
                    f"head groups {spec!r} are invalid: write '<n_heads>:<pattern>' groups joined by '+', "
                    "e.g. '8:dense+8:d64w0s0'"
                )
            inner = parse_layer_pattern(pattern.strip())
            if isinstance(inner, HeadGroups):
                raise ValueError(f"head groups {spec!r} are invalid: groups do not nest")
            groups.append((int(count), inner))
        return cls(tuple(groups))

    def __str__(self) -> str:
        return "+".join(f"{count}:{pattern}" for count, pattern in self.groups)

    # ---- properties ---------------------------------------------------------
    @property
    def n_heads(self) -> int:
        return sum(count for count, _ in self.groups)

    @property
    def patterns(self) -> list[GroupPattern]:
        return [pattern for _, pattern in self.groups]

    @property
    def is_dense(self) -> bool:
        return all(p.is_dense for p in self.patterns)

    def covers_all(self, seq_len: int) -> bool:
        return all(p.covers_all(seq_len) for p in self.patterns)

    def slices(self) -> Iterator[tuple[slice, GroupPattern]]:
        """``(heads, pattern)`` per group, ``heads`` a slice of the head axis."""
        start = 0
        for count, pattern in self.groups:
            yield slice(start, start + count), pattern
            start += count

    def check(self, n_heads: int, field: str = "head groups") -> None:
        """Raise unless the group sizes add up to ``n_heads``."""
        if self.n_heads != n_heads:
            sizes = " + ".join(str(count) for count, _ in self.groups)
            raise ValueError(
                f"{field} {str(self)!r}: head counts {sizes} = {self.n_heads} do not sum to n_heads={n_heads}"
            )

    def shard(self, rank: int, degree: int) -> HeadGroups:
        """The groups of heads ``[rank * H / degree, (rank + 1) * H / degree)`` (tensor parallel rank ``rank``)."""
        if self.n_heads % degree:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by tensor_parallel_degree={degree}")
        per_rank = self.n_heads // degree
        lo, hi = rank * per_rank, (rank + 1) * per_rank
        local = []
        for heads, pattern in self.slices():
            count = min(hi, heads.stop) - max(lo, heads.start)
            if count > 0:
                local.append((count, pattern))
        return HeadGroups(tuple(local))


LayerPattern = Pattern | TopKPattern | HeadGroups


def parse_layer_pattern(spec: str) -> LayerPattern:
    """Any layer pattern from its spec: ``"dense"``, ``"d16w256s4"``, ``"topk64k8s4-ratplus"``, ``"8:dense+8:d64w0s0"``."""
    spec = spec.strip()
    if ":" in spec:
        return HeadGroups.parse(spec)
    if spec.startswith("topk"):
        return TopKPattern.parse(spec)
    if _PLAIN.match(spec):
        return Pattern.parse(spec)  # raises naming the field for bad values
    raise ValueError(
        f"pattern {spec!r} is invalid: use 'dense', 'd<dilation>w<window>s<sinks>' (e.g. 'd16w256s4'), "
        "'topk<block_size>k<top_k>s<sinks>[-quest|-moba|-ratplus]' (e.g. 'topk64k8s4-ratplus'), "
        "or head groups '<n_heads>:<pattern>+...' (e.g. '8:dense+8:d64w0s0')"
    )


def group_members(pattern: LayerPattern) -> list[GroupPattern]:
    """The plain patterns one layer runs: the groups' patterns, or the pattern itself."""
    return pattern.patterns if isinstance(pattern, HeadGroups) else [pattern]


def resolve_layer_patterns(
    specs: Sequence[str | LayerPattern],
    n_layers: int,
    n_heads: int | None,
    field: str = "pattern",
    training: bool = False,
) -> list[LayerPattern]:
    """One ``LayerPattern`` per layer from one spec (every layer) or one per layer, validated.

    ``n_heads``: head groups must add up to it (``None``: not checked). ``training``: top-k
    patterns are refused (they are inference only).
    """
    specs = list(specs)
    if len(specs) not in (1, n_layers):
        raise ValueError(
            f"{field}: {len(specs)} patterns given for a model of {n_layers} layers: give one (every layer), "
            f"or one per layer"
        )
    patterns = []
    for i, spec in enumerate(specs):
        name = f"{field}[{i}]" if len(specs) > 1 else field
        try:
            pattern = parse_layer_pattern(spec) if isinstance(spec, str) else spec
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}: {err}") from None
        if not isinstance(pattern, (Pattern, TopKPattern, HeadGroups)):
            raise TypeError(f"{name}: {pattern!r} is neither a pattern nor a spec string like 'd16w256s4'")
        if isinstance(pattern, HeadGroups) and n_heads is not None:
            hint = "" if "+" in str(pattern) else " (one layer's groups are joined by '+', e.g. '8:dense+8:d64w0s0')"
            try:
                pattern.check(n_heads, name)
            except ValueError as err:
                raise ValueError(f"{err}{hint}") from None
        if training and any(isinstance(p, TopKPattern) for p in group_members(pattern)):
            raise ValueError(
                f"{name}: {pattern} uses top-k block attention, which is inference only; training patterns are "
                "'dense', 'd<D>w<W>s<S>' and head groups of them"
            )
        patterns.append(pattern)
    return patterns * n_layers if len(patterns) == 1 else patterns
