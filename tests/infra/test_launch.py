"""ratplus_titan/infra/launch.py (``ratplus-train``): config names and paths, the torchrun line, the CPU path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ratplus_titan.infra import cpu, entry, launch
from tests.cli_errors import cli_error
from tests.repo_files import pythonpath_with_checkout

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "train_configs"


@pytest.fixture(autouse=True)
def no_launcher_env(monkeypatch):
    for name in ("NGPU", "CONFIG_FILE", "TRAIN_FILE", "LOG_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_shipped_configs_are_the_checkouts_train_configs():
    assert launch.shipped_configs_dir().resolve() == CONFIGS
    assert launch.shipped_configs() == {p.stem: p for p in sorted(launch.shipped_configs_dir().glob("*.toml"))}
    assert {p.name for p in launch.shipped_configs().values()} == {p.name for p in CONFIGS.glob("*.toml")}


def test_config_is_a_file_or_a_shipped_name(tmp_path, monkeypatch):
    own = tmp_path / "debug_model.toml"  # a file wins over the shipped config of the same name
    own.write_text("[job]\n")
    monkeypatch.chdir(tmp_path)
    assert launch.resolve_config("debug_model.toml") == own.resolve()
    for name in sorted(p.stem for p in CONFIGS.glob("*.toml")):
        assert launch.resolve_config(name) == CONFIGS / f"{name}.toml"  # no file "debug_model" here: the shipped one
        if name != "debug_model":
            assert launch.resolve_config(f"{name}.toml") == CONFIGS / f"{name}.toml"
    assert launch.resolve_config(str(CONFIGS / "ratplus_7b.toml")) == CONFIGS / "ratplus_7b.toml"


@pytest.mark.parametrize("spec", ["nope", "other_dir/ratplus_1b.toml", "train_configs/ratplus_1b"])
def test_unknown_config_is_refused_naming_the_shipped_ones(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no train_configs/ here: a path is not taken for a shipped name
    with pytest.raises(FileNotFoundError, match=f"--config '{spec}' is neither a file nor a shipped config") as err:
        launch.resolve_config(spec)
    assert "ratplus_1b" in str(err.value) and "debug_model" in str(err.value)


@pytest.mark.parametrize("text", ["-1", "x", "1.5", ""])
def test_bad_gpu_count_is_refused(text):
    with pytest.raises(ValueError, match=r"--ngpu \(or NGPU\)"):
        launch.gpu_count(text)


def test_gpu_count():
    import torch

    assert launch.gpu_count("0") == 0 and launch.gpu_count("8") == 8
    assert launch.gpu_count(None) == torch.cuda.device_count()


def _capture_exec(monkeypatch) -> list:
    calls = []

    def fake_exec(path, argv):
        calls.append((path, list(argv)))
        raise SystemExit(0)  # execv does not return

    monkeypatch.setattr(os, "execv", fake_exec)
    monkeypatch.setattr(cpu, "main", lambda argv, prog=None: calls.append(("cpu", list(argv))))
    monkeypatch.setattr(entry, "parse_job_config", lambda args, warn=True: None)  # tests/infra/test_entry.py
    return calls


def test_gpus_run_torchrun_with_the_config_and_the_torchtitan_args(monkeypatch):
    calls = _capture_exec(monkeypatch)
    monkeypatch.setenv("LOG_RANK", "0,1")
    with pytest.raises(SystemExit):
        launch.main(["--ngpu", "4", "--config", "ratplus_1b", "--training.steps", "7", "--ratplus.dilation", "-1"])
    ((path, argv),) = calls
    assert path == sys.executable
    assert argv == [  # the torchrun line of torchtitan's run_train.sh
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4",
        "--rdzv_backend", "c10d", "--rdzv_endpoint=localhost:0", "--local-ranks-filter", "0,1",
        "--role", "rank", "--tee", "3",
        "-m", "ratplus_titan.train", "--job.config_file", str(CONFIGS / "ratplus_1b.toml"),
        "--training.steps", "7", "--ratplus.dilation", "-1",
    ]  # fmt: skip


def test_environment_of_run_train_sh(monkeypatch):
    calls = _capture_exec(monkeypatch)
    monkeypatch.setenv("NGPU", "2")
    monkeypatch.setenv("CONFIG_FILE", str(CONFIGS / "attention_1b.toml"))
    monkeypatch.setenv("TRAIN_FILE", "my_pkg.train")
    with pytest.raises(SystemExit):
        launch.main(["--", "--ngpu", "9"])  # after '--' everything is torchtitan's
    ((_, argv),) = calls
    assert "--nproc_per_node=2" in argv
    assert argv[-5:] == ["my_pkg.train", "--job.config_file", str(CONFIGS / "attention_1b.toml"), "--ngpu", "9"]


def test_no_gpu_trains_on_cpu(monkeypatch, capsys):
    calls = _capture_exec(monkeypatch)
    launch.main(["--ngpu", "0", "--job.config_file", "debug_model", "--training.steps", "2"])
    assert calls == [
        ("cpu", ["--trainer", launch.CPU_TRAINER, "--", "--job.config_file", str(CONFIGS / "debug_model.toml"),
                 "--training.steps", "2"]),
    ]  # fmt: skip
    assert "training on CPU" in capsys.readouterr().err


def test_bad_input_is_one_line(monkeypatch, capsys):
    calls = _capture_exec(monkeypatch)
    cli_error(
        capsys, launch.main, ["--config", "no_such_config"], ["ratplus-train: error:", "no_such_config", "debug_model"]
    )
    cli_error(capsys, launch.main, ["--ngpu", "two"], ["--ngpu (or NGPU) 'two'"])
    monkeypatch.setenv("NGPU", "-3")
    cli_error(capsys, launch.main, [], ["'-3'"])
    assert calls == []


def test_help_from_the_checkout_lists_the_shipped_configs():
    env = {**os.environ, "PYTHONPATH": pythonpath_with_checkout()}
    run = subprocess.run(
        [sys.executable, "-m", "ratplus_titan.infra.launch", "--help"],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "usage: ratplus-train" in run.stdout
    for path in CONFIGS.glob("*.toml"):
        assert path.stem in " ".join(run.stdout.split()), path.stem
