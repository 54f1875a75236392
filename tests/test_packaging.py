"""pyproject.toml: the wheel builds without a setuptools warning and ships the package, its data and the configs.

The wheel is built from a copy of the checkout's files (git's list: tracked and untracked-not-ignored), so
the checkout gets no ``build/`` or ``*.egg-info``; then installed (``--target``, no dependencies) and asked
from outside the checkout where its shipped configs are.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.repo_files import REPO_ROOT, checkout_files

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# Source folder -> where its files land in the wheel (pyproject's package-dir).
SHIPPED_FOLDERS = {
    "ratplus_titan": "ratplus_titan",
    "kernels": "ratplus_titan/kernels",
    "adapters": "ratplus_titan/adapters",
    "eval": "ratplus_titan/eval",
    "train_configs": "ratplus_titan/train_configs",
}
NOT_SHIPPED = {"kernels/NOTES_pattern_attention.md"}  # developer notes on the kernels, read in the repository


def expected_in_wheel(files: list[str]) -> set[str]:
    """Every checkout file of a shipped folder, at its place in the wheel (byte code never ships)."""
    expected = set()
    for name in files:
        folder, _, rest = name.partition("/")
        if folder in SHIPPED_FOLDERS and rest and name not in NOT_SHIPPED and "__pycache__" not in name:
            expected.add(f"{SHIPPED_FOLDERS[folder]}/{rest}")
    return expected


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(wheel path, the build's output)."""
    files = checkout_files()
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, source / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # its notice is not ours
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out),
         str(source)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (wheel,) = out.glob("ratplus_titan-*.whl")
    return wheel, run.stdout + run.stderr


def test_build_prints_no_warning(built):
    _, output = built
    warnings = [line for line in output.splitlines() if "warn" in line.lower()]
    assert warnings == [], "\n".join(warnings)


def test_wheel_ships_every_package_file_data_and_config(built):
    wheel, _ = built
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = expected_in_wheel(checkout_files())
    assert expected - names == set()
    for required in (  # what the package reads at run time
        "ratplus_titan/assets/llama2/tokenizer.model",
        "ratplus_titan/assets/corpus/en_pd_ccby.train.jsonl.gz",
        "ratplus_titan/eval/assets/paul_graham_essays.jsonl.gz",
        "ratplus_titan/eval/tasks/ratplus_tiny_mc.yaml",
        "ratplus_titan/eval/tasks/data/tiny_mc.jsonl",
        "ratplus_titan/train_configs/debug_model.toml",
        "ratplus_titan/infra/launch.py",
    ):
        assert required in names, required
    extra = {n for n in names - expected if ".dist-info/" not in n}
    assert extra == set(), extra  # nothing from outside the shipped folders (tests, bench, scripts)


def test_wheel_metadata_has_every_command_and_the_license(built):
    wheel, _ = built
    archive = zipfile.ZipFile(wheel)
    dist_info = next(n.split("/")[0] for n in archive.namelist() if ".dist-info/" in n)
    entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "ratplus-train" in scripts
    for command, target in scripts.items():
        assert f"{command} = {target}" in entry_points
    assert "License-Expression: BSD-3-Clause" in archive.read(f"{dist_info}/METADATA").decode()


def test_installed_wheel_finds_its_configs_outside_the_checkout(built, tmp_path):
    wheel, _ = built
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    code = (
        "from ratplus_titan.infra import launch; import ratplus_titan.kernels as k; "
        "print(launch.shipped_configs_dir()); print(launch.resolve_config('ratplus_1b')); print(k.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    configs, config, kernels = run.stdout.split()
    package = target / "ratplus_titan"
    assert Path(configs) == package / "train_configs"
    assert Path(config) == package / "train_configs" / "ratplus_1b.toml"
    assert Path(kernels).parent == package / "kernels"
