"""What every command of pyproject.toml's ``[project.scripts]`` shares: ``--help`` before any heavy
import, ``--pattern`` defaulting to the pattern recorded in the export (``config``), one warning line
for lengths past the model's ``max_seq_len``, and no NaN weights run silently."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ratplus_titan.adapters.layout import load_export, save_export
from ratplus_titan.data.tokenizer import DEFAULT_TOKENIZER
from ratplus_titan.model.args import RATPlusModelArgs
from ratplus_titan.model.model import RATPlusModel
from tests.cli_errors import cli_error
from tests.repo_files import pythonpath_with_checkout

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
COMMANDS = {**SCRIPTS, "python -m ratplus_titan.adapters.to_dcp": "ratplus_titan.adapters.to_dcp:main"}
HEAVY = ("torch", "torchtitan", "datasets", "lm_eval.api.model", "safetensors")

# main(["--help"]) in a fresh interpreter; prints the heavy modules it imported.
HELP = """
import sys
from {module} import {function} as main
try:
    main(["--help"])
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
print("heavy modules:", sorted(name for name in {heavy!r} if name in sys.modules))
"""


def test_every_console_script_is_checked():
    assert set(SCRIPTS) == {"ratplus-export", "ratplus-import-official", "ratplus-generate", "ratplus-niah",
                            "ratplus-longbench", "ratplus-lm-eval", "ratplus-perplexity", "ratplus-train"}  # fmt: skip


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_imports_no_heavy_module(command):
    """``--help`` parses before torch, torchtitan, datasets or lm-eval's model API are imported
    (5-7 s of imports that a user asking for help must not wait for)."""
    if command == "ratplus-lm-eval" and importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval is not installed here (the GPU machines): test_lm_eval_help_without_lm_eval checks that")
    module, function = COMMANDS[command].split(":")
    env = {**os.environ, "PYTHONPATH": pythonpath_with_checkout()}
    code = HELP.format(module=module, function=function, heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: " in proc.stdout and "--help" in proc.stdout, proc.stdout[:500]
    assert proc.stdout.splitlines()[-1] == "heavy modules: []", proc.stdout.splitlines()[-1]


def test_lm_eval_help_without_lm_eval_is_our_usage_and_one_line():
    """Without the eval extra, ``ratplus-lm-eval --help`` prints its own usage, then says what to install."""
    code = "import sys\nsys.modules['lm_eval'] = None  # as if not installed\n" + HELP.format(
        module="ratplus_titan.eval.lm_eval_cli", function="main", heavy=HEAVY).replace("(0, None)", "(2,)")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": pythonpath_with_checkout()}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: ratplus-lm-eval")
    assert proc.stderr.strip().splitlines() == [
        "ratplus-lm-eval: error: lm-eval is not installed; it comes with the eval extra: pip install -e '.[eval]' "
        "in the checkout, or the wheel with [eval] (README, Installing by hand)"
    ]


INFERENCE = {  # command -> (module, the arguments it needs besides --pattern)
    "ratplus-generate": ("ratplus_titan.generate", ["MODEL", "--prompt", "Hi"]),
    "ratplus-perplexity": ("ratplus_titan.eval.perplexity", ["MODEL", "data.bin"]),
    "ratplus-niah": ("ratplus_titan.eval.niah", ["MODEL"]),
    "ratplus-longbench": ("ratplus_titan.eval.longbench", ["MODEL", "data.jsonl"]),
}


@pytest.mark.parametrize("command", sorted(INFERENCE))
def test_pattern_defaults_to_the_recorded_one_everywhere(command):
    module, needed = INFERENCE[command]
    parser = importlib.import_module(module).build_parser()
    options = vars(parser.parse_args(needed))
    assert options.get("pattern", options.get("patterns")) is None  # None: the pattern of config.json
    assert vars(parser.parse_args([*needed, "--pattern", "config"])).get("pattern", [None]) in (None, [None])
    (action,) = [a for a in parser._actions if "--pattern" in a.option_strings]
    assert "(default: config)" in action.help and "recorded in config.json" in action.help


# ---- through main(), on a tiny export adapted for d4w8s2 (max_seq_len 64) --------------------------


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    args = RATPlusModelArgs(
        dim=32, n_layers=2, n_heads=2, vocab_size=32000, max_seq_len=64, dilation=4, local_window=8, sinks=2
    )
    model = RATPlusModel(args)
    model.init_weights()
    out = tmp_path_factory.mktemp("tiny") / "export"
    save_export(out, model.state_dict(), args, dtype="float32", tokenizer_path=DEFAULT_TOKENIZER)
    return out


@pytest.fixture(scope="module")
def token_bin(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "validation.bin"
    np.random.default_rng(0).integers(0, 32000, size=4 * 129, dtype=np.uint16).tofile(path)
    return path


def test_perplexity_runs_the_recorded_pattern_and_names_it(export_dir, token_bin, tmp_path, capsys):
    from ratplus_titan.eval import perplexity

    rows = {}
    for name, options in {"default": [], "config": ["--pattern", "config"], "dense": ["--pattern", "dense"],
                          "explicit": ["--pattern", "d4w8s2"]}.items():  # fmt: skip
        out = tmp_path / f"{name}.json"
        argv = [str(export_dir), str(token_bin), "--seq-len", "32", "--windows", "3", "--device", "cpu", "--output", str(out)]  # fmt: skip
        assert perplexity.main([*argv, *options]) == 0
        (rows[name],) = json.loads(out.read_text())
        printed = capsys.readouterr()
        assert f"{rows[name]['pattern']}: loss" in printed.out
        assert "window" in printed.err  # the progress bar
    assert rows["default"]["pattern"] == rows["config"]["pattern"] == "d4w8s2"
    assert rows["default"]["loss"] == rows["config"]["loss"] == rows["explicit"]["loss"] != rows["dense"]["loss"]


def test_lengths_past_the_models_max_seq_len_warn_in_one_line(export_dir, token_bin, tmp_path, capsys):
    """RoPE extrapolates, so a longer length runs (and measuring it is a legitimate experiment): one warning line."""
    from ratplus_titan.eval import niah, perplexity

    argv = [str(export_dir), str(token_bin), "--seq-len", "100", "--windows", "2", "--device", "cpu", "--quiet"]
    assert perplexity.main(argv) == 0
    assert capsys.readouterr().err.splitlines() == [
        "ratplus-perplexity: warning: --seq-len 100 is longer than the model's max_seq_len=64 (config.json): "
        "positions past it were never trained, so results there may be worse"
    ]
    assert perplexity.main([*argv[:3], "64", *argv[4:]]) == 0
    assert capsys.readouterr().err == ""
    argv = [str(export_dir), "--tasks", "single", "--samples", "1", "--lengths", "128", "--device", "cpu", "--quiet",
            "--output", str(tmp_path / "niah.json")]  # fmt: skip
    assert niah.main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        "ratplus-niah: warning: --lengths 128 is longer than the model's max_seq_len=64 (config.json): "
        "positions past it were never trained, so results there may be worse"
    ]


def test_perplexity_refuses_non_finite_weights(export_dir, token_bin, tmp_path, capsys):
    """Not 'loss nan' with exit status 0: one line naming the tensor and the file."""
    import shutil

    from ratplus_titan.eval import perplexity
    from tests.corrupt import poison

    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    tensor = load_export(export_dir).state_dict["tok_embeddings.weight"]
    poison(bad / "model.safetensors", tensor, count=2)
    line = cli_error(capsys, perplexity.main, [str(bad), str(token_bin), "--seq-len", "32", "--device", "cpu"])
    assert line.startswith(f"ratplus-perplexity: error: {bad / 'model.safetensors'}: tensor 'tok_embeddings.weight' "
                           f"holds 2 NaN/inf values (of {tensor.numel():,})")  # fmt: skip
