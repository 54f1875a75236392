"""``ratplus-train``: train with torchtitan + ratplus_titan on every GPU of this machine, or on its CPU.

::

    ratplus-train --config ratplus_1b [torchtitan args, e.g. --training.steps 100]
    ratplus-train --config my_run.toml --ngpu 4

``--config`` is a TOML file, or the name of a config shipped with the package
(``train_configs/`` in a checkout, ``ratplus_titan/train_configs`` in an install; ``debug_model``
when not given). With GPUs, it runs ``torchrun --nproc_per_node=NGPU -m ratplus_titan.train``
(torchtitan's own ``run_train.sh`` line); with none, one CPU process with gloo
(``infra/cpu.py``: torchtitan 0.2.2 assumes CUDA when no accelerator is present). The
checkout's ``run_train.sh`` is this command with ``CONFIG_FILE`` for ``--config``. Before torchrun
starts, the job config is checked here (``infra/entry.py``): a bad value is one line, not one per
rank buried in torchrun's failure report.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import ratplus_titan
from ratplus_titan import cli

PROG = "ratplus-train"
DEFAULT_CONFIG = "debug_model"
CPU_TRAINER = "ratplus_titan.train:RATPlusTrainer"


def shipped_configs_dir() -> Path:
    """``ratplus_titan/train_configs`` of an install, or ``train_configs/`` beside the package in a checkout."""
    for base in ratplus_titan.__path__:  # a checkout adds its root to the package path (ratplus_titan/__init__.py)
        folder = Path(base) / "train_configs"
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"no train_configs folder beside or inside ratplus_titan ({', '.join(ratplus_titan.__path__)})"
    )


def shipped_configs() -> dict[str, Path]:
    """Name (file stem) -> path of every shipped TOML config."""
    return {path.stem: path for path in sorted(shipped_configs_dir().glob("*.toml"))}


def resolve_config(spec: str) -> Path:
    """An existing TOML file, or the name of a shipped config (``debug_model`` or ``debug_model.toml``)."""
    path = Path(spec)
    if path.is_file():
        return path.resolve()
    shipped = shipped_configs()
    name = spec.removesuffix(".toml")
    if name in shipped:  # a bare name: a path with folders never matches a file stem
        return shipped[name]
    raise FileNotFoundError(
        f"--config {spec!r} is neither a file nor a shipped config; shipped configs: {', '.join(shipped)}"
    )


def gpu_count(text: str | None) -> int:
    """``--ngpu`` (or ``NGPU``) if given, else every GPU torch sees."""
    if text is None:
        import torch

        return torch.cuda.device_count()
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(
            f"--ngpu (or NGPU) {text!r} is invalid: allowed values are integers >= 0 (0 = train on the CPU)"
        )
    return value


def torchrun_command(ngpu: int, config: Path, args: Sequence[str], train_module: str, log_rank: str) -> list[str]:
    """The torchrun line of torchtitan's ``run_train.sh``, for this interpreter."""
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ngpu}",
        "--rdzv_backend", "c10d", "--rdzv_endpoint=localhost:0",
        "--local-ranks-filter", log_rank, "--role", "rank", "--tee", "3",
        "-m", train_module, "--job.config_file", str(config), *args,
    ]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    names = ", ".join(shipped_configs())
    parser = cli.ArgumentParser(
        prog=PROG,
        allow_abbrev=False,  # never take a torchtitan flag for an abbreviation of ours
        description="Train a RAT+ model with torchtitan 0.2.2: torchrun over the GPUs of this machine, or one CPU "
        "process (gloo) when there is none. Every argument not listed below goes to torchtitan "
        "(e.g. --training.steps 100 --ratplus.dilation 16); after '--', all of them do.",
        epilog=f"Shipped configs: {names}. Environment: NGPU (= --ngpu), CONFIG_FILE (= --config), "
        "TRAIN_FILE (the trainer module torchrun runs, default ratplus_titan.train), LOG_RANK (ranks whose "
        "output is shown, default 0).",
    )
    parser.add_argument(
        "--config",
        "--job.config_file",
        dest="config",
        default=os.environ.get("CONFIG_FILE", DEFAULT_CONFIG),
        help=f"a TOML job config, or the name of a shipped one (default: $CONFIG_FILE, else {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--ngpu", default=os.environ.get("NGPU"), help="GPUs to train on (default: $NGPU, else all; 0 = the CPU)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    options, torchtitan_args = parser.parse_known_args(argv)
    if torchtitan_args[:1] == ["--"]:
        torchtitan_args = torchtitan_args[1:]
    with cli.user_errors(PROG):
        config = resolve_config(options.config)
        ngpu = gpu_count(options.ngpu)
    if ngpu > 0:
        from ratplus_titan.infra.entry import parse_job_config

        with cli.user_errors(PROG):
            parse_job_config(["--job.config_file", str(config), *torchtitan_args], warn=False)
        train_module, log_rank = os.environ.get("TRAIN_FILE", "ratplus_titan.train"), os.environ.get("LOG_RANK", "0")
        command = torchrun_command(ngpu, config, torchtitan_args, train_module, log_rank)
        sys.stdout.flush()
        os.execv(sys.executable, command)
    reason = "no GPU found" if options.ngpu is None else f"--ngpu/NGPU is {options.ngpu}"
    print(f"{PROG}: {reason}; training on CPU (one process, gloo)", file=sys.stderr)
    from ratplus_titan.infra import cpu

    cpu.main(["--trainer", CPU_TRAINER, "--", "--job.config_file", str(config), *torchtitan_args], prog=PROG)


if __name__ == "__main__":
    main()
