"""Reading JSON-lines files (``.jsonl``, ``.jsonl.gz``, ``.jsonl.xz``) with errors that name the file and line.

Used by every reader of records: pretokenized documents (``pretokenize.read_documents``), SFT records
(``sft.read_records``), NIAH samples (``eval/niah.read_samples``) and LongBench files.
"""

from __future__ import annotations

import gzip
import json
import lzma
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def read_json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of every non-blank line of a ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.xz`` file.
    Unreadable input (not UTF-8, a corrupt archive, a line that is no JSON object): a ``ValueError`` naming
    the file (and line)."""
    path = Path(path)
    name = path.name
    opener = gzip.open if name.endswith(".gz") else lzma.open if name.endswith(".xz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_number}: not a JSON object ({e}): is the file truncated?") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{line_number}: not a JSON object (a {type(record).__name__})")
                yield line_number, record
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None
    except (EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError) as e:
        suffix = name[name.index(".jsonl") :] if ".jsonl" in name else path.suffix
        raise ValueError(f"{path} cannot be read as {suffix} ({e})") from None


def read_records(path: str | Path, fields: Sequence[str], what: str) -> list[dict[str, Any]]:
    """Every object of a JSON-lines file, each checked to hold ``fields`` (``what``: the format, for errors)."""
    path = Path(path)
    records = []
    for line_number, record in read_json_lines(path):
        missing = [f for f in fields if f not in record]
        if missing:
            raise ValueError(f"{path}:{line_number}: record has no {missing[0]!r} field ({what}: {', '.join(fields)})")
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def not_utf8(path: Path, e: UnicodeDecodeError) -> ValueError:
    """The error for a file that is not UTF-8 text, naming the file and the first bad byte."""
    return ValueError(f"{path} is not UTF-8 text ({e.reason}: byte {e.object[e.start : e.start + 1]!r})")
