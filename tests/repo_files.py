"""The files of the checkout, as git lists them (tracked, and untracked but not ignored): never ``build/``,
``.venv/`` or other generated copies."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def checkout_files() -> list[str]:
    """Paths relative to the repository root; skips the calling test outside a git checkout."""
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout: the file list comes from git")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    return [name for name in listed if (REPO_ROOT / name).is_file()]  # a deleted, not yet committed file: gone


def pythonpath_with_checkout() -> str:
    """``PYTHONPATH`` for a child process: the checkout first, then this process's own entries (on the GPU
    machines the wheelhouse's packages, torchtitan among them, come from ``PYTHONPATH``, not site-packages)."""
    return os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
