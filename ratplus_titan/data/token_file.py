"""Pre-tokenized ``.bin`` token files: uint16 token ids, concatenated, no header (``pretokenize`` writes them).

One place opens and checks them, for training (``[training] dataset = "bin"``) and ``ratplus-perplexity``
alike: a bad file is refused up front with one line naming it, not by an ``IndexError`` mid-training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TOKEN_DTYPE = np.uint16
SCAN_CHUNK = 1 << 25
"""Token ids read at a time when checking a file against the vocabulary (64 MiB)."""


def open_token_file(path: str | Path, vocab_size: int | None = None, label: str = "") -> np.ndarray:
    """The token ids of ``path``, memory-mapped read-only (``uint16 [n]``), after checking that its size is a
    whole number of ids and, given ``vocab_size``, that every id is below it (one scan of the whole file, in
    chunks: never all of it in memory). A ``ValueError`` names the file, after ``label`` (e.g. the config field)."""
    path = Path(path)
    size, itemsize = path.stat().st_size, np.dtype(TOKEN_DTYPE).itemsize
    if size % itemsize:
        raise ValueError(f"{label}{path} has {size} bytes, not a whole number of uint16 token ids (not a token file?)")
    if size == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)  # numpy cannot map an empty file
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
    if vocab_size is not None:
        for start in range(0, len(tokens), SCAN_CHUNK):
            chunk = tokens[start : start + SCAN_CHUNK]
            if int(chunk.max()) >= vocab_size:
                at = int(np.argmax(chunk >= vocab_size))
                raise ValueError(
                    f"{label}{path} holds token id {int(chunk[at])} (token {start + at:,}), outside the vocabulary "
                    f"of {vocab_size} ids: a file of another tokenizer, or not uint16 token ids?"
                )
    return tokens


def token_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """The whole non-overlapping ``seq_len + 1`` windows of ``tokens``, in order: a view ``[n, seq_len + 1]``
    (tokens after the last whole window are left out)."""
    n = len(tokens) // (seq_len + 1)
    return tokens[: n * (seq_len + 1)].reshape(n, seq_len + 1)
