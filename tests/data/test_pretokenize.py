"""ratplus_titan.data.pretokenize: the .bin token stream equals the one the text datasets pack on the fly."""

import gzip
import json
import lzma
import multiprocessing
import os
import random
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch

from ratplus_titan.data import pretokenize as pretokenize_module
from ratplus_titan.data.dataset import BUNDLED_CORPUS, PackedTextDataset, TokenWindowDataset
from ratplus_titan.data.pretokenize import main, pretokenize, read_documents, worker_count
from ratplus_titan.data.token_file import open_token_file
from ratplus_titan.data.tokenizer import load_tokenizer
from tests.cli_errors import cli_error
from tests.repo_files import pythonpath_with_checkout


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.mark.parametrize("in_pool", [False, True], ids=["in_process", "pool"])
def test_bin_windows_equal_the_packed_text_windows(tmp_path, tokenizer, monkeypatch, in_pool):
    """Every window of the .bin (read by TokenWindowDataset) equals the packer's window from the same documents,
    tokenized in this process or by worker processes."""
    if in_pool:
        monkeypatch.setattr(pretokenize_module, "CHARS_PER_WORKER", 1)
    source = BUNDLED_CORPUS["validation"]
    out = tmp_path / "validation.bin"
    n_tokens = pretokenize([source], out, workers=2, quiet=True)
    assert out.stat().st_size == 2 * n_tokens
    seq_len = 97  # not a divisor of anything in sight
    docs = datasets.load_dataset("json", data_files=[str(source)], split="train", streaming=True)
    packed = list(PackedTextDataset(docs, tokenizer, seq_len, name="bundled", infinite=False))
    windows = list(TokenWindowDataset([open_token_file(out)], seq_len, 0, 1, name="bin", infinite=False))
    assert len(windows) == len(packed) == n_tokens // (seq_len + 1)
    for (x_bin, y_bin), (x_text, y_text) in zip(windows, packed):
        assert torch.equal(x_bin["input"], x_text["input"]) and torch.equal(y_bin, y_text)


def test_every_suffix_reads_the_same_documents(tmp_path, tokenizer):
    rng = random.Random(0)
    docs = [" ".join(rng.choice(["alpha", "beta", "gamma", "delta."]) for _ in range(rng.randint(1, 60))) for _ in range(7)]
    lines = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
    (tmp_path / "a.jsonl").write_text(lines + "\n")  # a blank line is skipped
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(lines)
    with lzma.open(tmp_path / "a.jsonl.xz", "wt") as f:
        f.write(lines)
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.xz"):
        assert list(read_documents(tmp_path / name)) == docs
    (tmp_path / "b.txt").write_text(docs[0])
    assert list(read_documents(tmp_path / "b.txt")) == [docs[0]]
    # the stream: bos doc eos for each document, in order, from an independent per-document encode
    out = tmp_path / "a.bin"
    pretokenize([tmp_path / "a.jsonl.xz", tmp_path / "b.txt"], out, workers=2, quiet=True)
    expected = [t for d in [*docs, docs[0]] for t in [tokenizer.bos_id, *tokenizer.encode(d), tokenizer.eos_id]]
    assert np.fromfile(out, dtype=np.uint16).tolist() == expected


def test_bad_input_leaves_no_bin_behind(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text field"}) + "\n")
    out = tmp_path / "out.bin"
    with pytest.raises(SystemExit) as exit_info:
        main([str(bad), str(out), "--workers", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "'text'" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["missing.jsonl", "out.bin"], "does not exist"),
        (["{src}", "out.txt"], "must end in .bin"),
        (["{src}", "out.bin", "--workers", "0"], "allowed values are integers >= 1"),
        (["{weird}", "out.bin"], "allowed are .jsonl, .jsonl.gz, .jsonl.xz, .txt"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, capsys, argv, message):
    src, weird = tmp_path / "a.jsonl", tmp_path / "a.csv"
    src.write_text(json.dumps({"text": "x"}) + "\n")
    weird.write_text("x")
    argv = [a.format(src=src, weird=weird) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main([argv[0], str(tmp_path / argv[1]), *argv[2:]])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("latin1.txt", "café au lait".encode("latin-1"), "latin1.txt is not UTF-8 text (invalid continuation byte: byte b'\\xe9')"),
        ("latin1.jsonl.gz", gzip.compress(b'{"text": "caf\xe9"}\n', mtime=0), "latin1.jsonl.gz is not UTF-8 text"),
        ("broken.jsonl.xz", b"\xfd7zXZ\x00 not really xz", "broken.jsonl.xz cannot be read as .jsonl.xz"),
        ("broken.jsonl.gz", gzip.compress(b'{"text": "x"}\n' * 50, mtime=0)[:30], "broken.jsonl.gz cannot be read as .jsonl.gz"),
        ("empty.txt", b"", "no documents in {tmp}/empty.txt: every input is empty; nothing written"),
        ("blank.txt", b" \n\t\n", "no documents in {tmp}/blank.txt: every input is empty"),
    ],
)
def test_unreadable_or_empty_input_is_one_line_naming_the_file(tmp_path, capsys, name, content, message):
    (tmp_path / name).write_bytes(content)
    out = tmp_path / "out.bin"
    cli_error(capsys, main, [str(tmp_path / name), str(out), "--workers", "1"], [message.format(tmp=tmp_path)])
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_an_empty_txt_beside_text_is_skipped_with_a_warning(tmp_path, capsys, tokenizer):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "book.txt").write_text("Call me Ishmael.")
    out = tmp_path / "out.bin"
    capsys.readouterr()
    assert main([str(tmp_path / "empty.txt"), str(tmp_path / "book.txt"), str(out), "--workers", "1", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == f"pretokenize: warning: {tmp_path / 'empty.txt'} holds no documents (empty), skipped"
    expected = [tokenizer.bos_id, *tokenizer.encode("Call me Ishmael."), tokenizer.eos_id]
    assert np.fromfile(out, dtype=np.uint16).tolist() == expected
    assert f"wrote {len(expected)} tokens" in captured.out


# A process with a second thread running (as torch's, or CUDA's, are in a trainer or a test worker): from
# Python 3.12 on, os.fork() warns there ("This process ... is multi-threaded, use of fork() may lead to
# deadlocks in the child"); -W error makes that warning fail the run.
THREADED = """
import sys, threading
stop = threading.Event()
threading.Thread(target=stop.wait, daemon=True).start()
from ratplus_titan.data import pretokenize
pretokenize.CHARS_PER_WORKER = 1  # worker processes for the few characters of the test
code = pretokenize.main(sys.argv[1:])
stop.set()
sys.exit(code)
"""


def test_workers_start_cleanly_from_a_threaded_process(tmp_path, tokenizer, monkeypatch):
    (tmp_path / "book.txt").write_text("Call me Ishmael.")
    out = tmp_path / "out.bin"
    env = {**os.environ, "PYTHONPATH": pythonpath_with_checkout()}
    run = subprocess.run([sys.executable, "-W", "error:This process:DeprecationWarning", "-c", THREADED,
                          str(tmp_path / "book.txt"), str(out), "--workers", "2", "--quiet"],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0 and run.stderr == "", run.stderr[-2000:]
    expected = [tokenizer.bos_id, *tokenizer.encode("Call me Ishmael."), tokenizer.eos_id]
    assert np.fromfile(out, dtype=np.uint16).tolist() == expected
    # Python 3.11 does not warn: the start method itself must not be fork
    monkeypatch.setattr(pretokenize_module, "CHARS_PER_WORKER", 1)
    methods = []
    get_context = multiprocessing.get_context
    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: methods.append(method) or get_context(method))
    assert main([str(tmp_path / "book.txt"), str(tmp_path / "again.bin"), "--workers", "2", "--quiet"]) == 0
    assert methods in (["forkserver"], ["spawn"])


def test_worker_count_gives_each_worker_its_share_of_text():
    per = pretokenize_module.CHARS_PER_WORKER
    rng = random.Random(0)
    for _ in range(200):
        requested, chars = rng.randint(1, 64), rng.randint(0, 80 * per)
        n = worker_count(requested, chars)
        assert 1 <= n <= requested
        assert n == 1 or chars >= n * per  # every worker has its share
        assert n == requested or chars < (n + 1) * per  # and one more would not


def test_small_input_starts_no_process(tmp_path, tokenizer, monkeypatch):
    """A few documents with many workers allowed: tokenized here, no pool (its start costs seconds)."""
    def no_pool(*args, **kwargs):
        raise AssertionError("a worker pool was started for a small input")

    monkeypatch.setattr(multiprocessing, "get_context", no_pool)
    texts = ["Call me Ishmael.", "It was the best of times.", "Happy families are all alike."]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "out.bin"
    assert main([str(tmp_path / "docs.jsonl"), str(out), "--workers", "16", "--quiet"]) == 0
    expected = [i for t in texts for i in (tokenizer.bos_id, *tokenizer.encode(t), tokenizer.eos_id)]
    assert np.fromfile(out, dtype=np.uint16).tolist() == expected
