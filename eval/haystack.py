"""The haystack of a needle sample: a stretch of real text, split into sentences with their token counts.

A haystack holds whole documents (the shipped essays, a book corpus such as
``data/gutenberg/train.jsonl.xz``, ...). A sample takes a contiguous stretch of them from a random
point (:meth:`Haystack.stretch`, seeded by the caller's ``random.Random``) and tokenizes only that
stretch, sentence by sentence: a 150M-character corpus costs one read, not a tokenization.
"""

from __future__ import annotations

import bisect
import itertools
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ESSAYS_FILE = Path(__file__).resolve().parent / "assets" / "paul_graham_essays.jsonl.gz"
NOISE_SENTENCES = [
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
]
SENTENCE_END = re.compile(r"[.!?]\s")
"""Where ``split_sentences`` cuts: after ``.``, ``!`` or ``?`` followed by whitespace."""
CHUNK_CHARS = 8192
"""Characters split into sentences at a time while a stretch grows."""


def split_sentences(text: str) -> list[str]:
    """Whitespace-normalised text -> sentences (split after ``.``, ``!``, ``?`` followed by a space)."""
    text = re.sub(r"\s+", " ", text).strip()
    return [s for s in re.split(r"(?<=[.!?]) ", text) if s]


class Haystack:
    """Documents of real text to cut sample haystacks from, with the tokenizer that measures them."""

    def __init__(self, texts: Sequence[str], tokenizer: Any, name: str = "custom"):
        self.texts = [t for t in texts if t.strip()]
        if not self.texts:
            raise ValueError(f"haystack {name!r} holds no text")
        self.name = name
        self.tokenizer = tokenizer
        self._starts = [0, *itertools.accumulate(len(t) for t in self.texts)]  # each document's first character

    @classmethod
    def load(cls, source: str | Path, tokenizer: Any) -> Haystack:
        """``essays`` (the shipped essays), ``noise`` (RULER's repeated sentences), or a folder/file of text.

        A folder contributes its ``*.txt`` files (sorted); a file may be ``.txt`` (one document) or
        ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.xz`` (one ``{"text": ...}`` document per line).
        """
        source = str(source)
        if source == "noise":
            return cls([" ".join(NOISE_SENTENCES)], tokenizer, name="noise")
        if source == "essays":
            return cls(read_texts(ESSAYS_FILE), tokenizer, name="essays")
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"haystack {source!r}: not 'essays', 'noise', or an existing folder/file of text")
        return cls(read_texts(path), tokenizer, name=str(path))

    @property
    def chars(self) -> int:
        return self._starts[-1]

    def stretch(self, rng: random.Random, budget: int) -> tuple[list[str], list[int]]:
        """Consecutive sentences and their token counts, adding up to at most ``budget`` tokens.

        The stretch starts at the first sentence after a character drawn uniformly from all documents
        (so a document is drawn in proportion to its length) and runs on into the next documents,
        wrapping around after the last, until the next sentence would exceed ``budget``.
        """
        at = rng.randrange(self.chars)
        doc = bisect.bisect_right(self._starts, at) - 1
        pos = _next_sentence(self.texts[doc], at - self._starts[doc])
        sentences: list[str] = []
        lengths: list[int] = []
        used, idle_docs = 0, 0
        while idle_docs <= len(self.texts):  # a whole round of documents adding no token: nothing more fits
            before = used
            for sentence in sentences_from(self.texts[doc], pos):
                n = len(self.tokenizer.encode(sentence))
                if used + n > budget:
                    return sentences, lengths
                sentences.append(sentence)
                lengths.append(n)
                used += n
            idle_docs = idle_docs + 1 if used == before else 0
            doc, pos = (doc + 1) % len(self.texts), 0
        return sentences, lengths


def _next_sentence(text: str, pos: int) -> int:
    """The start of the first sentence at or after character ``pos`` (``len(text)`` if none)."""
    if pos == 0:
        return 0
    match = SENTENCE_END.search(text, pos - 1)
    return match.end() if match else len(text)


def sentences_from(text: str, pos: int) -> Iterator[str]:
    """``split_sentences(text[pos:])``, computed a chunk of about ``CHUNK_CHARS`` at a time (each chunk cut
    after a sentence end, where the whole-text split would cut too)."""
    while pos < len(text):
        end = pos + CHUNK_CHARS
        if end >= len(text):
            end = len(text)
        else:
            last = None
            for last in SENTENCE_END.finditer(text, pos, end):  # noqa: B007  (the last match is what we want)
                pass
            if last is None:
                last = SENTENCE_END.search(text, end)
            end = last.start() + 1 if last else len(text)
        yield from split_sentences(text[pos:end])
        pos = end


def read_texts(path: Path) -> list[str]:
    """The documents of a haystack folder (its ``*.txt`` files) or file (see :meth:`Haystack.load`)."""
    from ratplus_titan.data.pretokenize import read_documents

    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"haystack folder {path} holds no *.txt files")
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    if path.name.endswith((".jsonl", ".jsonl.gz", ".jsonl.xz")):
        return list(read_documents(path))
    return [path.read_text(encoding="utf-8", errors="replace")]
