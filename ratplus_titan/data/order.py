"""The order in which data-parallel ranks read the items of an indexed source (``.bin`` windows, SFT rows).

The items ``0 .. n - 1`` are read as one global stream, epoch after epoch. Epoch ``e`` of the stream is

- ``"shuffled"``: a permutation of the items drawn by ``numpy.random.Generator(PCG64([seed, e]))``, a
  function of ``(seed, e)`` only: every rank, every layout and every resumed run draws the same one,
  and each epoch a fresh one;
- ``"file"``: the items in their own order, ``0 .. n - 1``.

Global position ``g`` holds item ``epoch_order(g // n)[g % n]``. Rank ``r`` of ``W`` reads positions
``r, r + W, r + 2W, ...``: no two ranks read the same position, so within an epoch never the same item,
and all ranks advance together. The stream's position is the count of positions consumed by all ranks
together; it depends only on the global batch, not on how it is split, so a state saved under ``W``
ranks (FSDP over 2) resumes under any other (TP=2 on one data-parallel rank) and continues the same
global sequence. ``state_dict`` is ``{"order", "seed", "items", "epoch", "position"}`` (``position``:
positions of ``epoch`` consumed by all ranks). No item is dropped: when ``W`` does not divide ``n``, a
step near an epoch's end reads the last items of one epoch and the first of the next. A finite pass
(``items(infinite=False)``, for evaluation) reads epoch 0 from its start, ``n // W`` items per rank.

Use (an ``IterableDataset`` whose ``state_dict`` / ``load_state_dict`` return / take the order's can be
wrapped in ``dataset.ReshardableDataloader``, which saves that state in the checkpoint)::

    order = ItemOrder(n_items, dp_rank, dp_world_size, *order_config(job_config))
    for index in order.items(infinite=True):  # this rank's item indices, advancing the state
        yield source[index]
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

ORDERS = ("shuffled", "file")
"""The values of ``[ratplus] data_order``."""


def order_config(job_config: Any) -> tuple[str, int]:
    """``(data_order, data_seed)`` of the ``[ratplus]`` section (its defaults when the job has none), checked."""
    from ratplus_titan.config import RATPlus

    section = getattr(job_config, "ratplus", None) or RATPlus()
    order, seed = section.data_order, section.data_seed
    if order not in ORDERS:
        raise ValueError(f"ratplus.data_order = {order!r} is not supported; use one of {', '.join(map(repr, ORDERS))}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"ratplus.data_seed = {seed!r} must be an integer >= 0")
    return order, seed


class ItemOrder:
    """This rank's item indices of the global stream (see the module docstring), with a layout-free state."""

    def __init__(
        self, n_items: int, dp_rank: int = 0, dp_world_size: int = 1, order: str = "shuffled", seed: int = 0
    ) -> None:
        if order not in ORDERS:
            raise ValueError(f"data order {order!r} is not supported; use one of {', '.join(map(repr, ORDERS))}")
        if n_items < 1 or not 0 <= dp_rank < dp_world_size:
            raise ValueError(
                f"ItemOrder needs n_items >= 1 and 0 <= dp_rank < dp_world_size, got {n_items}, {dp_rank}, {dp_world_size}"
            )
        self.n_items, self.dp_rank, self.dp_world_size = n_items, dp_rank, dp_world_size
        self.order, self.seed = order, seed
        self._next = dp_rank  # this rank's next global position
        self._cached: tuple[int, np.ndarray] | None = None  # (epoch, its order)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The items of ``epoch`` in the order they are read: int64 ``[n_items]``, a permutation of ``0 .. n - 1``."""
        if self._cached is None or self._cached[0] != epoch:
            if self.order == "file":
                items = np.arange(self.n_items, dtype=np.int64)
            else:
                items = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.n_items)
            self._cached = (epoch, items)
        return self._cached[1]

    def item_at(self, position: int) -> int:
        """The item at global ``position`` of the stream."""
        return int(self.epoch_order(position // self.n_items)[position % self.n_items])

    @property
    def consumed(self) -> int:
        """Positions consumed by all ranks together (every rank reads one per step of the stream)."""
        return self._next - self.dp_rank

    @property
    def epoch(self) -> int:
        """The epoch the stream is in."""
        return self.consumed // self.n_items

    def next_item(self) -> int:
        """This rank's next item; advances the state."""
        item = self.item_at(self._next)
        self._next += self.dp_world_size
        return item

    def items(self, infinite: bool) -> Iterator[int]:
        """This rank's items from the current state, advancing it, forever if ``infinite``; otherwise one
        pass over epoch 0 from its start, whatever the state: positions ``< n // W * W``, so every rank
        reads ``n // W`` items and the ranks run out together."""
        if infinite:
            while True:
                yield self.next_item()
        self._next = self.dp_rank
        end = self.n_items // self.dp_world_size * self.dp_world_size
        while self._next < end:
            yield self.next_item()

    def state_dict(self) -> dict[str, Any]:
        """The layout-free position: the same on every rank, loadable under any data-parallel degree."""
        return {"order": self.order, "seed": self.seed, "items": self.n_items, "epoch": self.epoch,
                "position": self.consumed % self.n_items}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict`` saved under any data-parallel degree. Refuses a state of another
        order or seed, or (shuffled) of another item count: its position would repeat and skip items.
        ``state["items"]`` may be None (not recorded: not checked)."""
        keep = ("resume with the same setting, or pass --checkpoint.exclude_from_loading dataloader "
                "(the data stream then restarts)")  # fmt: skip
        if state["order"] != self.order:
            raise ValueError(f"the checkpoint's data position is in ratplus.data_order = {state['order']!r}, "
                             f"this run has {self.order!r}: {keep}")  # fmt: skip
        if self.order == "shuffled" and state["seed"] != self.seed:
            raise ValueError(f"the checkpoint's data position is in ratplus.data_seed = {state['seed']!r}'s order, "
                             f"this run has {self.seed!r}: {keep}")  # fmt: skip
        if self.order == "shuffled" and state["items"] not in (None, self.n_items):
            raise ValueError(f"the checkpoint's data position is over {state['items']} items, this run's data has "
                             f"{self.n_items} (the data changed): {keep}")  # fmt: skip
        self._next = state["epoch"] * self.n_items + state["position"] + self.dp_rank
