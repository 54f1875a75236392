"""Every benchmark module under bench/ (one with a ``main``) answers ``--help`` on a CPU machine."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def modules_with_main() -> list[str]:
    names = []
    for path in sorted(BENCH.glob("*.py")):
        tree = ast.parse(path.read_text())
        if any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            names.append(path.stem)
    return names


def test_the_kept_benchmarks_are_found():
    expected = {"kernels", "layer", "decode", "train_throughput", "eval_throughput", "parallel_layouts", "readme_tables"}
    assert expected <= set(modules_with_main())


@pytest.mark.parametrize("name", modules_with_main())
def test_help(name, monkeypatch, capsys):
    module = importlib.import_module(f"bench.{name}")
    monkeypatch.setattr(sys, "argv", [f"bench/{name}.py", "--help"])  # main() and main(argv=None) both parse it
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and "--help" in out, out
