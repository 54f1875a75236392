"""adapters/folder.py through ``ratplus-export``: a re-export is all or nothing, even when killed.

A re-export over an earlier export is killed (SIGKILL, in a child process) at each point between its
writes; the folder must then be the complete old export or the complete new one, and the next export
cleans up what the killed one left. The new export also changes the tokenizer (``tokenizer.model`` ->
``tokenizer.json``), which must not lose to the stale file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ratplus_titan.adapters import export, folder
from ratplus_titan.adapters.layout import load_export
from tests.cli_errors import cli_error
from tests.repo_files import pythonpath_with_checkout

PROG = "ratplus-export"

# Runs ``ratplus-export`` with a SIGKILL at the point named by argv[1]; the export's arguments follow.
KILLED_EXPORT = r"""
import os, shutil, signal, sys

import safetensors.torch

from ratplus_titan.adapters import export, folder

point, argv = sys.argv[1], sys.argv[2:]


def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


if point == "weights written":  # model.safetensors written, config.json not yet
    save_file = safetensors.torch.save_file
    safetensors.torch.save_file = lambda *a, **k: (save_file(*a, **k), die())
elif point == "config written":  # config.json written, the tokenizer not yet copied
    shutil.copyfile = die
elif point == "swapped":  # the new folder in place, the old one not yet removed
    shutil.rmtree = die
elif point == "between renames":  # without renameat2: the old folder moved aside, the new one not yet in place
    folder.exchange = lambda a, b: False
    rename, calls = os.rename, []

    def second_rename_dies(a, b):
        calls.append(a)
        die() if len(calls) == 2 else rename(a, b)

    os.rename = second_rename_dies
else:
    raise SystemExit(f"unknown point {point}")
export.main(argv)
"""


def _save_dcp(path: Path, seed: int) -> Path:
    import torch.distributed.checkpoint as dcp

    from tests.adapters._fsdp_workers import make_model

    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        dcp.save(make_model(seed).state_dict(), storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two DCP checkpoints (different weights) and an HF ``tokenizer.json``."""
    from tokenizers import Tokenizer, models

    root = tmp_path_factory.mktemp("sources")
    tokenizer = root / "hf" / "tokenizer.json"
    tokenizer.parent.mkdir()
    Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]")).save(str(tokenizer))
    return {
        "old": _save_dcp(root / "old" / "step-1", 0),
        "new": _save_dcp(root / "new" / "step-1", 1),
        "tokenizer": tokenizer,
    }


def old_args(sources: dict[str, Path], out: Path) -> list[str]:
    return [str(sources["old"]), str(out), "--n-heads", "4", "--pattern", "d4w8s2"]


def new_args(sources: dict[str, Path], out: Path) -> list[str]:
    return [str(sources["new"]), str(out), "--n-heads", "4", "--pattern", "d8w4s0", "--tokenizer",
            str(sources["tokenizer"]), "--dtype", "bfloat16", "--overwrite"]  # fmt: skip


def contents(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def references(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """What the old and the new export hold, written each into a fresh folder."""
    root = tmp_path_factory.mktemp("references")
    export.main(old_args(sources, root / "old"))
    export.main(new_args(sources, root / "new")[:-1])
    old, new = contents(root / "old"), contents(root / "new")
    assert set(old) == {"config.json", "model.safetensors", "tokenizer.model"}
    assert set(new) == {"config.json", "model.safetensors", "tokenizer.json"}
    assert old["model.safetensors"] != new["model.safetensors"] and old["config.json"] != new["config.json"]
    return {"old": old, "new": new}


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


@pytest.mark.parametrize("point", ["weights written", "config written", "swapped", "between renames"])
def test_killed_re_export_leaves_the_old_or_the_new_export(sources, references, tmp_path, point, capsys) -> None:
    out = tmp_path / "model"
    export.main(old_args(sources, out))
    env = {**os.environ, "PYTHONPATH": pythonpath_with_checkout()}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_EXPORT, point, *new_args(sources, out)], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -9, err[-3000:]
    if point == "between renames":  # the only moment without the folder, and only where renameat2 is missing
        leftover, written = f"model.old-{proc.pid}", f"model.tmp-{proc.pid}"
        assert not out.exists() and siblings(out) == [leftover, written]
        assert contents(tmp_path / leftover) == references["old"] and contents(tmp_path / written) == references["new"]
        from ratplus_titan.eval import perplexity

        line = cli_error(capsys, perplexity.main, [str(out), str(tmp_path / "none.bin")])
        assert line == (f"ratplus-perplexity: error: {out} does not exist: an export replacing it was interrupted, and "
                        f"{tmp_path / leftover} holds the previous export; rename it to model, or export again")  # fmt: skip
    else:
        expected = "new" if point == "swapped" else "old"
        assert contents(out) == references[expected], point
        assert siblings(out) == [f"model.tmp-{proc.pid}"]
    # the next export removes what the killed one left, and writes the new export
    export.main(new_args(sources, out))
    assert contents(out) == references["new"] and siblings(out) == []
    assert load_export(out).tokenizer_path == out / "tokenizer.json"  # not a stale tokenizer.model


def test_failed_export_keeps_the_old_one_and_leaves_nothing(sources, references, tmp_path, monkeypatch) -> None:
    import safetensors.torch

    out = tmp_path / "model"
    export.main(old_args(sources, out))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.main(new_args(sources, out))
    assert contents(out) == references["old"] and siblings(out) == []


def test_stale_tokenizer_is_replaced(sources, tmp_path, capsys) -> None:
    """A new --tokenizer .../tokenizer.json over an export holding tokenizer.model: the loader finds the new one."""
    from ratplus_titan.inference import RATPlusLM

    out = tmp_path / "model"
    export.main(old_args(sources, out))
    export.main(new_args(sources, out))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    lm = RATPlusLM.from_pretrained(out, device="cpu")
    assert lm.tokenizer.encode("hello", add_bos=False) == [1]


def test_a_non_empty_folder_needs_overwrite_and_must_be_an_export(sources, references, tmp_path, capsys) -> None:
    out = tmp_path / "model"
    export.main(old_args(sources, out))
    line = cli_error(capsys, export.main, new_args(sources, out)[:-1])
    assert line == f"{PROG}: error: {out} exists and is not empty: pass --overwrite to replace it"
    assert contents(out) == references["old"]

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    line = cli_error(capsys, export.main, new_args(sources, notes))
    assert line == (f"{PROG}: error: {notes} is not a folder written by ratplus-export: --overwrite replaces only "
                    "that; give a new or empty folder")  # fmt: skip
    assert (notes / "todo.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("")
    assert (
        cli_error(capsys, export.main, new_args(sources, tmp_path / "file"))
        == f"{PROG}: error: {tmp_path / 'file'} is a file: give a folder to write"
    )
    (tmp_path / "empty").mkdir()
    export.main(new_args(sources, tmp_path / "empty")[:-1])  # an empty folder needs no --overwrite
    assert contents(tmp_path / "empty") == references["new"]


def test_leftovers_of_a_running_writer_stop_the_export(sources, tmp_path, capsys) -> None:
    out = tmp_path / "model"
    running = out.with_name(f"model.tmp-{os.getppid()}")  # our parent process: alive
    running.mkdir()
    line = cli_error(capsys, export.main, old_args(sources, out))
    assert line == (f"{PROG}: error: {running} exists: process {os.getppid()} is writing {out} right now; wait for it "
                    f"to finish (or, if it is not a ratplus command, remove {running})")  # fmt: skip
    running.rmdir()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = out.with_name(f"model.old-{int(finished.stdout)}")
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"partial")
    unrelated = out.with_name("model.tmp-notapid")
    unrelated.mkdir()
    export.main(old_args(sources, out))
    assert siblings(out) == ["model.tmp-notapid"]


def test_exchange_swaps_two_folders(tmp_path) -> None:
    """renameat2(RENAME_EXCHANGE) where the system has it (Linux), else False and nothing moved."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("from a")
    (b / "y").write_text("from b")
    if folder.exchange(a, b):
        assert (a / "y").read_text() == "from b" and (b / "x").read_text() == "from a"
    else:
        assert sys.platform != "linux", "renameat2 is expected on Linux"
        assert (a / "x").exists() and (b / "y").exists()


def test_written_folder_moves_into_place_without_exchange(tmp_path, monkeypatch) -> None:
    target = tmp_path / "t"
    target.mkdir()
    (target / "config.json").write_text("old")
    monkeypatch.setattr(folder, "exchange", lambda a, b: False)
    with folder.written_folder(target, True, lambda p: True, "anything") as new:
        (new / "config.json").write_text("new")
        assert new.parent == tmp_path and target.exists()
    assert (target / "config.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["t"]
