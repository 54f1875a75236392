"""Process-wide state that one test must not leave changed for the next (``tests/conftest.py`` checks it).

Test modules share a process (and, under pytest-xdist, a worker runs modules of every directory), so a
switch flipped by one test changes what later tests compute: ``TRITON_INTERPRET`` set at a module's import
turns every kernel module imported afterwards into interpreted code; torchtitan's ``--debug.deterministic``
leaves ``torch.use_deterministic_algorithms(True)`` on; TF32 switches change every fp32 matmul of a reference.

``snapshot()`` reads it all; ``changes(before, after)`` lists what differs; ``restore(before)`` puts it back.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch

# Variables that choose how kernels run or which process group a trainer joins.
WATCHED_ENV = ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "CUBLAS_WORKSPACE_CONFIG", "PYTHONHASHSEED",
               "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # fmt: skip

_MATMUL = torch.backends.cuda.matmul
_CUDNN = torch.backends.cudnn


def _deterministic() -> tuple[bool, bool]:
    return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()


def _set_deterministic(value: tuple[bool, bool]) -> None:
    torch.use_deterministic_algorithms(value[0], warn_only=value[1])


def _set_fill_uninitialized(value: bool) -> None:
    torch.utils.deterministic.fill_uninitialized_memory = value


# name -> (read, write) of torch's process-wide numerics switches
_TORCH: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {
    "torch.get_default_dtype()": (torch.get_default_dtype, torch.set_default_dtype),
    "torch.get_default_device()": (torch.get_default_device, torch.set_default_device),
    "torch.is_grad_enabled()": (torch.is_grad_enabled, torch.set_grad_enabled),
    "torch.is_anomaly_enabled()": (torch.is_anomaly_enabled, torch.set_anomaly_enabled),
    "deterministic algorithms (on, warn_only)": (_deterministic, _set_deterministic),
    "torch.utils.deterministic.fill_uninitialized_memory": (
        lambda: torch.utils.deterministic.fill_uninitialized_memory, _set_fill_uninitialized),
    "torch.get_float32_matmul_precision()": (torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
    "torch.backends.cuda.matmul.allow_tf32": (lambda: _MATMUL.allow_tf32, lambda v: setattr(_MATMUL, "allow_tf32", v)),
    "torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction": (
        lambda: _MATMUL.allow_fp16_reduced_precision_reduction,
        lambda v: setattr(_MATMUL, "allow_fp16_reduced_precision_reduction", v)),
    "torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction": (
        lambda: _MATMUL.allow_bf16_reduced_precision_reduction,
        lambda v: setattr(_MATMUL, "allow_bf16_reduced_precision_reduction", v)),
    "torch.backends.cudnn.allow_tf32": (lambda: _CUDNN.allow_tf32, lambda v: setattr(_CUDNN, "allow_tf32", v)),
    "torch.backends.cudnn.deterministic": (lambda: _CUDNN.deterministic, lambda v: setattr(_CUDNN, "deterministic", v)),
    "torch.backends.cudnn.benchmark": (lambda: _CUDNN.benchmark, lambda v: setattr(_CUDNN, "benchmark", v)),
}  # fmt: skip

# Launch settings of the kernel modules that tests override (with monkeypatch): (module, attribute).
_KERNEL_KNOBS = (
    ("ratplus_titan.kernels.pattern_attention_triton", "CONFIG_OVERRIDE"),
    ("ratplus_titan.kernels.pattern_attention_triton", "FAR_SPLIT_TILES"),
    ("ratplus_titan.kernels.topk_attention_triton", "CONFIG_OVERRIDE"),
    ("ratplus_titan.kernels.topk_select_triton", "SELECT_OVERRIDE"),
    ("ratplus_titan.kernels.decode_triton", "CONFIG"),
    ("ratplus_titan.kernels.recurrence_triton", "_FWD_CONFIG"),
    ("ratplus_titan.kernels.recurrence_triton", "_BWD_CONFIG"),
    ("ratplus_titan.kernels.recurrence_triton", "_INCLUSIVE_EVERY"),
)


def _read(read: Callable[[], Any]) -> Any:
    """The switch's value, or the error reading it raised (torch refuses some reads of the legacy TF32 flags
    once the newer ``fp32_precision`` settings were used): a snapshot never fails a test by itself."""
    try:
        return read()
    except RuntimeError as error:
        return f"<unreadable: {error}>"


def _copy(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else value


def snapshot() -> dict[str, Any]:
    """The watched environment variables, torch's switches and the loaded kernel modules' launch settings."""
    state: dict[str, Any] = {f"${name}": os.environ.get(name) for name in WATCHED_ENV}
    for name, (read, _) in _TORCH.items():
        state[name] = _read(read)
    for module, attr in _KERNEL_KNOBS:
        if module in sys.modules:  # only modules already imported: a snapshot imports nothing
            state[f"{module}.{attr}"] = _copy(getattr(sys.modules[module], attr))
    return state


def changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """``name: old -> new`` for each entry of ``before`` that ``after`` holds with another value."""
    out = []
    for name, old in before.items():
        new = after.get(name, old)  # a kernel module imported since: nothing to compare with
        if new != old:
            out.append(f"{name}: {old!r} -> {new!r}")
    return out


def restore(before: dict[str, Any]) -> None:
    """Put back every entry of ``before`` (environment, torch switches, kernel launch settings)."""
    for name in WATCHED_ENV:
        value = before[f"${name}"]
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    for name, (read, write) in _TORCH.items():
        value = before[name]
        if not (isinstance(value, str) and value.startswith("<unreadable")) and _read(read) != value:
            write(value)
    for module, attr in _KERNEL_KNOBS:
        key = f"{module}.{attr}"
        if key in before and module in sys.modules:
            current = getattr(sys.modules[module], attr)
            if isinstance(current, dict):  # in place: other modules may hold the same dict
                current.clear()
                current.update(before[key])
            else:
                setattr(sys.modules[module], attr, before[key])
