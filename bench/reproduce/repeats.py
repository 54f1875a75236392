"""Repeated passages in the reproduction's training windows: retrieval signal a small pretraining lacks.

At the ``50m`` scale's 21M pretraining tokens no model copies from far context: fine-tuned on NIAH, every
one plateaus at the loss of guessing the answer's digits (README "Does it work?", round 2), as models do
before induction heads form (billions of tokens of plain text at this size). In ``repeat_share`` of the
windows (chosen by seed), the window's tokens from a position ``distance`` on repeat its beginning with
period ``distance``: ``w[i] = w[i - distance]`` for ``i >= distance``, ``distance`` uniform in
``[min_distance, (T + 1) // 2]``. Predicting a repeat means finding the same text ``distance`` tokens back,
beyond the local window when ``min_distance > W``: what NIAH and the recall stage need. Every model reads
the same windows, so the comparison between them stays fair; the paper pretrains on plain text.
"""

from __future__ import annotations

import numpy as np


def add_repeats(windows: np.ndarray, share: float, min_distance: int, seed: int) -> np.ndarray:
    """``windows [N, T + 1]`` -> a copy with ``round(share * N)`` windows (a seeded choice) made periodic
    from a seeded distance on. Returns the new windows; ``windows`` is left as it is."""
    n, length = windows.shape
    if not 0 <= share <= 1:
        raise ValueError(f"repeat share must be in [0, 1], got {share}")
    if not 0 < min_distance <= length // 2:
        raise ValueError(
            f"min_distance must be in [1, {length // 2}] for windows of {length} tokens, got {min_distance}"
        )
    out = windows.copy()
    rng = np.random.default_rng(seed)
    chosen = rng.choice(n, size=round(share * n), replace=False)
    distances = rng.integers(min_distance, length // 2, endpoint=True, size=len(chosen))
    for row, distance in zip(chosen, distances):
        out[row] = out[row, np.arange(length) % distance]
    return out
