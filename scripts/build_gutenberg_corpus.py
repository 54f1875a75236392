"""Build the reproduction corpus: English Project Gutenberg books, split by book into train / validation.

    python scripts/build_gutenberg_corpus.py /work/.mirror/rcdm-uga+Gutenberg_Text/repo --out data/gutenberg

SOURCE is a git directory (or clone) of the public repository ``rcdm-uga/Gutenberg_Text`` (plain-text
Project Gutenberg eBooks of 98 authors, one ``.txt`` per book). The script reads the blobs of one commit
(``--commit``, default the one documented in ``data/README.md``) and, for every ``.txt`` file:

1. keeps it only if its Project Gutenberg header says ``Language: English``;
2. cuts the Project Gutenberg header and licence (everything up to the ``*** START OF ...`` line and
   from the ``*** END OF ...`` line on), so what remains is the public-domain text alone;
3. drops duplicates (the same eBook number, or the same text, under two folder names).

Books are ordered by a hash of their eBook number (a fixed shuffle, not alphabetical), the first ones go to
``validation`` until it holds ``--validation-chars`` characters, the next ones to ``train`` until it holds
``--train-chars``. Each split is one ``.jsonl.xz`` file of ``{"text", "source", "id"}`` documents (one per
book), the format the package's data tools read (``python -m ratplus_titan.data.pretokenize``). The same
source, commit and arguments always give the same files (checked by their sha256, printed at the end).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_COMMIT = "a0b16d35a9851168ce9ac649851c17b7ab08d48e"
SOURCE_REPOSITORY = "rcdm-uga/Gutenberg_Text"
START = re.compile(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG EBOOK.*$", re.MULTILINE | re.IGNORECASE)
END = re.compile(r"^\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG EBOOK.*$", re.MULTILINE | re.IGNORECASE)
FIELD = re.compile(r"^(Title|Author|Language):[ \t]*(.*)$", re.MULTILINE)
EBOOK_NUMBER = re.compile(r"\[E(?:Book|Text) #(\d+)\]", re.IGNORECASE)


@dataclass(frozen=True)
class Book:
    path: str
    number: int | None  # Project Gutenberg eBook number, when the header gives one
    title: str
    author: str
    text: str

    @property
    def order_key(self) -> str:
        """A fixed shuffle: books sorted by the hash of their eBook number (or text, if none)."""
        key = str(self.number) if self.number is not None else self.text[:4096]
        return hashlib.sha256(key.encode()).hexdigest()


def parse_book(path: str, raw: bytes) -> tuple[Book | None, str]:
    """(book, "") for an English Project Gutenberg text; (None, reason) for anything else."""
    text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    start, end = START.search(text), END.search(text)
    if start is None or end is None or end.start() <= start.end():
        return None, "no Project Gutenberg start/end markers"
    header = text[: start.start()]
    fields = {name.lower(): value.strip() for name, value in FIELD.findall(header)}
    if fields.get("language", "").lower() != "english":
        return None, f"language {fields.get('language', 'unknown')!r}"
    body = text[start.end() : end.start()].strip()
    if len(body) < 10_000:
        return None, "shorter than 10,000 characters"
    number = EBOOK_NUMBER.search(header)
    return Book(path, int(number[1]) if number else None, fields.get("title", ""), fields.get("author", ""), body), ""


def read_blobs(git_dir: Path, commit: str, max_bytes: int) -> tuple[list[tuple[str, bytes]], list[str]]:
    """(path, content) of every ``.txt`` file of ``commit`` in the git directory ``git_dir`` up to
    ``max_bytes``; and the paths left out for their size (the two multi-book compilations of the source,
    which a partial copy of the repository may also lack)."""
    git = ["git", f"--git-dir={git_dir}"] if (git_dir / "HEAD").exists() else ["git", "-C", str(git_dir)]
    listing = subprocess.run([*git, "ls-tree", "-r", "-l", "-z", commit], check=True, capture_output=True).stdout
    entries, too_large = [], []
    for record in listing.split(b"\0"):
        if not record:
            continue
        meta, path = record.split(b"\t", 1)
        mode, kind, sha, size = meta.split()
        name = path.decode("utf-8", errors="replace")
        if kind != b"blob" or not name.endswith(".txt"):
            continue
        if not size.isdigit() or int(size) > max_bytes:  # a partial copy lists absent large blobs without a size
            too_large.append(name)
        else:
            entries.append((name, sha.decode()))
    batch = subprocess.run(
        [*git, "cat-file", "--batch"], input="".join(f"{sha}\n" for _, sha in entries).encode(),
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    blobs, offset = [], 0
    for name, sha in entries:
        header_end = batch.index(b"\n", offset)
        fields = batch[offset:header_end].split()  # "<sha> blob <size>", or "<sha> missing"
        if len(fields) != 3 or fields[0].decode() != sha:
            raise RuntimeError(f"{git_dir}: blob {sha} of {name!r} is missing from this copy of the repository")
        size = int(fields[2])
        start = header_end + 1
        blobs.append((name, batch[start : start + size]))
        offset = start + size + 1
    return blobs, too_large


def select_books(blobs: list[tuple[str, bytes]]) -> tuple[list[Book], dict[str, int]]:
    """English books without duplicates, in the fixed shuffle order; and counts of what was dropped why."""
    books, dropped, numbers, digests = [], {}, set(), set()
    for path, raw in blobs:
        book, reason = parse_book(path, raw)
        if book is None:
            dropped[reason.split(" '")[0]] = dropped.get(reason.split(" '")[0], 0) + 1
            continue
        digest = hashlib.sha256(book.text.encode()).hexdigest()
        if (book.number is not None and book.number in numbers) or digest in digests:
            dropped["duplicate"] = dropped.get("duplicate", 0) + 1
            continue
        numbers.add(book.number)
        digests.add(digest)
        books.append(book)
    books.sort(key=lambda b: b.order_key)
    return books, dropped


def split_books(books: list[Book], validation_chars: int, train_chars: int) -> dict[str, list[Book]]:
    splits: dict[str, list[Book]] = {"validation": [], "train": []}
    sizes = dict.fromkeys(splits, 0)
    for book in books:
        name = "validation" if sizes["validation"] < validation_chars else "train"
        if name == "train" and sizes["train"] >= train_chars:
            break
        splits[name].append(book)
        sizes[name] += len(book.text)
    if sizes["train"] < train_chars:
        raise ValueError(
            f"the source holds only {sizes['train']:,} characters of training text after validation, fewer than "
            f"--train-chars {train_chars:,}: lower it (or --validation-chars)"
        )
    return splits


def write_split(books: list[Book], path: Path) -> str:
    """Write one ``.jsonl.xz`` split; returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with lzma.open(tmp, "wt", encoding="utf-8", preset=9 | lzma.PRESET_EXTREME) as f:
        for book in books:
            source = f"{SOURCE_REPOSITORY}:{book.path}"
            doc_id = f"pg{book.number}" if book.number is not None else hashlib.sha256(book.text.encode()).hexdigest()[:12]
            f.write(json.dumps({"text": book.text, "source": source, "id": doc_id, "title": book.title,
                                "author": book.author}, ensure_ascii=False) + "\n")  # fmt: skip
    tmp.replace(path)  # nothing half-written is left under the final name
    return hashlib.sha256(path.read_bytes()).hexdigest()


def count_tokens(books: list[Book]) -> int:
    from ratplus_titan.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    return sum(len(tokenizer.encode(b.text, add_bos=True, add_eos=True)) for b in books)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See data/README.md for the result.")
    parser.add_argument("source", type=Path, help=f"git directory or clone of {SOURCE_REPOSITORY}")
    parser.add_argument("--commit", default=DEFAULT_COMMIT, help="commit to read (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("data/gutenberg"), help="output folder (default: %(default)s)")
    parser.add_argument("--train-chars", type=int, default=150_000_000, help="characters of training text (default: %(default)s)")
    parser.add_argument("--validation-chars", type=int, default=5_000_000,
                        help="characters of held-out text, whole books (default: %(default)s)")
    parser.add_argument("--max-book-bytes", type=int, default=4_000_000,
                        help="leave out larger files (multi-book compilations; default: %(default)s)")
    parser.add_argument("--count-tokens", action="store_true", help="also count LLaMA-2 tokens (slow: tokenizes everything)")
    args = parser.parse_args(argv)
    if not args.source.exists():
        parser.error(f"source {args.source} does not exist: fetch {SOURCE_REPOSITORY} first")
    for name in ("train_chars", "validation_chars"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")

    print(f"reading {SOURCE_REPOSITORY}@{args.commit[:12]} from {args.source} ...", flush=True)
    blobs, too_large = read_blobs(args.source, args.commit, args.max_book_bytes)
    books, dropped = select_books(blobs)
    print(f"{len(blobs)} .txt files: {len(books)} English books kept; dropped {dropped}; "
          f"left out over {args.max_book_bytes:,} bytes: {too_large}", flush=True)
    splits = split_books(books, args.validation_chars, args.train_chars)
    summary = {}
    for name, chosen in splits.items():
        path = args.out / f"{name}.jsonl.xz"
        sha = write_split(chosen, path)
        row = {"file": str(path), "books": len(chosen), "characters": sum(len(b.text) for b in chosen),
               "bytes": path.stat().st_size, "sha256": sha}  # fmt: skip
        if args.count_tokens:
            row["llama2_tokens"] = count_tokens(chosen)
        summary[name] = row
        print(json.dumps({name: row}), flush=True)
    (args.out / "manifest.json").write_text(json.dumps(
        {"source": SOURCE_REPOSITORY, "commit": args.commit, "splits": summary,
         "books": {name: [b.path for b in chosen] for name, chosen in splits.items()}}, indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
