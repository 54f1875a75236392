"""Training on a machine without a GPU: torchtitan 0.2.2's trainer in one CPU process, with gloo.

This is the small-machine path (``make train`` and ``run_train.sh`` take it when no GPU is found)::

    python -m ratplus_titan.infra.cpu [--trainer pkg.mod:Class] [--no-fast] -- --job.config_file X.toml [...]

torchtitan 0.2.2 decides its device once, at import time
(``torchtitan.tools.utils.device_type = _get_available_device_type() or "cuda"``), and every
module that needs it binds the names with ``from ... import device_type, device_module``. On a
machine without an accelerator that is ``"cuda"`` / ``torch.cuda``, so ``Trainer.__init__`` dies
in ``torch.cuda.set_device``. :func:`patch_torchtitan_for_cpu` rebinds those names to ``"cpu"``
and a small stand-in for ``torch.cuda`` (:class:`CpuDeviceModule`) in every loaded torchtitan
and ratplus_titan module; the process group then uses gloo
(``Backend.default_device_backend_map["cpu"]``). It also removes a few CPU pitfalls: no
``lspci`` peak-FLOP/s lookup and no MFU (torchtitan's peak table knows GPUs only: the step log
says ``mfu: n/a``), no 2 s sleep at the end of ``Trainer.train``, FSDP2's reduce-scatter in a
form gloo supports (several gloo ranks, as the tests run them, also work under ``torchrun``).

:data:`CPU_FAST_ARGS` go before the command-line arguments (which override them): fp32 instead
of emulated bf16 and no activation checkpointing, 15-30x faster on CPU. The measurements and
every torchtitan pitfall met on CPU: ``docs/torchtitan_cpu.md``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import resource
import socket
import sys
import time
import types
import warnings
from collections.abc import Sequence
from typing import Any

import torch

DEFAULT_TRAINER = "ratplus_titan.train:RATPlusTrainer"
PROG = "python -m ratplus_titan.infra.cpu"


class CpuDeviceModule:
    """Stand-in for ``torch.cuda`` as torchtitan 0.2.2 uses it (``utils.device_module``).

    Everything torchtitan calls is a cheap no-op; memory statistics report the
    process's peak resident set size (``getrusage``), so the "memory:" column of
    the training log shows something meaningful instead of -1 GiB.
    """

    class _Memory:
        @staticmethod
        def _record_memory_history(*args: Any, **kwargs: Any) -> None:
            return None

        @staticmethod
        def _snapshot(*args: Any, **kwargs: Any) -> dict:
            return {}

    memory = _Memory()

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def set_device(device: Any) -> None:
        return None

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def manual_seed(seed: int) -> None:
        return None

    manual_seed_all = manual_seed

    @staticmethod
    def set_stream(stream: Any) -> None:
        return None

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        return None

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "CPU"

    @staticmethod
    def get_device_properties(device: Any = None) -> types.SimpleNamespace:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return types.SimpleNamespace(name="CPU", total_memory=total)

    @staticmethod
    def memory_stats(device: Any = None) -> dict[str, int]:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return {
            "active_bytes.all.peak": peak,
            "reserved_bytes.all.peak": peak,
            "num_alloc_retries": 0,
            "num_ooms": 0,
        }


CPU_DEVICE_MODULE = CpuDeviceModule()


def cpu_peak_flops(device_name: str = "CPU") -> float:
    """No peak FLOP/s is known for a CPU: NaN, so torchtitan's MFU is NaN (logged as ``n/a``).

    The stock lookup shells out to ``lspci`` and falls back to the A100's 312 TFLOP/s.
    """
    return float("nan")


class MfuNotAvailable(logging.Filter):
    """Rewrites torchtitan's log lines whose MFU came from the unknown (NaN) peak: ``mfu: n/a``.

    Lines with a real MFU (a GPU peak) pass unchanged.
    """

    REWRITES = (("mfu: nan%", "mfu: n/a"), ("computing MFU: nan", "computing MFU: n/a (no peak FLOP/s known for CPU)"))

    def filter(self, record: logging.LogRecord) -> bool:
        message = rewritten = record.getMessage()
        for old, new in self.REWRITES:
            rewritten = rewritten.replace(old, new)
        if rewritten != message:
            record.msg, record.args = rewritten, ()
        return True


class _NoSleepTime(types.ModuleType):
    """``time`` for ``torchtitan.train``: ``Trainer.train`` ends with ``time.sleep(2)`` on rank 0."""

    def __init__(self) -> None:
        super().__init__("time")

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        return None


def _patch_fsdp_for_gloo() -> None:
    """FSDP2 reduce-scatters gradients with ``ReduceOp.PREMUL_SUM(1/factor)`` (or ``AVG``)
    for fp32/bf16 grads; gloo supports neither ("Cannot use ReduceOp.PREMUL_SUM with
    Gloo": torchtitan calls ``set_gradient_divide_factor(1.0)`` on every FSDP module).
    On CPU force the SUM + post-divide path that FSDP2 already has for MTIA: same
    result, one extra ``div_`` when the factor is not 1."""
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as coll

    orig = coll._get_gradient_divide_factors
    if getattr(orig, "_tt_cpu_shim", False):
        return

    def _get_gradient_divide_factors(
        reduce_scatter_group: Any,
        all_reduce_group: Any,
        reduce_dtype: torch.dtype,
        device_type: str = "",
        factor: float | None = None,
        force_sum_reduction_for_comms: bool = False,
    ) -> Any:
        if device_type == "cpu":
            force_sum_reduction_for_comms = True
        return orig(
            reduce_scatter_group, all_reduce_group, reduce_dtype, device_type, factor, force_sum_reduction_for_comms
        )

    _get_gradient_divide_factors._tt_cpu_shim = True  # type: ignore[attr-defined]
    coll._get_gradient_divide_factors = _get_gradient_divide_factors


def _patch_module(mod: types.ModuleType, original: tuple[str, Any]) -> None:
    # Only names that hold torchtitan's pre-patch values (bound by `from torchtitan.tools.utils
    # import device_type, device_module`), so unrelated module globals are left alone.
    if "device_type" in vars(mod) and mod.device_type == original[0]:
        mod.device_type = "cpu"
    if "device_module" in vars(mod) and mod.device_module is original[1]:
        mod.device_module = CPU_DEVICE_MODULE


def patch_torchtitan_for_cpu(
    skip_final_sleep: bool = True, packages: Sequence[str] = ("torchtitan", "ratplus_titan")
) -> None:
    """Make the stock torchtitan 0.2.2 ``Trainer`` run on CPU with gloo.  Idempotent.

    * ``device_type``/``device_module`` -> ``"cpu"``/:class:`CpuDeviceModule` in
      ``torchtitan.tools.utils`` (first, so modules imported later bind the CPU
      values) and in every already-imported ``torchtitan.*`` module;
      ``utils.get_device_info`` returns them too (``dual_pipe_v`` calls it).
      Modules of the other ``packages`` (our plugin) that bound the names from
      torchtitan before the patch are rebound as well.
    * ``utils.get_peak_flops`` -> NaN (no ``lspci`` subprocess, no A100 fallback), and
      :class:`MfuNotAvailable` on torchtitan's logger: the step log says ``mfu: n/a``.
    * ``torchtitan.train.time.sleep`` -> no-op (``skip_final_sleep``): saves 2 s per run.

    Call it again after importing more torchtitan modules (e.g. experiments); each
    call re-walks ``sys.modules``.  The backend follows from ``device_type``:
    ``Backend.default_device_backend_map["cpu"] == "gloo"``.
    """
    import torchtitan.tools.utils as tt_utils
    from torchtitan.tools.logging import logger as tt_logger

    # torchtitan's own choice, normally ("cuda", torch.cuda); kept on the module itself so
    # that a second copy of this file (imported under another name) sees it too.
    if not hasattr(tt_utils, "_tt_cpu_shim_original"):
        tt_utils._tt_cpu_shim_original = (tt_utils.device_type, tt_utils.device_module)
    original = tt_utils._tt_cpu_shim_original
    tt_utils.device_type = "cpu"
    tt_utils.device_module = CPU_DEVICE_MODULE
    tt_utils.get_device_info = lambda: ("cpu", CPU_DEVICE_MODULE)
    tt_utils.get_peak_flops = cpu_peak_flops
    if not any(type(f).__name__ == MfuNotAvailable.__name__ for f in tt_logger.filters):
        tt_logger.addFilter(MfuNotAvailable())

    # Import the modules the trainer needs *after* utils is patched.
    import torchtitan.components.checkpoint  # noqa: F401
    import torchtitan.components.metrics  # noqa: F401
    import torchtitan.components.validate  # noqa: F401
    import torchtitan.distributed.utils  # noqa: F401
    import torchtitan.train as tt_train

    for name, mod in list(sys.modules.items()):
        if mod is not None and any(name == p or name.startswith(p + ".") for p in packages):
            _patch_module(mod, original)

    _patch_fsdp_for_gloo()
    # With CPU_FAST_ARGS (--training.mixed_precision_param float32) torchtitan builds
    # torch.autocast("cpu", dtype=float32), which disables itself with this warning.
    warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
    if skip_final_sleep and tt_train.time is time:
        tt_train.time = _NoSleepTime()


#: Job-config flags for fast CPU runs (the measurements are in docs/torchtitan_cpu.md).
CPU_FAST_ARGS: tuple[str, ...] = (
    # bf16 autocast on a CPU without AVX512-BF16/AMX is emulated: the biggest cost.
    "--training.mixed_precision_param", "float32",
    # Selective AC recomputes every 2nd block in backward: pure overhead on CPU.
    "--activation_checkpoint.mode", "none",
    "--compile.no-enable",
    "--metrics.log_freq", "1",
    "--metrics.disable_color_printing",
)  # fmt: skip


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The launcher variables of a world of one (a free ``MASTER_PORT`` unless ``env`` has one), then ``env``."""
    out = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "HF_DATASETS_OFFLINE": "1",
    }
    if "MASTER_PORT" not in (env or {}):
        out["MASTER_PORT"] = str(find_free_port())
    out.update(env or {})
    return out


def load_class(path: str) -> type:
    """``"pkg.module:Class"`` (or ``"pkg.module.Class"``) -> the class."""
    mod_name, _, attr = path.partition(":")
    if not attr:
        mod_name, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(mod_name), attr)


def train(trainer_cls_path: str, args: list[str], prog: str = PROG) -> None:
    """torchtitan's ``train.main(trainer_cls)`` on CPU, parsing ``args`` (not ``sys.argv``); a config
    error ends the process with one line (``entry.train``)."""
    patch_torchtitan_for_cpu()
    import ratplus_titan.train_spec  # noqa: F401  (registers "ratplus" for any trainer: this package was imported first)
    from ratplus_titan.infra import entry

    trainer_cls = load_class(trainer_cls_path)
    for k, v in single_process_env({k: v for k, v in os.environ.items() if k == "MASTER_PORT"}).items():
        os.environ.setdefault(k, v)  # torchrun's variables win
    entry.train(trainer_cls, args, prog)


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> None:
    """``python -m ratplus_titan.infra.cpu``; ``prog`` names the command in error lines (``ratplus-train``)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train with torchtitan on a machine without a GPU (one CPU process, gloo). "
        "Arguments after '--' go to torchtitan (e.g. --job.config_file train_configs/debug_model.toml).",
    )
    parser.add_argument(
        "--trainer", default=DEFAULT_TRAINER, help=f"trainer class, 'pkg.module:Class' (default {DEFAULT_TRAINER})"
    )
    parser.add_argument("--no-fast", action="store_true", help="do not prepend CPU_FAST_ARGS (fp32, no AC, no compile)")
    ns, rest = parser.parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    # CPU_FAST_ARGS come first so anything given on the command line wins (tyro: last wins).
    train(ns.trainer, ([] if ns.no_fast else list(CPU_FAST_ARGS)) + rest, prog)


if __name__ == "__main__":
    main()
