import pytest
import torch

from ratplus_titan.eval.repeated_tokens import FIRST_ID, repeated_text, repeated_windows


@pytest.mark.parametrize("seq_len,distance", [(64, 16), (65, 64), (40, 7), (8, 1)])
def test_every_token_equals_the_one_distance_earlier(seq_len, distance):
    w = repeated_windows(5, seq_len, distance, vocab_size=50, seed=1)
    assert w.shape == (5, seq_len + 1) and w.dtype == torch.int64
    for n in range(5):  # element by element, the definition
        for i in range(seq_len + 1):
            assert w[n, i] == w[n, i % distance]
    assert int(w.min()) >= FIRST_ID and int(w.max()) < 50


def test_first_period_is_random_and_seeded():
    a = repeated_windows(64, 2048, 1024, vocab_size=32000, seed=0)
    assert torch.equal(a, repeated_windows(64, 2048, 1024, vocab_size=32000, seed=0))
    assert not torch.equal(a, repeated_windows(64, 2048, 1024, vocab_size=32000, seed=1))
    first = a[:, :1024]
    # distinct windows, and nearly every id distinct within a period (32000 ids, 1024 draws)
    assert len({tuple(row.tolist()) for row in first}) == 64
    assert min(len(set(row.tolist())) for row in first) > 980


@pytest.mark.parametrize("distance", [0, 64, 100])
def test_distance_outside_the_window_is_refused(distance):
    with pytest.raises(ValueError, match="distance"):
        repeated_windows(1, 64, distance, vocab_size=50, seed=0)


@pytest.mark.parametrize("distance", [1, 7, 32])
def test_text_keeps_its_beginning_and_repeats_it(distance):
    text = torch.randint(0, 1000, (3, 41), generator=torch.Generator().manual_seed(distance))
    before = text.clone()
    w = repeated_text(text, distance)
    assert w.shape == text.shape and torch.equal(text, before)
    for n in range(3):  # element by element, the definition
        for i in range(41):
            assert w[n, i] == text[n, i % distance]


@pytest.mark.parametrize("distance", [0, 40, 41])
def test_text_distance_outside_the_window_is_refused(distance):
    with pytest.raises(ValueError, match="distance"):
        repeated_text(torch.zeros(2, 41, dtype=torch.int64), distance)
