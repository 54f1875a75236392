"""Pre-tokenize text into a uint16 ``.bin`` file for ``[training] dataset = "bin"``.

    python -m ratplus_titan.data.pretokenize data/gutenberg/train.jsonl.xz out/train.bin --workers 16

The token stream is the one the text datasets build on the fly (``PackedTextDataset``): every
document as ``bos <tokens> eos``, documents concatenated in file order. Reading it back with
``TokenWindowDataset`` gives the same ``seq_len + 1`` windows, without a tokenizer or ``datasets``
at training time, and a data position that reshards across data-parallel layouts.

Inputs: ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.xz`` files of ``{"text": ...}`` documents (one per line),
or ``.txt`` files (one document each), all UTF-8. An input without documents (an empty or blank ``.txt``,
a ``.jsonl`` without lines) is skipped with a warning naming it; if no input has one, nothing is written
and the error names them. The output is written under a temporary name and renamed when
complete, so an interrupted run leaves no truncated ``.bin`` behind.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ratplus_titan.data.jsonl import not_utf8, read_json_lines
from ratplus_titan.data.token_file import TOKEN_DTYPE
from ratplus_titan.data.tokenizer import load_tokenizer

INPUT_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz", ".txt")


def read_documents(path: Path) -> Iterator[str]:
    """The documents of one input file, in order: a ``.txt`` file is one document (none if it is empty or
    only whitespace), a ``.jsonl[.gz|.xz]`` file one per non-blank line. Unreadable input: a ``ValueError``
    naming the file."""
    name = path.name
    if not name.endswith(INPUT_SUFFIXES):
        raise ValueError(f"{path}: unsupported input; allowed suffixes are {', '.join(INPUT_SUFFIXES)}")
    if name.endswith(".txt"):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise not_utf8(path, e) from None
        if text.strip():
            yield text
        return
    for line_number, record in read_json_lines(path):
        text = record.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{path}:{line_number}: not a JSON object with a string 'text' field "
                             f"({'no text' if text is None else type(text).__name__})")  # fmt: skip
        yield text


# A worker process imports torch and torchtitan before its first document (~5 s of a core, more on a busy
# machine), the time to tokenize ~3 M characters: each worker gets at least this much text, and a small input
# is tokenized in this process, without a pool.
CHARS_PER_WORKER = 4_000_000

_worker_tokenizer = None


def worker_count(requested: int, total_chars: int) -> int:
    """Tokenizer processes for ``total_chars`` of text: at most ``requested``, one per ``CHARS_PER_WORKER``;
    1 means no pool."""
    return max(1, min(requested, total_chars // CHARS_PER_WORKER))


def _init_worker(tokenizer_path: str | None) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _encode_with(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text, add_bos=True, add_eos=True), dtype=TOKEN_DTYPE)


def _encode(text: str) -> np.ndarray:
    return _encode_with(_worker_tokenizer, text)


def pretokenize(
    inputs: Sequence[Path], output: Path, tokenizer_path: str | None = None, workers: int = 1, quiet: bool = False
) -> int:
    """Tokenize ``inputs`` into ``output`` (uint16) with up to ``workers`` processes (``worker_count``);
    returns the number of tokens written."""
    tokenizer = load_tokenizer(tokenizer_path)
    vocab = tokenizer.get_vocab_size()
    if vocab > np.iinfo(TOKEN_DTYPE).max + 1:
        raise ValueError(f"tokenizer vocabulary of {vocab} ids does not fit uint16 token files (at most 65536)")
    per_input = [(str(path), list(read_documents(Path(path)))) for path in inputs]  # a path given twice is read twice
    docs = [text for _, found in per_input for text in found]
    empty = [path for path, found in per_input if not found]
    if not docs:
        raise ValueError(f"no documents in {', '.join(empty)}: every input is empty; nothing written")
    for path in empty:
        print(f"pretokenize: warning: {path} holds no documents (empty), skipped", file=sys.stderr, flush=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    total_chars, done_chars, n_tokens, start = sum(map(len, docs)), 0, 0, time.monotonic()
    workers = worker_count(workers, total_chars)
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(tmp, "wb"))
        if workers == 1:
            encoded = (_encode_with(tokenizer, text) for text in docs)
        else:
            # not fork: forking a process that runs threads (torch's, CUDA's) can deadlock the children, and
            # Python 3.12 warns about it on stderr; forkserver (spawn where there is none) starts them clean
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            pool = stack.enter_context(context.Pool(workers, _init_worker, (tokenizer_path,)))
            encoded = pool.imap(_encode, docs, chunksize=max(1, len(docs) // (64 * workers)))
        for i, (text, ids) in enumerate(zip(docs, encoded)):
            ids.tofile(out)
            n_tokens += len(ids)
            done_chars += len(text)
            if not quiet and (i + 1 == len(docs) or (i + 1) % max(1, len(docs) // 20) == 0):
                elapsed = time.monotonic() - start
                eta = elapsed * (total_chars - done_chars) / max(done_chars, 1)
                print(f"pretokenize: {i + 1}/{len(docs)} documents, {n_tokens:,} tokens, "
                      f"{done_chars / 1e6 / max(elapsed, 1e-9):.1f} M chars/s, eta {eta:.0f} s", flush=True)  # fmt: skip
    os.replace(tmp, output)
    return n_tokens


def main(argv: list[str] | None = None) -> int:
    from ratplus_titan import cli

    parser = cli.ArgumentParser(
        prog="python -m ratplus_titan.data.pretokenize",
        description="Tokenize text documents into a uint16 .bin token file (bos doc eos, concatenated).",
        epilog='Train on it with [training] dataset = "bin", dataset_path = OUTPUT.',
    )
    parser.add_argument("inputs", nargs="+", type=Path, help=f"input files ({', '.join(INPUT_SUFFIXES)})")
    parser.add_argument("output", type=Path, help="the .bin file to write")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file or folder (default: the shipped LLaMA-2 tokenizer)")
    parser.add_argument("--workers", type=cli.positive_int, default=os.cpu_count() or 1,
                        help="tokenizer processes at most (default: %(default)s); each gets at least "
                             f"{CHARS_PER_WORKER // 1_000_000} M characters, a smaller input is tokenized "
                             "without starting any")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    if args.output.suffix != ".bin":
        parser.error(f"output {args.output} must end in .bin")
    for path in args.inputs:
        if not path.is_file():
            parser.error(f"input {path} does not exist")
        if not path.name.endswith(INPUT_SUFFIXES):
            parser.error(f"input {path}: unsupported suffix; allowed are {', '.join(INPUT_SUFFIXES)}")
    with cli.user_errors(parser.prog):  # unreadable files, documents without text, a tokenizer too large
        n_tokens = pretokenize(args.inputs, args.output, args.tokenizer, args.workers, args.quiet)
    print(f"wrote {n_tokens:,} tokens to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
