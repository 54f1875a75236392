"""scripts/find_python.sh (sourced by run_train.sh and scripts/adapt_chain.sh): which Python the scripts
run, and one line instead of a ModuleNotFoundError when it lacks the packages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.repo_files import pythonpath_with_checkout
from tests.trainer_utils import REPO


def checkout(tmp_path: Path) -> Path:
    """The scripts of a checkout, without its .venv (the Python code comes from PYTHONPATH)."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    for name in ("run_train.sh", "scripts/adapt_chain.sh", "scripts/find_python.sh"):
        shutil.copy2(REPO / name, root / name)
    return root


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def bare_python_on_path(tmp_path: Path, pythonpath: str) -> dict[str, str]:
    """An environment whose ``python`` is an interpreter without site-packages, with ``pythonpath``."""
    bin_dir = tmp_path / "bin"
    executable(bin_dir / "python", f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    return {**env, "PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": pythonpath, "NGPU": "0"}


def test_adapt_chain_without_a_venv_says_how_to_get_one(tmp_path):
    root = checkout(tmp_path)
    # only the checkout on PYTHONPATH: neither torch nor torchtitan importable, also where the process's own
    # PYTHONPATH holds them (make test-gpu's wheelhouse, .gpu-site)
    run = subprocess.run(["bash", str(root / "scripts" / "adapt_chain.sh"), str(tmp_path / "out")],
                         env=bare_python_on_path(tmp_path, str(REPO)), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Traceback" not in run.stderr and "ModuleNotFoundError" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        "adapt_chain.sh: error: PYTHON=python cannot import torch, torchtitan: run 'make install' (creates .venv), "
        "activate the environment ratplus-titan is installed in, or set PYTHON=/path/to/its/python"
    ]


def test_adapt_chain_takes_the_checkouts_venv(tmp_path):
    """With .venv/bin/python in the checkout, adapt_chain.sh and the run_train.sh it calls run it (here a
    stand-in that records its calls, runs find_python.sh's check and stops at the first training)."""
    root = checkout(tmp_path)
    calls = tmp_path / "calls.log"
    executable(
        root / ".venv" / "bin" / "python",
        f"""#!/bin/bash
printf '%s %s\\n' "$1" "${{2%%$'\\n'*}}" >> {calls}  # the option and its first line
if [ "$1" = -c ]; then exec "{sys.executable}" "$@"; fi
exit 3
""",
    )
    run = subprocess.run(["bash", str(root / "scripts" / "adapt_chain.sh"), str(tmp_path / "out")],
                         env=bare_python_on_path(tmp_path, pythonpath_with_checkout()), capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 3, run.stdout[-2000:] + run.stderr[-2000:]
    check = "-c import importlib.util as u"  # find_python.sh's check, in adapt_chain.sh and in run_train.sh
    assert calls.read_text().splitlines() == [check, check, "-m ratplus_titan.infra.launch"]
