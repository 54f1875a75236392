"""A dataset of indexed items read in an :class:`~ratplus_titan.data.order.ItemOrder` (``.bin`` windows, SFT rows)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset
from torchtitan.tools.logging import logger

from ratplus_titan.data.order import ItemOrder


class OrderedDataset(IterableDataset, Stateful):
    """Yields ``sample(index)`` for this rank's indices of ``order``; its state is the order's (layout-free).

    A subclass sets ``order``, ``name`` and ``infinite`` and defines ``sample``.
    """

    order: ItemOrder
    name: str
    infinite: bool

    def sample(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``({"input": x}, labels)`` of item ``index`` (numbered in file order)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        epoch = self.order.epoch
        for index in self.order.items(self.infinite):
            yield self.sample(index)
            if self.order.epoch != epoch:
                epoch = self.order.epoch
                logger.info(f"Dataset {self.name}: epoch {epoch} ({self.order.order} order)")
        logger.warning(f"Dataset {self.name} has run out of data")

    def state_dict(self) -> dict[str, Any]:
        """The layout-free position (:meth:`ItemOrder.state_dict`), the same on every rank."""
        return self.order.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.order.load_state_dict(state_dict)
