"""The decode cache's row layout, checked by storing each position's own index as its row."""

import itertools

import pytest
import torch

from ratplus_titan.inference.cache import LayerCache, RowLayout
from ratplus_titan.pattern import Pattern

PATTERNS = [
    Pattern(1, 0, 0), Pattern(4, 8, 2), Pattern(8, 4, 0), Pattern(-1, 8, 2), Pattern(3, 0, 1),
    Pattern(4, 6, 3), Pattern(3, 4, 5), Pattern(2, 40, 2), Pattern(5, 1, 0), Pattern(-1, 0, 3), Pattern(16, 3, 4),
]


def visible(t: int, pattern: Pattern) -> set[int]:
    """Keys j < t that query t may see, by the rules of DESIGN §2 (the new row itself excluded)."""
    return {
        j for j in range(t)
        if (pattern.dilation != -1 and (j + 1) % pattern.dilation == 0) or t - j <= pattern.local_window or j < pattern.sinks
    }


def held_positions(cache: LayerCache, valid: torch.Tensor, b: int) -> list[int]:
    """Positions (the stored values) of the rows sequence ``b`` may see."""
    return [int(x) for x in cache.k[b, 0, valid[b], 0].tolist()]


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_store_keeps_exactly_the_visible_rows(pattern):
    max_seq_len = 60
    layout = RowLayout(pattern, max_seq_len)
    assert layout.rows == pattern.cache_rows(max_seq_len)
    cache = LayerCache(layout, batch_size=3, n_heads=1, head_dim=1, dtype=torch.float64)
    cache.k.fill_(-1)
    starts = torch.tensor([0, 5, 17])  # ragged: each sequence at its own position
    # bring sequences 1 and 2 to their start positions with fill (prefill), sequence 0 starts empty
    rows = torch.arange(max_seq_len, dtype=torch.float64)[None, :, None, None].expand(3, -1, 1, 1)
    cache.fill(rows, rows, starts)
    t = starts.clone()
    while int(t.max()) < max_seq_len:
        valid = layout.valid_mask(t)
        for b in range(3):
            if t[b] < max_seq_len:
                held = held_positions(cache, valid, b)
                assert len(held) == len(set(held)), f"duplicate rows at t={int(t[b])}"
                assert set(held) == visible(int(t[b]), pattern), f"t={int(t[b])}"
        new = t.to(torch.float64)[:, None, None]  # [B, H, hd]: the row of position t is t
        cache.store(layout.store_plan(t.clamp(max=max_seq_len - 1)), new, new)
        t = t + 1


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_fill_equals_stepwise_store(pattern):
    max_seq_len = 50
    layout = RowLayout(pattern, max_seq_len)
    rows = torch.randn(1, max_seq_len, 2, 3, dtype=torch.float64)
    stepwise = LayerCache(layout, 1, 2, 3, torch.float64)
    for t in range(max_seq_len + 1):
        filled = LayerCache(layout, 1, 2, 3, torch.float64)
        filled.fill(rows, rows, torch.tensor([t]))
        valid = layout.valid_mask(torch.tensor([t]))
        assert torch.equal(filled.k[:, :, valid[0]], stepwise.k[:, :, valid[0]]), f"t={t}"
        if t < max_seq_len:
            stepwise.store(layout.store_plan(torch.tensor([t])), rows[:, t], rows[:, t])


def test_prefix_layouts_keep_valid_rows_as_a_prefix_of_valid_count():
    """Sparse layout (every filled slot is visible) and dense patterns: the valid slots are the first valid_count."""
    for pattern, t in itertools.product(PATTERNS, range(0, 61)):
        layout = RowLayout(pattern, 60)
        valid = layout.valid_mask(torch.tensor([t]))
        if not layout.prefix:
            assert layout.valid_rows(torch.tensor([t])).dtype == torch.bool
            continue
        if layout.sparse:
            _, filled = layout.slot_positions(torch.tensor([t]))
            assert torch.equal(filled, valid)
        count = int(layout.valid_count(torch.tensor([t])))
        assert count == int(valid.sum()), f"{pattern} t={t}"
        assert bool(valid[0, :count].all()) and not bool(valid[0, count:].any())
        assert torch.equal(layout.valid_rows(torch.tensor([t])), torch.tensor([count]))
