"""ratplus_titan/training_record.py: a training run records its [ratplus] pattern in every DCP checkpoint,
and ``ratplus-export`` records it in config.json without being told again (``--pattern`` still overrides)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ratplus_titan.adapters import export
from ratplus_titan.training_record import RECORD_KEY, TrainingRecord
from tests.repo_files import pythonpath_with_checkout
from tests.torchtitan_cpu import trainer_session
from tests.trainer_utils import register_test_flavor, trainer_args

# a per-layer pattern (the test flavor has 2 layers), as [ratplus] gives it
PATTERN = {"dilation": [4, 8], "local_window": 8, "sinks": 2}
SPARSE = ["--ratplus.no-joint-train", "--ratplus.dilation", "4", "8", "--ratplus.local_window", "8", "--ratplus.sinks", "2"]  # fmt: skip


def train(dump: Path, steps: int, *extra: str) -> None:
    from ratplus_titan.train import RATPlusTrainer

    register_test_flavor()
    with trainer_session(RATPlusTrainer, trainer_args(dump, steps, *SPARSE, *extra), num_threads=1) as trainer:
        trainer.train()
    register_test_flavor()  # the trainer set its pattern on the flavor table's entry: a fresh one for the exports


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Two steps with the pattern above: step-1 a full interval checkpoint, step-2 the last step saved
    model-only (torchtitan's default ``last_save_model_only``)."""
    dump = tmp_path_factory.mktemp("run")
    train(dump, 2, "--checkpoint.interval", "1", "--checkpoint.last_save_model_only")
    return dump


def test_the_record_round_trips() -> None:
    record = TrainingRecord(
        {"dilation": [4, 8], "local_window": 8, "sinks": 2, "head_groups": ["2:dense+2:d4w0s0"]}, False
    )
    tensor = record.to_tensor()
    assert tensor.dtype == torch.uint8 and tensor.dim() == 1
    assert TrainingRecord.from_tensor(tensor, "x") == record
    with pytest.raises(ValueError, match=f"x: the training record {RECORD_KEY!r} cannot be read"):
        TrainingRecord.from_tensor(tensor[:-3], "x")


@pytest.mark.parametrize("step", [1, 2])
def test_export_records_the_trained_pattern(run: Path, tmp_path: Path, step: int, capsys) -> None:
    out = tmp_path / "export"
    export.main([str(run / "checkpoint"), str(out), "--step", str(step), "--no-tokenizer"])  # no --pattern
    assert json.loads((out / "config.json").read_text())["pattern"] == PATTERN
    assert capsys.readouterr().err.splitlines() == [
        "ratplus-export: pattern d4w8s2,d8w8s2: the one the checkpoint was trained with (--pattern overrides it)"
    ]
    export.main(
        [str(run / "checkpoint"), str(out), "--step", str(step), "--no-tokenizer", "--overwrite", "--pattern", "dense"]
    )
    assert json.loads((out / "config.json").read_text())["pattern"] == {"dilation": 1, "local_window": 0, "sinks": 0}


def test_a_checkpoint_without_the_record_exports_dense_with_a_note(run: Path, tmp_path: Path, capsys) -> None:
    """As a checkpoint saved before the record existed: the model tensors only."""
    import torch.distributed.checkpoint as dcp

    old = tmp_path / "step-9"
    state_dict = export.load_dcp_model_state_dict(run / "checkpoint" / "step-2")
    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        dcp.save(state_dict, storage_writer=dcp.FileSystemWriter(str(old)), no_dist=True)
    out = tmp_path / "export"
    export.main([str(old), str(out), "--no-tokenizer"])
    assert json.loads((out / "config.json").read_text())["pattern"] == {"dilation": 1, "local_window": 0, "sinks": 0}
    assert capsys.readouterr().err.splitlines() == [
        f"ratplus-export: note: {old} records no training pattern (saved before ratplus-titan recorded it): "
        "config.json gets dense; pass --pattern to record the pattern it was trained/adapted for"
    ]


def test_runs_resume_and_start_from_checkpoints_holding_the_record(run: Path, tmp_path: Path) -> None:
    """The record is never loaded back: a full resume (step-1) and a model-only start (step-2) both work."""
    resumed = tmp_path / "resumed"
    shutil.copytree(run / "checkpoint" / "step-1", resumed / "checkpoint" / "step-1")
    train(resumed, 2)
    assert (resumed / "checkpoint" / "step-2" / ".metadata").is_file()
    adapted = tmp_path / "adapted"
    train(
        adapted,
        1,
        "--checkpoint.initial_load_path",
        str(run / "checkpoint" / "step-2"),
        "--checkpoint.initial_load_model_only",
    )
    assert (adapted / "checkpoint" / "step-1" / ".metadata").is_file()


@pytest.mark.slow  # a training process and an export process: ~1 min on the 2-core machine
def test_run_train_then_export_without_pattern(tmp_path: Path) -> None:
    """The user's commands: ``run_train.sh`` (here without a GPU: ``python -m ratplus_titan.infra.cpu``) with a
    sparse [ratplus] pattern, then ``ratplus-export`` of its checkpoint folder, no --pattern."""
    import os
    import subprocess
    import sys

    from tests.trainer_utils import DEBUG_TOML, REPO

    env = {
        **os.environ,
        "PYTHONPATH": pythonpath_with_checkout(),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("RANK", None)
    train_args = ["--job.config_file", str(DEBUG_TOML), "--job.dump_folder", str(tmp_path / "run"), "--training.steps", "1",
                  "--training.seq_len", "64", "--training.local_batch_size", "2", "--ratplus.no-joint-train",
                  "--ratplus.dilation", "16", "--ratplus.local_window", "32", "--ratplus.sinks", "4"]  # fmt: skip
    trained = subprocess.run([sys.executable, "-m", "ratplus_titan.infra.cpu", "--", *train_args], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-4000:]
    out = tmp_path / "export"
    exported = subprocess.run([sys.executable, "-m", "ratplus_titan.adapters.export", str(tmp_path / "run" / "checkpoint"),
                               str(out), "--no-tokenizer"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-4000:]
    assert json.loads((out / "config.json").read_text())["pattern"] == {"dilation": 16, "local_window": 32, "sinks": 4}
    assert "ratplus-export: pattern d16w32s4: the one the checkpoint was trained with" in exported.stderr
