"""Starting a training run: the job config checked before anything is built, and config errors as one line.

Every way to train goes through ``train`` here: ``python -m ratplus_titan.train`` (the torchrun
processes of ``ratplus-train`` / ``run_train.sh`` on a GPU machine) and ``python -m
ratplus_titan.infra.cpu`` (the same without a GPU). It runs torchtitan 0.2.2's ``train.main`` with

- ``check_job_config`` right after the config is parsed: the ``[ratplus]`` types were checked
  when the section was built (``RATPlus.__post_init__``); here a copy of the flavor's model args
  takes the config as the trainer will (``update_from_config``: values, patterns, ``seq_len``, the
  attention backend on this machine), ``recompute`` is checked against the AC mode, and a pattern
  that is dense attention at ``training.seq_len`` gets a one-line warning;
- the checkpoint checks of ``resume.py`` (another flavor's checkpoint, a run already at its last step);
- a ``ConfigError`` from any of these, from torchtitan's parsing of the TOML file, or from building
  the trainer, printed as ``PROG: error: MESSAGE`` with exit status 2. Anything else is a bug and
  keeps its traceback.

``ratplus-train`` (``infra/launch.py``) runs ``parse_job_config`` before it starts torchrun, whose
failure report would bury the line.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from ratplus_titan.cli import error_message, fail
from ratplus_titan.config import ConfigError

if TYPE_CHECKING:
    from torchtitan.config import JobConfig

LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun sets and torchtitan's trainer reads."""


def check_job_config(config: JobConfig, warn: bool = True) -> None:
    """Raise ``ConfigError`` if the flavor's model cannot take ``config``; with ``warn``, log (once, one line)
    the configured patterns that are dense attention at ``training.seq_len``."""
    from torchtitan.tools.logging import logger

    from ratplus_titan.infra.activation_checkpoint import check_recompute
    from ratplus_titan.model import ratplus_flavors
    from ratplus_titan.train_spec import NAME

    if config.model.name != NAME:
        return
    section = getattr(config, "ratplus", None)
    if section is not None:
        check_recompute(section.recompute, config.activation_checkpoint.mode)
    try:
        args = copy.deepcopy(ratplus_flavors[config.model.flavor])
    except KeyError as err:
        raise ConfigError(error_message(err)) from None
    args.update_from_config(config)
    seq_len = config.training.seq_len
    dense = args.dense_patterns(seq_len)
    if warn and dense:
        logger.warning(
            f"ratplus: pattern {', '.join(map(str, dense))} is dense attention at training.seq_len={seq_len} (a local "
            f"window >= {seq_len - 1} or >= {seq_len} sinks cover every earlier key), so training is not sparse: "
            f"use ratplus.local_window < {seq_len - 1} for a sparse pattern"
        )


def parse_job_config(args: Sequence[str], warn: bool = True) -> JobConfig:
    """torchtitan's ``ConfigManager().parse_args(args)`` and ``check_job_config``; ``ConfigError`` for bad values.

    ``warn=False``: a check before the run itself, which logs torchtitan's warnings and ours; none here.
    """
    from torchtitan.config import ConfigManager
    from torchtitan.tools.logging import logger

    level = logger.level
    if not warn:
        logger.setLevel(logging.ERROR)
    try:
        with checked_parsing(warn):
            return ConfigManager().parse_args(list(args))
    finally:
        logger.setLevel(level)


@contextmanager
def checked_parsing(warn: bool = True, args: Sequence[str] | None = None) -> Iterator[None]:
    """While inside, torchtitan's ``ConfigManager.parse_args`` runs ``check_job_config`` on what it parsed,
    and its ``ValueError`` (a TOML field that does not exist, ...) becomes a ``ConfigError``.

    ``args``: what ``parse_args()`` parses when called without arguments (torchtitan's ``main``
    does), instead of the ``sys.argv[1:]`` bound when torchtitan was imported.
    """
    from torchtitan.config import ConfigManager

    original = ConfigManager.parse_args

    def parse_args(manager: ConfigManager, given: Sequence[str] | None = None) -> JobConfig:
        given = given if given is not None else args if args is not None else sys.argv[1:]
        try:
            config = original(manager, list(given))
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from err
        check_job_config(config, warn)
        return config

    ConfigManager.parse_args = parse_args
    try:
        yield
    finally:
        ConfigManager.parse_args = original


def train(trainer_cls: type, args: Sequence[str] | None, prog: str) -> None:
    """torchtitan's ``train.main(trainer_cls)`` parsing ``args`` (``sys.argv[1:]`` if None), with the
    checks above; a ``ConfigError`` ends the process with ``PROG: error: MESSAGE`` (exit status 2)."""
    import torchtitan.train as tt_train

    from ratplus_titan.infra.resume import resume_checks

    try:
        with checked_parsing(args=args), resume_checks():
            tt_train.main(trainer_cls)
    except ConfigError as err:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        fail(prog, err)


def require_launcher(prog: str, argv: Sequence[str]) -> None:
    """Exit with one line saying what to run when the torchrun variables are missing (``--help`` passes)."""
    missing = [name for name in LAUNCHER_VARIABLES if name not in os.environ]
    if missing and not {"-h", "--help"} & set(argv):
        fail(
            prog,
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: this module runs under torchrun "
            "(one process per GPU). Train with ratplus-train --config X.toml (./run_train.sh in a checkout), "
            "which starts torchrun on the GPUs of this machine, or one CPU process when it has none",
        )


def torchrun_main(trainer_cls: type, prog: str = "ratplus_titan.train") -> None:
    """``python -m ratplus_titan.train``: one process of a torchrun job."""
    require_launcher(prog, sys.argv[1:])
    train(trainer_cls, None, prog)
