"""Exact recall at a fixed distance: windows that repeat their beginning with period ``distance``.

Window ``w [seq_len + 1]`` is ``w[i] = b[i mod distance]`` for a beginning ``b`` of ``distance`` tokens:

- ``repeated_windows``: ``b`` random ids. Predicting the first period is guessing (about ``ln(vocab)``
  nats a token); every later token equals the token ``distance`` positions earlier, so a model that can
  look back exactly that far predicts it almost for free (an induction head: find the previous occurrence
  of the current token, copy its successor);
- ``repeated_text``: ``b`` the beginning of a window of held-out text. The first period is ordinary
  language modelling; the repeats measure how much of natural text beyond the window a model copies
  (a model may copy text it has learnt to copy, such as repeated passages, and still miss random ids).

With ``distance`` beyond a pattern's local window, the loss on the repeats measures what the dilated
(or selected) rows still deliver of the exact past, without any fine-tuning: the ``recall`` and
``recall_text`` stages of ``bench.reproduce`` (README "Does it work?").
"""

from __future__ import annotations

import torch

FIRST_ID = 3
"""Ids below this are special (LLaMA-2: <unk>, <s>, </s>) and never drawn."""


def periodic(beginning: torch.Tensor, length: int) -> torch.Tensor:
    """``beginning [N, distance]`` repeated with period ``distance`` to ``[N, length]``:
    ``w[i] = beginning[i mod distance]`` (the one place the repetition is written)."""
    return beginning[:, torch.arange(length) % beginning.shape[1]]


def check_distance(distance: int, seq_len: int) -> None:
    """``ValueError`` unless a period of ``distance`` repeats at least once in ``seq_len + 1`` tokens."""
    if not 0 < distance < seq_len:
        raise ValueError(f"distance must be in [1, seq_len={seq_len}), got {distance}")


def repeated_windows(windows: int, seq_len: int, distance: int, vocab_size: int, seed: int) -> torch.Tensor:
    """``[windows, seq_len + 1]`` int64 windows, each its own random ids repeated with period ``distance``
    (ids uniform in ``[FIRST_ID, vocab_size)``, drawn from ``seed`` alone)."""
    check_distance(distance, seq_len)
    if vocab_size <= FIRST_ID:
        raise ValueError(f"vocab_size must be > {FIRST_ID}, got {vocab_size}")
    generator = torch.Generator().manual_seed(seed)
    period = torch.randint(FIRST_ID, vocab_size, (windows, distance), generator=generator)  # [N, distance]
    return periodic(period, seq_len + 1)


def repeated_text(windows: torch.Tensor, distance: int) -> torch.Tensor:
    """Text windows ``[N, seq_len + 1]`` -> new windows of the same shape whose first ``distance`` tokens
    are the text's own and repeat with period ``distance`` from there on."""
    check_distance(distance, windows.shape[1] - 1)
    return periodic(windows[:, :distance], windows.shape[1])
