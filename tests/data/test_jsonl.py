"""ratplus_titan/data/jsonl.py: JSON lines from plain, gzip and xz files; errors name the file and line."""

from __future__ import annotations

import gzip
import json
import lzma

import pytest

from ratplus_titan.data.jsonl import read_json_lines, read_records

RECORDS = [{"a": 1, "b": "x"}, {"a": 2, "b": "y", "c": [1]}]
TEXT = json.dumps(RECORDS[0]) + "\n\n  \n" + json.dumps(RECORDS[1]) + "\n"  # blank lines are skipped


@pytest.mark.parametrize("name, write", [("r.jsonl", lambda p, t: p.write_text(t)),
                                         ("r.jsonl.gz", lambda p, t: p.write_bytes(gzip.compress(t.encode()))),
                                         ("r.jsonl.xz", lambda p, t: p.write_bytes(lzma.compress(t.encode())))])  # fmt: skip
def test_every_kind_of_file_gives_the_objects_and_their_line_numbers(tmp_path, name, write):
    write(tmp_path / name, TEXT)
    assert list(read_json_lines(tmp_path / name)) == [(1, RECORDS[0]), (4, RECORDS[1])]
    assert read_records(tmp_path / name, ["a", "b"], "test format") == RECORDS


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", b'{"a": 1}\n{"a": \n', "bad.jsonl:2: not a JSON object"),
        ("list.jsonl", b'{"a": 1}\n[1, 2]\n', "list.jsonl:2: not a JSON object (a list)"),
        ("latin.jsonl", '{"a": "caf\xe9"}\n'.encode("latin-1"), "latin.jsonl is not UTF-8 text"),
        ("cut.jsonl.gz", gzip.compress(TEXT.encode() * 20, mtime=0)[:25], "cut.jsonl.gz cannot be read as .jsonl.gz"),
        ("fake.jsonl.xz", b"not xz at all", "fake.jsonl.xz cannot be read as .jsonl.xz"),
    ],
)
def test_unreadable_input_names_the_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        list(read_json_lines(tmp_path / name))


def test_records_must_hold_the_fields(tmp_path):
    (tmp_path / "r.jsonl").write_text(TEXT)
    with pytest.raises(ValueError, match=r"r.jsonl:1: record has no 'c' field \(test format: a, c\)"):
        read_records(tmp_path / "r.jsonl", ["a", "c"], "test format")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl holds no records"):
        read_records(tmp_path / "empty.jsonl", ["a"], "test format")
