import numpy as np
import pytest

from bench.reproduce.repeats import add_repeats


def periodic_from(row: np.ndarray, distance: int) -> bool:
    return all(row[i] == row[i - distance] for i in range(distance, len(row)))


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_a_share_of_windows_repeat_their_beginning_and_the_rest_are_untouched(share):
    rng = np.random.default_rng(7)
    windows = rng.integers(0, 32000, size=(50, 65), dtype=np.uint16)
    before = windows.copy()
    out = add_repeats(windows, share, min_distance=9, seed=3)
    assert np.array_equal(windows, before) and out.dtype == windows.dtype and out.shape == windows.shape
    changed = [r for r in range(50) if not np.array_equal(out[r], windows[r])]
    assert len(changed) == round(share * 50)
    for r in range(50):
        if r not in changed:
            continue
        # element by element: a period d in [9, 32] from which every token repeats the one d back, and the
        # first period is the window's own beginning
        periods = [d for d in range(9, 33) if periodic_from(out[r], d) and np.array_equal(out[r, :d], windows[r, :d])]
        assert periods, r
        # random tokens: the smallest such period is the one drawn, so no shorter one exists
        assert not any(periodic_from(out[r], d) for d in range(1, 9))


def test_seeded_and_distances_spread():
    windows = np.random.default_rng(0).integers(0, 32000, size=(400, 129), dtype=np.uint16)
    a, b = add_repeats(windows, 0.5, 17, seed=1), add_repeats(windows, 0.5, 17, seed=1)
    assert np.array_equal(a, b) and not np.array_equal(a, add_repeats(windows, 0.5, 17, seed=2))
    distances = set()
    for r in range(400):
        if not np.array_equal(a[r], windows[r]):
            distances.add(min(d for d in range(17, 65) if periodic_from(a[r], d)))
    assert min(distances) < 25 and max(distances) > 56  # uniform over [17, 64]


@pytest.mark.parametrize("share,min_distance", [(1.5, 8), (-0.1, 8), (0.5, 0), (0.5, 40)])
def test_bad_settings_are_refused(share, min_distance):
    with pytest.raises(ValueError):
        add_repeats(np.zeros((4, 65), dtype=np.uint16), share, min_distance, seed=0)
