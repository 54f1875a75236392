"""ratplus_titan/infra/entry.py (and config.py, resume.py): a bad training config is one line, not a
traceback or a silently wrong run, through the entry points a user runs.

Most cases call ``python -m ratplus_titan.infra.cpu``'s ``main`` in this process (what ``run_train.sh``
runs without a GPU) or run ``python -m ratplus_titan.train`` with runpy; two run ``run_train.sh``.
"""

from __future__ import annotations

import json
import logging
import os
import runpy
import subprocess
import sys
import typing
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import pytest

from ratplus_titan.config import RATPlus
from ratplus_titan.infra import cpu
from tests import global_state
from tests.cli_errors import cli_error
from tests.repo_files import pythonpath_with_checkout
from tests.trainer_utils import DEBUG_TOML, REPO, register_test_flavor, trainer_args

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: torchtitan's own fallback
    import tomli as tomllib

CPU_PROG = "python -m ratplus_titan.infra.cpu"


@contextmanager
def entry_point_in_this_process():
    """torchtitan's ``main`` resets the root logger, ``infra.cpu`` sets the launcher variables and
    ``--debug.deterministic`` torch's switches (``tests/global_state.py``): put them all back."""
    root = logging.getLogger()
    handlers, level, env, state = list(root.handlers), root.level, dict(os.environ), global_state.snapshot()
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        os.environ.clear()
        os.environ.update(env)
        global_state.restore(state)


def run_cpu_main(argv: list[str]) -> None:
    with entry_point_in_this_process():
        cpu.main(["--", *argv])


def config_error(capfd, argv: list[str], contains: list[str]) -> str:
    """``infra.cpu``'s main on ``argv``: exit status 2, one line on stderr holding ``contains``, no traceback."""
    line = cli_error(capfd, run_cpu_main, argv, contains)
    assert line.startswith(f"{CPU_PROG}: error: "), line
    return line


def toml_with(path: Path, **ratplus) -> Path:
    """debug_model.toml with ``ratplus`` set in its ``[ratplus]`` section (JSON writes these TOML values),
    and one short step without a checkpoint: a run the checks fail to stop ends in seconds."""
    doc = tomllib.loads(DEBUG_TOML.read_text())
    doc["ratplus"].update(ratplus)
    doc["training"].update(steps=1, seq_len=64, local_batch_size=1)
    doc["checkpoint"]["enable"] = False
    lines = []
    for section, table in doc.items():
        lines += [f"[{section}]", *(f"{key} = {json.dumps(value)}" for key, value in table.items()), ""]
    path.write_text("\n".join(lines))
    return path


def config_args(toml: Path, dump: Path, *extra: str) -> list[str]:
    return ["--job.config_file", str(toml), "--job.dump_folder", str(dump), *extra]


# ---- 1. every [ratplus] field refuses a value of the wrong type -------------------------------

# TOML values of each kind, and which kinds (and words for them) each annotation takes. A field
# with an annotation missing here fails test_every_field_annotation_is_covered: add it.
SAMPLES = {"string": "16", "integer": 16, "float": 1.5, "boolean": True, "integer list": [16], "string list": ["16"]}
ACCEPTS = {
    bool: ({"boolean"}, "a boolean"),
    int: ({"integer"}, "an integer"),
    str: ({"string"}, "a string"),
    bool | None: ({"boolean"}, "a boolean"),
    list[int]: ({"integer", "integer list"}, "an integer or a list of integers"),
    list[str]: ({"string", "string list"}, "a string or a list of strings"),
}
HINTS = typing.get_type_hints(RATPlus)
WRONG = [
    pytest.param(f.name, kind, id=f"{f.name}={kind}")
    for f in fields(RATPlus)
    for kind in SAMPLES
    if HINTS[f.name] in ACCEPTS and kind not in ACCEPTS[HINTS[f.name]][0]
]


def test_every_field_annotation_is_covered():
    assert {name for name, hint in HINTS.items() if hint not in ACCEPTS} == set()
    assert {p.values[0] for p in WRONG} == {f.name for f in fields(RATPlus)}


@pytest.mark.parametrize("name, kind", WRONG)
def test_a_wrong_type_is_one_line_naming_field_value_and_type(capfd, tmp_path, name, kind):
    value = SAMPLES[kind]
    toml = toml_with(tmp_path / "bad.toml", **{name: value})
    wanted = ACCEPTS[HINTS[name]][1]
    line = config_error(
        capfd, config_args(toml, tmp_path / "out"), [f"ratplus.{name}={json.dumps(value)}", f"takes {wanted}"]
    )
    assert ("without quotes" in line) == ("string" in kind and "string" not in wanted), line


@pytest.mark.parametrize(
    "name, kind", [(f.name, kind) for f in fields(RATPlus) for kind in sorted(ACCEPTS.get(HINTS[f.name], ((),))[0])]
)  # sorted: the same order in every pytest-xdist worker
def test_values_of_the_right_type_are_taken(tmp_path, name, kind):
    """Unquoted values arrive as written; one item for a list field becomes a one-item list."""
    from torchtitan.config import ConfigManager

    value = SAMPLES[kind]
    toml = toml_with(tmp_path / "good.toml", **{name: value})
    section = vars(ConfigManager().parse_args(["--job.config_file", str(toml)]).ratplus)[name]
    expected = [value] if typing.get_origin(HINTS[name]) is list and not isinstance(value, list) else value
    assert section == expected and type(section) is type(expected)


def test_quoted_booleans_through_run_train_sh(tmp_path):
    """The issue's case, end to end: ``apply_re = "false"`` once built RAT+ with the recurrence."""
    toml = toml_with(tmp_path / "bad.toml", apply_re="false")
    env = {**os.environ, "PYTHON": sys.executable, "CONFIG_FILE": str(toml), "NGPU": "0", "PYTHONPATH": pythonpath_with_checkout()}
    run = subprocess.run([str(REPO / "run_train.sh"), "--job.dump_folder", str(tmp_path / "out")],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Traceback" not in run.stdout + run.stderr
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    message = 'ratplus.apply_re="false" is a string, but the field takes a boolean: write it without quotes'
    assert errors == [f"ratplus-train: error: {message}"]
    assert not (tmp_path / "out").exists()  # nothing started


# ---- 2. values the model cannot take: one line naming the [ratplus] field -------------------


@pytest.mark.parametrize(
    "ratplus, extra, contains",
    [
        ({"joint_dilation": 0}, [], ["ratplus.joint_dilation=0 is invalid", "-1 (no dilated keys)"]),
        ({"dilation": 0}, [], ["ratplus.dilation=0 is invalid"]),
        ({"joint_train": False, "dilation": [4, 4, 0, 4]}, [], ["ratplus.dilation[2]=0 is invalid"]),
        ({"dilation": [4, 4]}, [], ["ratplus.dilation has 2 values but the model has 4 layers"]),
        ({"sinks": -1}, [], ["ratplus.sinks=-1 is invalid", ">= 0"]),
        ({"head_groups": ["3:dense+2:d4w0s0"]}, [], ["ratplus.head_groups", "do not sum to n_heads=4"]),
        ({"attention_backend": "cuda"}, [], ["ratplus.attention_backend='cuda' is invalid", "auto, sdpa"]),
        ({"joint_dilation": 128}, [], ["training.seq_len=64 cannot serve pattern d128w0s0"]),
        ({"aply_re": False}, [], ["Invalid field names", "aply_re"]),
        ({"recompute": "ffn"}, [], ["ratplus.recompute='ffn' is invalid: allowed values are none, fc1"]),
        (
            {"recompute": "fc1"},
            ["--activation_checkpoint.mode", "memory_budget"],
            ["ratplus.recompute='fc1' cannot run with activation_checkpoint.mode='memory_budget'"],
        ),
        ({}, ["--model.flavor", "2B"], ["model.flavor='2B' is unknown", "debugmodel"]),
    ],
)
def test_a_bad_value_is_one_line_naming_the_field(capfd, tmp_path, ratplus, extra, contains):
    toml = toml_with(tmp_path / "bad.toml", **ratplus)
    config_error(capfd, config_args(toml, tmp_path / "out", *extra), contains)
    assert not (tmp_path / "out").exists()  # refused before the trainer was built


def test_a_bad_value_through_run_train_sh_on_a_gpu_machine(tmp_path):
    """With GPUs run_train.sh (ratplus-train) checks the config before torchrun, whose report would bury
    the line. NGPU=1 on this machine: the check refuses the config, so torchrun never starts."""
    toml = toml_with(tmp_path / "bad.toml", joint_dilation=0)
    env = {**os.environ, "PYTHON": sys.executable, "CONFIG_FILE": str(toml), "NGPU": "1", "PYTHONPATH": pythonpath_with_checkout()}
    run = subprocess.run([str(REPO / "run_train.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Traceback" not in run.stdout + run.stderr and "torch.distributed" not in run.stdout + run.stderr
    assert run.stderr.strip().splitlines() == [
        "ratplus-train: error: ratplus.joint_dilation=0 is invalid: allowed values are -1 (no "
        "dilated keys) or an integer >= 1 (1 = dense), at most 2147483647"
    ]


# ---- 4. an attention backend this machine cannot train with ---------------------------------


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the machine has a GPU")
@pytest.mark.parametrize("backend", ["triton", "flex"])
def test_a_backend_this_machine_lacks_is_one_line_with_the_allowed_ones(capfd, tmp_path, monkeypatch, backend):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the tests' Triton interpreter is no user's GPU
    toml = toml_with(tmp_path / "bad.toml", attention_backend=backend)
    config_error(capfd, config_args(toml, tmp_path / "out"), [
        f"ratplus.attention_backend='{backend}' cannot train on this machine (no CUDA GPU)",
        "allowed values here are auto, sdpa, reference, compact",
    ])  # fmt: skip


# ---- 6, 3, 9. a dense "sparse" pattern, another flavor's checkpoint, a finished run ---------


def test_resuming_warns_about_dense_patterns_other_flavors_and_finished_runs(capfd, tmp_path):
    """One run of one step (its window covers every key: one warning line), then the same command again
    (at its last step: says so and how to go on), then with another flavor (one line, no DCP traceback)."""
    register_test_flavor()  # 2 layers, dim 64: a CPU step in a second
    args = trainer_args(tmp_path, 1, "--ratplus.dilation", "8", "--ratplus.local_window", "63")
    capfd.readouterr()
    run_cpu_main(args)
    out, err = capfd.readouterr()
    dense = [line for line in out.splitlines() if "dense attention" in line]
    assert len(dense) == 1 and "pattern d8w63s0 is dense attention at training.seq_len=64" in dense[0], dense
    assert "Traceback" not in out + err and (tmp_path / "checkpoint" / "step-1").is_dir()

    run_cpu_main(args)
    out, err = capfd.readouterr()
    finished = [line for line in out.splitlines() if "nothing left to train" in line]
    assert len(finished) == 1, out[-3000:]
    checkpoints = tmp_path / "checkpoint"
    for fragment in (f"{checkpoints / 'step-1'} is at step 1 and training.steps = 1", "--training.steps 2",
                     'make train ARGS="--training.steps 2"', f"rm -rf {checkpoints}"):  # fmt: skip
        assert fragment in finished[0], finished[0]
    assert "Traceback" not in out + err and "loss:" not in out  # no step ran

    line = config_error(capfd, [*args, "--model.flavor", "debugmodel"], [
        f"checkpoint {checkpoints / 'step-1'} does not fit model.flavor='debugmodel'",
        "tok_embeddings.weight is [32000, 64] there but [32000, 256] in this model",
        "saved by another flavor", f"rm -rf {checkpoints}",
    ])  # fmt: skip
    assert "size mismatch" not in line.lower()


# ---- 7. the torchrun module without torchrun --------------------------------------------------


def test_train_module_without_torchrun_says_what_to_run(capsys, monkeypatch):
    """``python -m ratplus_titan.train`` (run here by runpy) outside torchrun: once a KeyError 'LOCAL_RANK'."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # what torchrun sets
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", ["ratplus_titan.train", "--job.config_file", str(DEBUG_TOML)])
    line = cli_error(capsys, lambda argv: runpy.run_module("ratplus_titan.train", run_name="__main__"), [], [
        "ratplus_titan.train: error: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are not set",
        "ratplus-train --config X.toml (./run_train.sh in a checkout)", "one CPU process when it has none",
    ])  # fmt: skip
    assert line.startswith("ratplus_titan.train: error: ")
