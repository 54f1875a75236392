"""The reproduction's stages as folders keyed by their settings, and the training runs behind them.

Every stage writes into ``<work>/<kind>/<name>-<key>``, where ``key`` hashes every setting the stage's
output depends on (its command line, the TOML it reads, the folder names of the stages it starts from,
the digests of its input files); ``settings.json`` beside the output says what they were. A stage is
reused only when that folder holds a complete output, so a rerun under any changed setting (say another
``--adapt-lr``) trains again, and so does everything downstream of it, whose settings name this folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from bench.common import REPO, write_json

STEP_LINE = re.compile(r"step:\s*(\d+)\s+loss:\s*([-\d.naninf]+)(?:.*?tps:\s*([\d,]+))?")
SPARSE_LINE = re.compile(r"step\s+(\d+)\s+loss_sparse\s+([-\d.naninf]+)")


class OutOfTime(RuntimeError):
    """The deadline passed before a stage could start; rerunning the same command continues."""


def log(message: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {message}", flush=True)


@cache
def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (first 16 hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def stage_dir(work: Path, kind: str, name: str, settings: dict) -> Path:
    """``work/kind/name-<key>``, created, with ``settings.json``; ``key`` hashes ``settings``, in which
    paths under ``work`` are written relative to it (a moved work folder keeps its stages)."""
    text = json.dumps(settings, sort_keys=True, default=str).replace(str(work), "$WORK")
    path = work / kind / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "settings.json").write_text(json.dumps(json.loads(text), indent=1, sort_keys=True) + "\n")
    return path


# ---- time ------------------------------------------------------------------------------------------------
class StageClock:
    """Seconds of each stage in this call, and the same for every call on one work folder (``calls.json``
    there): a rerun reuses the stages an earlier call finished in about no time, so the sum over the calls
    is what the whole run cost. A stage cut off (deadline, Ctrl-C) keeps the seconds it ran, as ``cut_in``."""

    def __init__(self, work: Path, date: str):
        self.path = work / "calls.json"
        self.calls: list[dict] = json.loads(self.path.read_text()) if self.path.is_file() else []
        self.this: dict = {"date": date, "timing": {}}
        self.calls.append(self.this)
        self.started = self.t0 = time.monotonic()
        self.stage: str | None = None

    def start(self, stage: str) -> None:
        self.stage, self.t0 = stage, time.monotonic()

    def stop(self, cut: bool = False) -> dict[str, float]:
        """This call's ``{"<stage>_s": seconds, "total_s": seconds}`` with the running stage stopped; saved."""
        timing = self.this["timing"]
        timing[f"{self.stage}_s"] = round(time.monotonic() - self.t0, 1)
        timing["total_s"] = round(time.monotonic() - self.started, 1)
        if cut:
            self.this["cut_in"] = self.stage
        write_json(self.path, self.calls)  # a temporary file, then renamed: a crash leaves the last whole record
        return timing

    def all_calls(self) -> dict[str, float]:
        """Each key of the calls' timings summed over the calls (``total_s``: the whole run's seconds)."""
        summed: dict[str, float] = {}
        for call in self.calls:
            for key, seconds in call["timing"].items():
                summed[key] = round(summed.get(key, 0.0) + seconds, 1)
        return summed


# ---- training runs ---------------------------------------------------------------------------------------
@dataclass
class TrainRun:
    """One ``run_train.sh`` job; ``dump`` is its keyed folder (checkpoints, ``train.log``)."""

    name: str
    config: str  # TOML under the repository
    args: list[str]
    steps: int
    dump: Path

    @property
    def checkpoint(self) -> Path:
        return self.dump / "checkpoint" / f"step-{self.steps}"

    @property
    def log_path(self) -> Path:
        return self.dump / "train.log"

    @property
    def done(self) -> bool:
        return (self.checkpoint / ".metadata").is_file() and self.log_path.is_file()  # DCP writes .metadata last


def train_run(work: Path, name: str, config: str, args: list[str], steps: int) -> TrainRun:
    """A run keyed by its command line and the TOML it reads (``args`` name upstream checkpoints by path)."""
    settings = {"config": config, "config_sha": file_digest(REPO / config), "args": args}
    return TrainRun(name, config, args, steps, stage_dir(work, "runs", name, settings))


def parse_log(text: str) -> dict:
    """Per-step dense loss, sparse-phase loss (joint training) and tokens/s from a torchtitan log."""
    rows = {int(m[1]): {"loss": float(m[2]), "tps": float(m[3].replace(",", "")) if m[3] else None}
            for m in STEP_LINE.finditer(text)}  # fmt: skip
    for m in SPARSE_LINE.finditer(text):
        rows.setdefault(int(m[1]), {})["loss_sparse"] = float(m[2])
    steps = sorted(s for s in rows if "loss" in rows[s])
    tps = [rows[s]["tps"] for s in steps if rows[s].get("tps")]
    return {
        "step": steps,
        "loss": [rows[s]["loss"] for s in steps],
        "loss_sparse": [rows[s].get("loss_sparse") for s in steps],
        # the first logged step includes compilation
        "tokens_per_s": sum(tps[1:]) / len(tps[1:]) if len(tps) > 1 else (tps[0] if tps else None),
    }


def train(runs: list[TrainRun], concurrent: int, progress_s: float, deadline: float | None = None) -> dict[str, dict]:
    """Run ``run_train.sh`` for every run not done yet, at most ``concurrent`` at a time; the curves of all.

    A run cut off earlier resumes from its last checkpoint (torchtitan loads the newest complete step in
    its dump folder). After ``deadline`` (``time.monotonic()``) no run is started: ``OutOfTime``.
    Every run is waited for; then ``RuntimeError`` names the ones that failed.
    """
    pending = [r for r in runs if not r.done]
    for r in runs:
        if r.done:
            log(f"{r.name}: reusing {r.checkpoint}")
    running: list[tuple[TrainRun, subprocess.Popen, float]] = []
    failed: list[str] = []
    last_print = time.monotonic()
    while pending or running:
        while pending and len(running) < max(1, concurrent):
            if deadline is not None and time.monotonic() > deadline:
                break
            running.append(_launch(pending.pop(0)))
        if not running:  # nothing runs and the deadline keeps the rest from starting
            raise OutOfTime(f"deadline reached before {', '.join(r.name for r in pending)} could start")
        time.sleep(1.0)
        for item in list(running):
            r, proc, started = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0 or not r.done:
                tail = r.log_path.read_text(errors="replace")[-3000:]
                log(f"{r.name} FAILED (exit {proc.returncode}); see {r.log_path}; its end:\n{tail}")
                failed.append(r.name)
            else:
                log(f"{r.name}: done in {time.monotonic() - started:.0f} s")
        if time.monotonic() - last_print >= progress_s:
            last_print = time.monotonic()
            for r, _, started in running:
                print_progress(r, started)
    if failed:
        raise RuntimeError(f"training failed: {', '.join(failed)} (their logs are named above)")
    return {r.name: parse_log(r.log_path.read_text(errors="replace")) for r in runs}


def _launch(r: TrainRun) -> tuple[TrainRun, subprocess.Popen, float]:
    cmd = ["./run_train.sh", "--job.dump_folder", str(r.dump), *r.args]
    env = {**os.environ, "CONFIG_FILE": r.config, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    log(f"{r.name}: CONFIG_FILE={r.config} " + " ".join(cmd))
    with open(r.log_path, "a") as handle:  # appended: a resumed run keeps the curve of its first part
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    return r, proc, time.monotonic()


def print_progress(r: TrainRun, started: float) -> None:
    parsed = parse_log(r.log_path.read_text(errors="replace")) if r.log_path.is_file() else {"step": []}
    elapsed = time.monotonic() - started
    if not parsed["step"]:
        log(f"{r.name}: starting ({elapsed:.0f} s)")
        return
    step = parsed["step"][-1]
    sparse = parsed["loss_sparse"][-1]
    log(f"{r.name}: step {step}/{r.steps}  loss {parsed['loss'][-1]:.4f}"
        + (f"  loss_sparse {sparse:.4f}" if sparse is not None else "")
        + f"  tok/s {parsed['tokens_per_s'] or 0:,.0f}  {elapsed:.0f} s")  # fmt: skip


# ---- exports ---------------------------------------------------------------------------------------------
def export_all(runs: dict[str, tuple[TrainRun, str]], work: Path) -> dict[str, Path]:
    """``ratplus-export`` of each ``{label: (run, pattern)}`` into ``work/export/<run folder>``.

    In this process, one after another: an export of a small model takes a tenth of a second once the
    export module is imported, where a process of its own spends seconds importing it (18 exports of the
    tiny run: 72 s as subprocesses, two at a time, on a 2-core CPU)."""
    from ratplus_titan.adapters import export

    exports = {}
    for label, (r, pattern) in runs.items():
        out = work / "export" / f"{r.dump.name}-{pattern}"
        exports[label] = out
        if not (out / "config.json").is_file():
            argv = [str(r.checkpoint), str(out), "--dtype", "float32", "--pattern", pattern]
            log("$ ratplus-export " + " ".join(argv))
            try:
                export.main(argv)
            except SystemExit as e:  # the CLI's one-line error
                raise RuntimeError(f"export failed (exit {e.code}): ratplus-export {' '.join(argv)}") from e
    return exports
