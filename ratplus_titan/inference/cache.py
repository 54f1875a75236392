"""The sparse decode cache (DESIGN §4): static shapes, per-sequence positions, no per-token Python state.

Per layer and sequence, for a pattern ``(D, W, S)`` and at most ``T`` tokens:

- the recurrence state ``K_t, V_t`` (fp32, one row each);
- ``R = pattern.cache_rows(T)`` rows of rotated keys and values, ``[B, H, R, hd]``.

Two row layouts, chosen once per layer from the pattern and ``T``:

**sparse** (``S + W + ceil(T / D) < T``)::

    slots [0, S)            sinks:  position p < S lives in slot p
    slots [S, S + W)        ring:   position p >= S lives in slot S + (p - S) % W while t - p <= W
    slots [S + W, R)        dilated rows: position p = i*D + D - 1 (p >= S) lives in slot
                            S + W + (p // D - S // D) once it has left the ring

  Every filled slot holds a key the next query may see, and every key it may see
  (except itself) is in a slot: the valid rows are exactly the pattern.

**full** (otherwise, e.g. dense): position p lives in slot p; the mask ``pattern.allows``
picks the visible ones.

A decode step at position ``t`` (per sequence, ``pos[b]``) attends over the rows valid
for query ``t`` (in the sparse layout, and for dense patterns, a prefix of ``valid_count``
slots; otherwise a mask) plus the new row itself (``kernels/decode.py``), then ``store`` writes
the new row: the row at ``t - W`` leaves the ring, moving to its dilated slot if
``(t - W + 1) % D == 0``, and the new row takes its ring (or sink) slot. Every index
is a tensor computed from ``pos``; conditional writes are ``torch.where`` selections, so a
step has fixed shapes and can be captured in a CUDA graph.

Sequences of one batch may have different lengths (ragged): each has its own ``pos``.

Other layer patterns have their own layer caches, with the same interface (``fill``,
``attend``, ``key_state``/``value_state``, byte counts; ``make_layer_cache`` picks one):

- ``TopKPattern``: ``TopKLayerCache`` (``topk_cache.py``): every row, plus per-block summaries;
- ``HeadGroups``: ``HeadGroupCache``: one cache per group of heads (each a ``LayerCache`` or a
  ``TopKLayerCache`` over its heads), the recurrence state kept for the whole layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ratplus_titan.head_groups import HeadGroups, LayerPattern
from ratplus_titan.inference.state import register_recurrence_state
from ratplus_titan.inference.topk_cache import TopKLayerCache
from ratplus_titan.kernels.decode_dispatch import cache_update, decode_attention
from ratplus_titan.pattern import Pattern
from ratplus_titan.topk import TopKPattern

# Per step, the valid rows and row moves of each distinct RowLayout (``DecodeCache.step_plans``).
StepPlans = dict["RowLayout", tuple[torch.Tensor, "StorePlan"]]


@dataclass(frozen=True)
class RowLayout:
    """Where each position of one layer lives in its ``R`` cache rows (static, per layer)."""

    pattern: Pattern
    max_seq_len: int

    @property
    def rows(self) -> int:
        return self.pattern.cache_rows(self.max_seq_len)

    @property
    def sparse(self) -> bool:
        return self.rows < self.max_seq_len

    @property
    def ring_start(self) -> int:
        return self.pattern.sinks

    @property
    def dilated_start(self) -> int:
        return self.pattern.sinks + self.pattern.local_window

    def slot_positions(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For sequences that have seen ``t [B]`` tokens: (position held by each slot, filled) ``[B, R]``."""
        slots = torch.arange(self.rows, device=t.device)[None, :]  # [1, R]
        t = t[:, None]  # [B, 1]
        if not self.sparse:
            return slots.expand(t.shape[0], -1), slots < t
        D, W, S = self.pattern.dilation, self.pattern.local_window, self.pattern.sinks
        # sinks
        positions = slots.expand(t.shape[0], -1)
        filled = slots < torch.minimum(t, torch.full_like(t, S))
        if W > 0:
            # ring slot S + r holds the latest position p <= t - 1 with (p - S) % W == r, if p >= S
            ring = (slots >= S) & (slots < S + W)
            ring_pos = t - 1 - torch.remainder(t - 1 - slots, W)  # (t-1-S-r) % W with r = slot - S
            positions = torch.where(ring, ring_pos, positions)
            filled = torch.where(ring, ring_pos >= S, filled)
        if D != -1:
            # dilated slot S + W + i holds p = (i + S // D) * D + D - 1 once p < t - W
            dilated = slots >= S + W
            dil_pos = (slots - (S + W) + S // D) * D + D - 1
            positions = torch.where(dilated, dil_pos, positions)
            filled = torch.where(dilated, dil_pos < t - W, filled)
        return positions, filled

    def valid_mask(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, R]``: the slots query ``t [B]`` may see (the pattern, over the filled slots)."""
        positions, filled = self.slot_positions(t)
        return filled & self.pattern.allows(t[:, None], positions)

    @property
    def prefix(self) -> bool:
        """Are the rows a query may see always the first ``valid_count`` slots? (sparse layout, or dense)"""
        return self.sparse or self.pattern.is_dense

    def valid_count(self, t: torch.Tensor) -> torch.Tensor:
        """``[B]``: how many leading slots query ``t [B]`` may see (layouts with ``prefix`` only)."""
        if not self.sparse:
            return t.clamp(max=self.rows)
        D, W, S = self.pattern.dilation, self.pattern.local_window, self.pattern.sinks
        count = t.clamp(max=S) + (t - S).clamp(0, W)  # sinks, then the ring
        if D != -1:
            count = count + (torch.div(t - W, D, rounding_mode="floor") - S // D).clamp(min=0)  # dilated rows
        return count.clamp(max=self.rows)

    def valid_rows(self, t: torch.Tensor) -> torch.Tensor:
        """What decode attention takes: ``[B]`` counts for prefix layouts, else the ``[B, R]`` mask."""
        return self.valid_count(t) if self.prefix else self.valid_mask(t)

    def store_plan(self, t: torch.Tensor) -> StorePlan:
        """Where the row of position ``t [B]`` goes after its step, and which row moves to a dilated slot."""
        rows = self.rows
        if not self.sparse:
            slot = t.clamp(max=rows - 1)
            return StorePlan(slot, slot, torch.zeros_like(t, dtype=torch.bool), slot, t < rows, False)
        D, W, S = self.pattern.dilation, self.pattern.local_window, self.pattern.sinks
        ring_slot = S + torch.remainder(t - S, W) if W > 0 else torch.zeros_like(t)
        if D != -1 and rows > self.dilated_start:
            # The row at t - W leaves the local window now; it stays if it closes a dilation stretch.
            leaving = t - W
            moves = (leaving >= S) & (torch.remainder(leaving + 1, D) == 0)
            dst = (self.dilated_start + leaving // D - S // D).clamp(self.dilated_start, rows - 1)
        else:
            moves, dst = torch.zeros_like(t, dtype=torch.bool), ring_slot
        # The new row takes its sink slot, or its ring slot (the one just vacated); W == 0: no slot.
        in_sinks = t < S
        slot = torch.where(in_sinks, t, ring_slot).clamp(0, rows - 1)
        write = in_sinks | (W > 0)
        return StorePlan(ring_slot, dst, moves, slot, write, W == 0)


@dataclass
class StorePlan:
    """Per-sequence row moves of one step (``[B]`` tensors), shared by the layers of one layout.

    First ``row[move_dst] = row[move_src]`` (or the new row when ``move_from_new``) where
    ``move``; then ``row[slot] = new row`` where ``write``.
    """

    move_src: torch.Tensor
    move_dst: torch.Tensor
    move: torch.Tensor
    slot: torch.Tensor
    write: torch.Tensor
    move_from_new: bool


class LayerCache(nn.Module):
    """One layer's buffers: ``k, v [B, H, R, hd]`` (activation dtype), ``key_state, value_state [B, H, hd]`` (fp32)."""

    def __init__(
        self,
        layout: RowLayout,
        batch_size: int,
        n_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        recurrent: bool = True,
    ):
        super().__init__()
        self.layout = layout
        shape = (batch_size, n_heads, layout.rows, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        register_recurrence_state(self, batch_size, n_heads, head_dim, recurrent, device)

    def fill(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        lengths: torch.Tensor,
        key_state: torch.Tensor | None = None,
        value_state: torch.Tensor | None = None,
    ) -> None:
        """After a prefill of ``lengths [B]`` tokens: ``keys, values [B, T, H, hd]`` (rotated), states ``[B, H, hd]``.

        Every slot takes the row of the position it holds for ``t = lengths`` (zeros where empty).
        """
        batch, seq_len, heads, head_dim = keys.shape
        positions, filled = self.layout.slot_positions(lengths)  # [B, R]
        index = positions.clamp(0, max(seq_len - 1, 0))[:, :, None, None].expand(-1, -1, heads, head_dim)
        for cache, rows in ((self.k, keys), (self.v, values)):
            gathered = torch.gather(rows, 1, index)  # [B, R, H, hd]
            gathered = torch.where(filled[:, :, None, None], gathered, torch.zeros_like(gathered))
            cache[:batch].copy_(gathered.transpose(1, 2))
        if key_state is not None and self.key_state.numel():
            self.key_state[:batch].copy_(key_state)
            self.value_state[:batch].copy_(value_state)

    def store(self, plan: StorePlan, k_new: torch.Tensor, v_new: torch.Tensor, backend: str = "auto") -> None:
        """After the attention of a step: file the new row ``k_new, v_new [B, H, hd]`` as ``plan`` says.

        ``backend``: ``auto`` (one Triton launch on CUDA, PyTorch elsewhere), ``triton``, ``reference``.
        """
        cache_update(
            self.k, self.v, k_new, v_new, plan.move_src, plan.move_dst, plan.move, plan.slot, plan.write,
            plan.move_from_new, backend=backend,
        )  # fmt: skip

    def attend(
        self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor, plans: StepPlans,
        backend: str = "auto",
    ) -> torch.Tensor:  # fmt: skip
        """One decode step's attention ``q, k_new, v_new [B, H, hd]`` -> ``[B, H, hd]``; then files the new row."""
        valid, plan = plans[self.layout]
        out = decode_attention(q, self.k, self.v, valid, k_new, v_new, backend=backend)
        self.store(plan, k_new, v_new, backend=backend)
        return out

    def row_layouts(self) -> list[RowLayout]:
        return [self.layout]

    def kv_bytes_per_sequence(self) -> int:
        return 2 * self.k[0].numel() * self.k.element_size()

    def state_bytes_per_sequence(self) -> int:
        return 2 * self.key_state[0].numel() * self.key_state.element_size() if self.key_state.numel() else 0

    def reset(self) -> None:
        for buffer in (self.k, self.v, self.key_state, self.value_state):
            buffer.zero_()


class HeadGroupCache(nn.Module):
    """One layer of ``HeadGroups``: a cache per group of heads; ``key_state, value_state [B, H, hd]`` for all heads."""

    def __init__(
        self,
        pattern: HeadGroups,
        batch_size: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        recurrent: bool = True,
    ):
        super().__init__()
        self.heads = [heads for heads, _ in pattern.slices()]
        self.groups = nn.ModuleList(
            make_layer_cache(p, batch_size, max_seq_len, heads.stop - heads.start, head_dim, dtype, device, recurrent=False)
            for heads, p in pattern.slices()
        )
        register_recurrence_state(self, batch_size, pattern.n_heads, head_dim, recurrent, device)

    def fill(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        lengths: torch.Tensor,
        key_state: torch.Tensor | None = None,
        value_state: torch.Tensor | None = None,
    ) -> None:
        """``keys, values [B, T, H, hd]`` (rotated), states ``[B, H, hd]``: each group takes its heads."""
        for heads, group in zip(self.heads, self.groups):
            group.fill(keys[:, :, heads], values[:, :, heads], lengths)
        if key_state is not None and self.key_state.numel():
            self.key_state[: keys.shape[0]].copy_(key_state)
            self.value_state[: keys.shape[0]].copy_(value_state)

    def attend(
        self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor, plans: StepPlans,
        backend: str = "auto",
    ) -> torch.Tensor:  # fmt: skip
        """``q, k_new, v_new [B, H, hd]`` -> ``[B, H, hd]``: each group over its own cache."""
        outs = [
            group.attend(q[:, h], k_new[:, h], v_new[:, h], pos, plans, backend)
            for h, group in zip(self.heads, self.groups)
        ]
        return torch.cat(outs, dim=1)

    def row_layouts(self) -> list[RowLayout]:
        return [layout for group in self.groups for layout in group.row_layouts()]

    def kv_bytes_per_sequence(self) -> int:
        return sum(group.kv_bytes_per_sequence() for group in self.groups)

    def state_bytes_per_sequence(self) -> int:
        return 2 * self.key_state[0].numel() * self.key_state.element_size() if self.key_state.numel() else 0

    def reset(self) -> None:
        self.key_state.zero_()
        self.value_state.zero_()
        for group in self.groups:
            group.reset()


AnyLayerCache = LayerCache | TopKLayerCache | HeadGroupCache


def make_layer_cache(
    pattern: LayerPattern,
    batch_size: int,
    max_seq_len: int,
    n_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    recurrent: bool = True,
) -> AnyLayerCache:
    """The cache of one layer running ``pattern`` (``n_heads`` heads, up to ``max_seq_len`` tokens)."""
    if isinstance(pattern, HeadGroups):
        pattern.check(n_heads)
        return HeadGroupCache(pattern, batch_size, max_seq_len, head_dim, dtype, device, recurrent)
    if isinstance(pattern, TopKPattern):
        return TopKLayerCache(pattern, batch_size, max_seq_len, n_heads, head_dim, dtype, device, recurrent)
    return LayerCache(RowLayout(pattern, max_seq_len), batch_size, n_heads, head_dim, dtype, device, recurrent)


class DecodeCache(nn.Module):
    """All layers' caches plus ``pos [B]``: the number of tokens each sequence has seen (= next position)."""

    def __init__(
        self,
        patterns: list[LayerPattern],
        batch_size: int,
        max_seq_len: int,
        n_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        recurrent: bool = True,
    ):
        super().__init__()
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.layers = nn.ModuleList(
            make_layer_cache(p, batch_size, max_seq_len, n_heads, head_dim, dtype, device, recurrent) for p in patterns
        )
        self.register_buffer("pos", torch.zeros(batch_size, dtype=torch.long, device=device), persistent=False)

    def step_plans(self) -> StepPlans:
        """Per row layout, for the query at ``pos``: its valid rows (``[B]`` counts or ``[B, R]`` mask) and store plan.

        Computed once per distinct layout and shared by the layers (and head groups) that have it.
        """
        plans: StepPlans = {}
        for layer in self.layers:
            for layout in layer.row_layouts():
                if layout not in plans:
                    plans[layout] = (layout.valid_rows(self.pos), layout.store_plan(self.pos))
        return plans

    def reset(self) -> None:
        self.pos.zero_()
        for layer in self.layers:
            layer.reset()

    # ---- memory --------------------------------------------------------------
    def kv_bytes_per_sequence(self) -> int:
        """Bytes of key/value rows (and top-k block summaries) one sequence holds (measured from the tensors)."""
        return sum(layer.kv_bytes_per_sequence() for layer in self.layers)

    def state_bytes_per_sequence(self) -> int:
        return sum(layer.state_bytes_per_sequence() for layer in self.layers)

    def bytes_per_sequence(self) -> int:
        return self.kv_bytes_per_sequence() + self.state_bytes_per_sequence()

    def total_bytes(self) -> int:
        return self.bytes_per_sequence() * self.batch_size
