"""Exact recall at a fixed distance: windows of random tokens that repeat with period ``distance``.

Window ``w [seq_len + 1]`` is ``w[i] = r[i mod distance]`` for ``distance`` random ids ``r``. Predicting
the first period is guessing (about ``ln(vocab)`` nats a token); every later token equals the token
``distance`` positions earlier, so a model that can look back exactly that far predicts it almost
for free (an induction head: find the previous occurrence of the current token, copy its successor).
With ``distance`` beyond a pattern's local window, the loss on the repeats measures what the dilated
(or selected) rows still deliver of the exact past, without any fine-tuning: the ``recall`` stage of
``bench.reproduce`` (README "Does it work?").
"""

from __future__ import annotations

import torch

FIRST_ID = 3
"""Ids below this are special (LLaMA-2: <unk>, <s>, </s>) and never drawn."""


def repeated_windows(windows: int, seq_len: int, distance: int, vocab_size: int, seed: int) -> torch.Tensor:
    """``[windows, seq_len + 1]`` int64 windows, each its own random ids repeated with period ``distance``
    (ids uniform in ``[FIRST_ID, vocab_size)``, drawn from ``seed`` alone)."""
    if not 0 < distance < seq_len:
        raise ValueError(f"distance must be in [1, seq_len={seq_len}), got {distance}")
    if vocab_size <= FIRST_ID:
        raise ValueError(f"vocab_size must be > {FIRST_ID}, got {vocab_size}")
    generator = torch.Generator().manual_seed(seed)
    period = torch.randint(FIRST_ID, vocab_size, (windows, distance), generator=generator)  # [N, distance]
    position = torch.arange(seq_len + 1) % distance  # [seq_len + 1]
    return period[:, position]
