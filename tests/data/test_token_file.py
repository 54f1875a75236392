"""open_token_file / token_windows: the one check of a .bin token file, against numpy reading the whole file."""

import numpy as np
import pytest

from ratplus_titan.data import token_file
from ratplus_titan.data.token_file import open_token_file, token_windows


def test_a_good_file_is_memory_mapped_whole(tmp_path):
    ids = np.random.default_rng(0).integers(0, 500, size=1003, dtype=np.uint16)
    ids.tofile(tmp_path / "a.bin")
    tokens = open_token_file(tmp_path / "a.bin", vocab_size=500)
    assert isinstance(tokens, np.memmap) and np.array_equal(tokens, np.fromfile(tmp_path / "a.bin", dtype=np.uint16))
    assert len(open_token_file(_empty(tmp_path))) == 0


def _empty(tmp_path):
    (tmp_path / "empty.bin").write_bytes(b"")
    return tmp_path / "empty.bin"


@pytest.mark.parametrize("seed", range(4))
def test_the_first_id_past_the_vocabulary_is_found_in_any_chunk(tmp_path, monkeypatch, seed):
    rng = np.random.default_rng(seed)
    monkeypatch.setattr(token_file, "SCAN_CHUNK", int(rng.integers(1, 50)))  # many chunks, boundaries anywhere
    vocab = 300
    ids = rng.integers(0, vocab, size=int(rng.integers(200, 400)), dtype=np.uint16)
    bad = np.sort(rng.choice(len(ids), size=3, replace=False))
    ids[bad] = rng.integers(vocab, 65536, size=3)
    ids.tofile(tmp_path / "x.bin")
    first = int(bad[0])  # the reference: the whole file in memory, the first offending position
    assert first == int(np.flatnonzero(np.fromfile(tmp_path / "x.bin", dtype=np.uint16) >= vocab)[0])
    with pytest.raises(ValueError) as error:
        open_token_file(tmp_path / "x.bin", vocab, label="field: ")
    message = str(error.value)
    assert message.startswith(f"field: {tmp_path / 'x.bin'} holds token id {int(ids[first])} (token {first:,}), ")
    assert "vocabulary of 300 ids" in message and "\n" not in message
    assert len(open_token_file(tmp_path / "x.bin", vocab_size=None)) == len(ids)  # no vocabulary: no scan


def test_an_odd_byte_count_is_refused_naming_the_file(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\1" * 67)
    with pytest.raises(ValueError, match=r"^\S*odd\.bin has 67 bytes, not a whole number of uint16 token ids"):
        open_token_file(tmp_path / "odd.bin")


def test_windows_are_the_whole_non_overlapping_slices(tmp_path):
    tokens = np.arange(100, dtype=np.uint16)
    for seq_len in (1, 6, 32, 98, 99, 100):
        windows = token_windows(tokens, seq_len)
        width = seq_len + 1
        expected = [tokens[i * width : (i + 1) * width] for i in range(100 // width)]
        assert windows.shape == (len(expected), width)
        assert all(np.array_equal(w, e) for w, e in zip(windows, expected))
