"""Damaging a checkpoint file as a bad disk or copy would: some bytes of one tensor changed, the size kept."""

from __future__ import annotations

from pathlib import Path

import torch


def poison(path: Path, tensor: torch.Tensor, count: int) -> None:
    """Overwrite the first ``count`` values of ``tensor``'s stored bytes in ``path`` with ``0xFF`` bytes (NaN).

    The tensor's bytes are found by search, so this works on any format storing them raw
    (safetensors, DCP shards): the file keeps its size and every header.
    """
    data = bytearray(path.read_bytes())
    raw = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0, f"the bytes of the tensor are not in {path} exactly once"
    size = count * tensor.element_size()
    data[at : at + size] = b"\xff" * size
    path.write_bytes(bytes(data))
