"""What every benchmark shares: the environment record, the device slug, timing, JSON and PNG output.

- ``environment()``: ``{device, torch, triton, cuda, sms, date}``, stored as ``"env"`` in every result JSON;
- ``device_slug()``: ``H100``, ``H200``, ... (``cpu`` without CUDA), the suffix of every result file name;
- ``do_bench(fn)``: median milliseconds (``triton.testing.do_bench`` on CUDA: CUDA events, L2 flushed
  between calls; ``perf_counter`` on the CPU);
- ``copy_bandwidth()``: a device-to-device copy, bytes read + written per second (the yardstick of
  memory-bound kernels);
- ``write_json``, ``save_figure``: results into ``--out`` (``out_dir()``: ``$OUT`` when set, else ``bench/results``).

``import_without_train_spec()`` makes the kernel and model modules importable on a device machine
without torchtitan: ``ratplus_titan/__init__`` registers the torchtitan train spec only when torchtitan
is already imported, so the import normally succeeds; if it fails all the same, the package and its
kernels are mapped by path (bare modules).
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def log(*args: Any) -> None:
    print(*args, flush=True)


def import_without_train_spec() -> None:
    try:
        import ratplus_titan  # noqa: F401
    except ImportError:
        for name, folder in (("ratplus_titan", "ratplus_titan"), ("ratplus_titan.kernels", "kernels")):
            module = types.ModuleType(name)
            module.__path__ = [str(REPO / folder)]
            sys.modules[name] = module


def out_dir() -> str:
    """The default ``--out``: ``$OUT`` (the device machine's returned folder) when set, else ``bench/results``."""
    return os.environ.get("OUT") or str(RESULTS)


def device_slug(device: str = "cuda") -> str:
    """Short name of the GPU for file names (``H100``, ``H200``, ``A100``, ``B200``); ``cpu`` without one."""
    if device != "cuda" or not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name()
    for key in ("H100", "H200", "A100", "B200"):
        if key in name:
            return key
    return name.replace(" ", "_")


def environment(device: str = "cuda") -> dict[str, Any]:
    """What ran the benchmark: device name, torch / triton / CUDA versions, SM count, UTC time."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    on_gpu = device == "cuda" and torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "sms": torch.cuda.get_device_properties(0).multi_processor_count if on_gpu else 0,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def do_bench(fn: Callable[[], Any], warmup_ms: float = 25, rep_ms: float = 100, device: str = "cuda") -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on CUDA; on the CPU one warm-up call, then 5 timed."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def kernel_times(fn: Callable[[], Any]) -> list[list]:
    """``[name, ms]`` of each CUDA kernel of one call of ``fn``, in launch order (torch.profiler; after a warm call)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [[e.name[:60], e.device_time / 1e3] for e in sorted(kernels, key=lambda e: e.time_range.start)]


def copy_bandwidth(gib: float = 2.0) -> float:
    """A device-to-device copy of ``gib`` GiB: bytes read plus bytes written per second."""
    src = torch.empty(int(gib * 2**30) // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    nbytes = 2 * src.numel() * src.element_size()
    src = dst = None  # free before the benchmark that follows
    torch.cuda.empty_cache()
    return nbytes / (ms / 1e3)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` to ``path`` (folders created; written to a temporary file, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=1, default=str) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (8, 4.5)):
    """``(fig, axes)`` from matplotlib without a display (raises ImportError without matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=figsize)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    log(f"wrote {path}")
    return Path(path)


def plot_or_skip(plot: Callable[[dict, Path], Any], results: dict, path: Path) -> None:
    """``plot(results, path)``, or a note when matplotlib is missing: the JSON holds everything."""
    try:
        plot(results, path)
    except ImportError as error:
        log(f"no plot {path.name}: {error}")
