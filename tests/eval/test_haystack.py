"""eval/haystack.py: a sample's haystack is the run of whole-text sentences from a random point, computed lazily."""

from __future__ import annotations

import gzip
import itertools
import json
import lzma
import random
import re

import pytest

from ratplus_titan.eval import haystack as hs
from ratplus_titan.eval.haystack import Haystack, sentences_from, split_sentences


class WordTokenizer:
    """One token per whitespace-separated word: token counts anyone can check."""

    def encode(self, text, add_bos=False, add_eos=False):
        return [0] * (len(text.split()) + add_bos + add_eos)


def random_text(rng: random.Random, n_sentences: int) -> str:
    """Sentences of random words, ended by . ! or ?, separated by spaces, newlines or runs of them; some
    sentences far longer than a chunk; periods inside words (``3.5``, ``e.g.x``) that are no sentence end."""
    words = ["alpha", "beta", "3.5", "e.g.x", "gamma", "delta", "(quote)", "x"]
    pieces = []
    for _ in range(n_sentences):
        n = rng.choice([1, 3, 8, 40])
        pieces.append(" ".join(rng.choice(words) for _ in range(n)) + rng.choice(".!?"))
        pieces.append(rng.choice([" ", "  ", "\n", " \n\n ", "\t"]))
    return "".join(pieces)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(hs, "CHUNK_CHARS", 37)  # many chunk boundaries, sentences longer than a chunk


def test_sentences_from_equals_splitting_the_whole_tail(small_chunks):
    rng = random.Random(0)
    for _ in range(200):
        text = random_text(rng, rng.randint(1, 30))
        starts = [0] + [m.end() for m in re.finditer(r"[.!?]\s", text)]
        pos = rng.choice(starts)
        assert list(sentences_from(text, pos)) == split_sentences(text[pos:])


def reference_stretch(texts: list[str], tokenizer, at: int, budget: int) -> tuple[list[str], list[int]]:
    """Brute force: every document's sentences, the first one starting after character ``at`` of the
    concatenation, then on (cyclically) while the token budget holds."""
    doc_of, starts_of = [], []
    offset = 0
    for text in texts:
        starts = [0] + [m.end() for m in re.finditer(r"[.!?]\s", text)]
        doc_of.append((offset, offset + len(text)))
        starts_of.append(starts)
        offset += len(text)
    d = next(i for i, (a, b) in enumerate(doc_of) if a <= at < b)
    pos = at - doc_of[d][0]
    later = [s for s in starts_of[d] if (s > pos if pos > 0 else s == 0)]
    first = later[0] if later else len(texts[d])

    def run():
        yield from split_sentences(texts[d][first:])
        for k in itertools.count(1):  # then whole documents, wrapping around
            yield from split_sentences(texts[(d + k) % len(texts)])

    sentences, lengths, used = [], [], 0
    for s in run():
        n = len(tokenizer.encode(s))
        if used + n > budget:
            break
        sentences.append(s)
        lengths.append(n)
        used += n
    return sentences, lengths


class FixedDraw:
    """A ``random.Random`` stand-in whose ``randrange`` returns a chosen character (of ``chars``: all are drawn from)."""

    def __init__(self, at: int, chars: int):
        self.at, self.chars = at, chars

    def randrange(self, n: int) -> int:
        assert n == self.chars
        return self.at


def test_stretch_is_the_run_of_sentences_after_the_drawn_character(small_chunks):
    rng = random.Random(1)
    tokenizer = WordTokenizer()
    for _ in range(30):
        texts = [random_text(rng, rng.randint(1, 8)) for _ in range(rng.randint(1, 4))]
        hay = Haystack(texts, tokenizer)
        budget = rng.choice([1, 5, 30, 200])
        chars = sum(map(len, texts))
        for at in range(chars):  # every character of the corpus
            got = hay.stretch(FixedDraw(at, chars), budget)
            assert got == reference_stretch(texts, tokenizer, at, budget), (texts, at, budget)
            assert sum(got[1]) <= budget


def test_stretch_of_a_tiny_corpus_wraps_around_and_a_huge_sentence_gives_nothing():
    hay = Haystack(["One two. Three!"], WordTokenizer())
    sentences, lengths = hay.stretch(random.Random(0), 10)
    assert 8 < sum(lengths) <= 10 and set(sentences) == {"One two.", "Three!"}
    sentences, lengths = Haystack(["a b c d e f."], WordTokenizer()).stretch(random.Random(0), 3)
    assert sentences == [] and lengths == []


def test_load_reads_every_file_kind(tmp_path):
    docs = ["First book. It ends.", "Second book!", "Third book?"]
    lines = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
    (tmp_path / "c.jsonl").write_text(lines)
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(lines)
    with lzma.open(tmp_path / "c.jsonl.xz", "wt") as f:
        f.write(lines)
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i}.txt").write_text(d)
    for source in ("c.jsonl", "c.jsonl.gz", "c.jsonl.xz", "txt"):
        assert Haystack.load(tmp_path / source, WordTokenizer()).texts == docs
    assert Haystack.load("noise", WordTokenizer()).texts == [" ".join(hs.NOISE_SENTENCES)]
    with pytest.raises(FileNotFoundError, match="haystack '/no/such': not 'essays', 'noise'"):
        Haystack.load("/no/such", WordTokenizer())
    with pytest.raises(ValueError, match="holds no text"):
        Haystack(["  ", "\n"], WordTokenizer())
