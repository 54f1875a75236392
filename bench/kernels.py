"""Kernel benchmarks on one GPU: one ``bench_<name>(results, args)`` (and a plot) per kernel.

- ``scan``: the Triton gated recurrence (``kernels/recurrence_triton.py``), forward and backward at
  ``SCAN_SHAPES`` (bf16), as GB/s of the fewest bytes the op must move (each input read once, each
  output written once) and as a share of the device-to-device copy bandwidth; against
  ``associative_scan`` compiled.
- ``attention``: the Triton pattern attention (``kernels/pattern_attention_triton.py``), forward, backward
  and forward + backward ms at B=1, 16 x 128 heads, bf16, patterns d16w256s4 and d64w256s4, against dense
  causal SDPA (its default backend and FlashAttention-2 forced); ``--methods flex`` adds the FlexAttention
  path. Ends with the speedups over SDPA's default and issue 11's targets (``ATTENTION_TARGETS``); up to
  ``--check-max-t`` the Triton output and gradients are checked against the fp32 reference (2 heads). On
  CUDA each Triton row lists its forward + backward kernel by kernel (``fwdbwd_kernels_ms``, torch.profiler).
  ``--variants`` times (and checks) the Triton rows again under other launch settings, side by side in the
  same run: tiles per kernel kind and the far kernel's split rule (``attention_variant``).
- ``topk``: the Triton top-k block attention (``kernels/topk_attention_triton.py``): ``bench/topk.py``'s
  check, decode and prefill phases (also standalone: ``python -m bench.topk``).

Writes ``kernels_<device>.json`` (``env``, ``copy_GBps`` and one entry per bench) and
``<bench>_<device>.png`` into ``--out``. A new kernel: a ``bench_<name>`` and ``plot_<name>``
pair and an entry in ``BENCHES``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench import common
from bench.common import do_bench, log

common.import_without_train_spec()


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / ms / 1e6


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``|actual - expected| / |expected|`` (L2 norms, in float64)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------------
# gated recurrence scan (kernels/recurrence_triton.py)
# ----------------------------------------------------------------------------------------------

SCAN_SHAPES = [(4, 16384, 16, 128), (1, 262144, 16, 128)]  # [B, T, H, hd]


def scan_inputs(batch, seq_len, heads, head_dim, dtype=torch.bfloat16, seed=0):
    """Gate, key, value views of a fused projection output, split as in the model; grads for K, V."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    fused = torch.randn(batch, seq_len, heads, 5, head_dim, device="cuda", dtype=dtype, generator=gen)
    _, _, keys, values, gates = fused.unbind(3)
    grads = torch.randn(2, batch, seq_len, heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    return fused, gates, keys, values, grads[0], grads[1]


def scan_bytes(batch, seq_len, heads, head_dim, itemsize=2) -> tuple[int, int]:
    """Fewest bytes: forward reads f, k, x and writes K, V; backward reads f, k, x, gK, gV, writes df, dk, dx."""
    n = batch * seq_len * heads * head_dim * itemsize
    return 5 * n, 8 * n


def _affine(left, right):
    a1, k1, v1 = left
    a2, k2, v2 = right
    return a2 * a1, a2 * k1 + k2, a2 * v1 + v2


def assoc_scan_forward(gates, keys, values):
    """Baseline: the same recurrence with ``torch._higher_order_ops.associative_scan`` (to be compiled)."""
    from torch._higher_order_ops.associative_scan import associative_scan

    a = torch.sigmoid(gates.float())
    om = 1 - a
    _, key_states, value_states = associative_scan(_affine, (a, om * keys.float(), om * values.float()), dim=1)
    return key_states.to(keys.dtype), value_states.to(values.dtype)


def assoc_scan_backward(gates, keys, values, grad_k, grad_v):
    """Baseline backward: the same work as ours (recompute the forward scan, reverse scan, gradients)."""
    from torch._higher_order_ops.associative_scan import associative_scan

    a = torch.sigmoid(gates.float())
    om = 1 - a
    k32, x32 = keys.float(), values.float()
    _, key_states, value_states = associative_scan(_affine, (a, om * k32, om * x32), dim=1)
    a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1)
    _, gs_k, gs_v = associative_scan(_affine, (a_next, grad_k.float(), grad_v.float()), dim=1, reverse=True)
    d_f = (gs_k * (key_states - k32) + gs_v * (value_states - x32)) * om
    return d_f.to(gates.dtype), (gs_k * om).to(keys.dtype), (gs_v * om).to(values.dtype)


def _time_scan_ops(rt, gates, keys, values, grad_k, grad_v, fwd_cfg, bwd_cfg):
    states = rt._scan_fwd(gates, keys, values, *fwd_cfg)[2]
    fwd_ms = do_bench(lambda: rt._scan_fwd(gates, keys, values, *fwd_cfg))
    bwd_ms = do_bench(lambda: rt._scan_bwd(gates, keys, values, states, grad_k, grad_v, *bwd_cfg))
    return fwd_ms, bwd_ms, states


def bench_scan(results: dict, args: argparse.Namespace) -> None:
    """Forward and backward of the Triton scan at ``SCAN_SHAPES`` (bf16), against compiled associative_scan."""
    from ratplus_titan.kernels import recurrence_triton as rt

    copy_bw = results["copy_GBps"]
    rows = results.setdefault("scan", [])
    fwd_base = torch.compile(assoc_scan_forward, fullgraph=True, dynamic=False)
    bwd_base = torch.compile(assoc_scan_backward, fullgraph=True, dynamic=False)
    for shape in SCAN_SHAPES:
        row = {"shape_BTHhd": list(shape), "dtype": "bfloat16"}
        rows.append(row)
        try:
            fused, gates, keys, values, grad_k, grad_v = scan_inputs(*shape)
            fwd_bytes, bwd_bytes = scan_bytes(*shape)
            fwd_cfg, bwd_cfg = rt.default_configs(shape, keys.dtype)
            fwd_ms, bwd_ms, states = _time_scan_ops(rt, gates, keys, values, grad_k, grad_v, fwd_cfg, bwd_cfg)
            row.update(
                config={"fwd (chunk, block_c, warps, per_sm)": fwd_cfg, "bwd (chunk, block_c, warps, per_sm)": bwd_cfg},
                fwd_bytes=fwd_bytes,
                bwd_bytes=bwd_bytes,
                fwd_ms=fwd_ms,
                bwd_ms=bwd_ms,
                fwd_GBps=gbps(fwd_bytes, fwd_ms),
                bwd_GBps=gbps(bwd_bytes, bwd_ms),
                fwd_pct_copy=100 * gbps(fwd_bytes, fwd_ms) / copy_bw,
                bwd_pct_copy=100 * gbps(bwd_bytes, bwd_ms) / copy_bw,
            )
            log(f"scan {shape}: fwd {fwd_ms:.3f} ms {row['fwd_GBps']:.0f} GB/s ({row['fwd_pct_copy']:.0f}% copy), "
                f"bwd {bwd_ms:.3f} ms {row['bwd_GBps']:.0f} GB/s ({row['bwd_pct_copy']:.0f}% copy)")  # fmt: skip
            ours = rt.recurrence_triton(gates, keys, values)
            ours_bwd = rt._scan_bwd(gates, keys, values, states, grad_k, grad_v, *bwd_cfg)
            for name, fn, inputs, our_out, key in (
                ("fwd", fwd_base, (gates, keys, values), ours, "fwd_ms"),
                ("bwd", bwd_base, (gates, keys, values, grad_k, grad_v), ours_bwd, "bwd_ms"),
            ):
                try:
                    start = time.time()
                    base_out = fn(*inputs)
                    torch.cuda.synchronize()
                    row[f"assoc_{name}_compile_s"] = time.time() - start
                    row[f"assoc_{name}_rel_err_vs_ours"] = max(rel_err(o, b) for o, b in zip(our_out, base_out))
                    del base_out
                    base_ms = do_bench(lambda fn=fn, inputs=inputs: fn(*inputs))
                    row[f"assoc_{name}_ms"] = base_ms
                    row[f"{name}_speedup_vs_assoc"] = base_ms / row[key]
                    log(f"  associative_scan {name}: {base_ms:.3f} ms -> ours {row[f'{name}_speedup_vs_assoc']:.1f}x faster "
                        f"(rel err between them {row[f'assoc_{name}_rel_err_vs_ours']:.2e})")  # fmt: skip
                except Exception as error:  # report and go on
                    row[f"assoc_{name}_error"] = repr(error)[:500]
                    log(f"  associative_scan {name} failed: {error!r}"[:500])
            del fused, gates, keys, values, grad_k, grad_v, ours, ours_bwd, states
        except Exception as error:
            row["error"] = repr(error)[:500]
            log(traceback.format_exc())
        torch.cuda.empty_cache()


def plot_scan(results: dict, path: Path) -> None:
    rows = [r for r in results.get("scan", []) if "fwd_GBps" in r]
    if not rows:
        return
    fig, ax = common.figure()
    labels, width = [], 0.35
    for i, row in enumerate(rows):
        labels.append("B={} T={} H={} hd={}".format(*row["shape_BTHhd"]))
        for j, name in enumerate(("fwd", "bwd")):
            ours = row[f"{name}_GBps"]
            x = i + (j - 0.5) * width
            ax.bar(x, ours, width * 0.9, color=("tab:blue", "tab:orange")[j], label=f"Triton {name}" if i == 0 else None)
            ax.text(x, ours, f"{100 * ours / results['copy_GBps']:.0f}%", ha="center", va="bottom", fontsize=8)
            if f"assoc_{name}_ms" in row:
                base = row[f"{name}_bytes"] / row[f"assoc_{name}_ms"] / 1e6
                ax.bar(x, base, width * 0.45, color="gray", label="associative_scan (compiled)" if i == 0 and j == 0 else None)
    ax.axhline(results["copy_GBps"], color="k", linestyle="--", linewidth=1, label="D2D copy")
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("GB/s (fewest bytes / time)")
    ax.set_title(f"Gated recurrence scan, bf16, {results['env']['device']}")
    ax.legend(fontsize=8)
    common.save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# pattern attention (kernels/pattern_attention_triton.py)
# ----------------------------------------------------------------------------------------------

ATTENTION_PATTERNS = ("d16w256s4", "d64w256s4")
HEADS, HEAD_DIM = 16, 128
SDPA_BACKENDS = {"sdpa_dense": None, "sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION"}


def attention_forward(method: str, q, k, v, pattern):
    """The forward of one method: dense causal SDPA (``sdpa_*``: default backend or one forced), or ours."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    scale = HEAD_DIM**-0.5
    if method in SDPA_BACKENDS:
        backend = SDPA_BACKENDS[method]
        if backend is None:
            return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

        def forced():
            with sdpa_kernel(getattr(SDPBackend, backend)):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

        return forced
    if method == "triton":
        from ratplus_titan.kernels.pattern_attention_triton import pattern_attention_triton

        return lambda: pattern_attention_triton(q, k, v, pattern, scale)
    if method == "flex":
        from ratplus_titan.kernels.pattern_attention_flex import flex_pattern_attention

        return lambda: flex_pattern_attention(q, k, v, pattern, scale)
    raise ValueError(f"attention method {method!r} is unknown: allowed are {', '.join([*SDPA_BACKENDS, 'triton', 'flex'])}")


def time_attention(method: str, q, k, v, pattern, rep_ms: float) -> tuple[float, float, float]:
    """(forward ms, backward ms, forward + backward ms) of one method; backward = the autograd backward alone
    (retain_graph), forward + backward = one call of both, timed as one."""
    fwd = attention_forward(method, q, k, v, pattern)
    device = q.device.type
    timing = dict(warmup_ms=max(rep_ms / 4, 25), rep_ms=rep_ms, device=device)
    with torch.no_grad():
        fwd_ms = do_bench(fwd, **timing)
    out = fwd()
    grad = torch.randn_like(out)
    bwd = lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)  # noqa: E731
    bwd_ms = do_bench(bwd, **timing)
    out = None  # frees the retained graph before the next timing
    return fwd_ms, bwd_ms, do_bench(forward_backward(fwd, q, k, v, grad), **timing)


def forward_backward(fwd: Callable[[], torch.Tensor], q, k, v, grad: torch.Tensor) -> Callable[[], Any]:
    """One call of the forward ``fwd`` and its backward (the gradients of q, k, v)."""
    return lambda: torch.autograd.grad(fwd(), (q, k, v), grad)


def add_speedups(rows: list[dict]) -> None:
    """Speedup of each pattern row over the SDPA rows of the same T (sdpa_dense: SDPA's default choice,
    sdpa_flash: FlashAttention-2 forced)."""
    for row in rows:
        if row["method"].startswith("sdpa") or "fwd_ms" not in row:
            continue
        for base in rows:
            if base["T"] == row["T"] and base["method"].startswith("sdpa") and "fwd_ms" in base:
                suffix = "dense" if base["method"] == "sdpa_dense" else base["method"].removeprefix("sdpa_")
                for part in ("fwd", "bwd", "fwdbwd"):
                    if f"{part}_ms" in base and f"{part}_ms" in row:
                        row[f"{part}_speedup_vs_{suffix}"] = base[f"{part}_ms"] / row[f"{part}_ms"]


# issue 11's targets: (part, T, pattern) -> least speedup of the Triton kernel over dense causal SDPA (default)
ATTENTION_TARGETS = {
    ("fwdbwd", 16384, "d16w256s4"): 6.0,
    ("fwdbwd", 16384, "d64w256s4"): 8.0,
    ("fwd", 65536, "d16w256s4"): 12.0,
    ("fwd", 65536, "d64w256s4"): 35.0,
}


def attention_summary(rows: list[dict]) -> list[dict]:
    """One line per Triton row: fwd, bwd, fwd+bwd ms and x over sdpa_dense, and each target it is held to."""
    summary = []
    for row in rows:
        if row["method"] != "triton" or "fwd_speedup_vs_dense" not in row:
            continue
        if row.get("variant"):  # a launch setting other than the defaults: logged, not held to the targets
            log(f"T={row['T']:>6} {row['pattern']} [{row['variant']}]: fwd+bwd {row.get('fwdbwd_ms', math.nan):.3f} ms"
                f" = {row.get('fwdbwd_speedup_vs_dense', math.nan):.2f}x")
            continue
        ratios = "  ".join(f"{part} {row[f'{part}_ms']:.3f} ms = {row[f'{part}_speedup_vs_dense']:.1f}x"
                           for part in ("fwd", "bwd", "fwdbwd") if f"{part}_speedup_vs_dense" in row)
        log(f"T={row['T']:>6} {row['pattern']}: {ratios}  (vs sdpa_dense)")
        for (part, seq_len, pattern), target in ATTENTION_TARGETS.items():
            if (seq_len, pattern) == (row["T"], row["pattern"]) and f"{part}_speedup_vs_dense" in row:
                got = row[f"{part}_speedup_vs_dense"]
                verdict = "met" if got >= target else "MISSED"
                summary.append({"part": part, "T": seq_len, "pattern": pattern, "target": target, "speedup": got,
                                "met": got >= target})
                log(f"    target {part} >= {target:.0f}x: {got:.2f}x {verdict}")
    return summary


def check_attention(q, k, v, pattern, heads: int = 2) -> dict:
    """Relative errors (L2 norms) of the Triton out, dq, dk, dv against the fp32 explicit-mask reference
    (``pattern_attention_reference``), on the first ``heads`` heads at full length."""
    from ratplus_titan.kernels.pattern_attention import pattern_attention_reference
    from ratplus_titan.kernels.pattern_attention_triton import pattern_attention_triton

    q, k, v = (x[:, :heads].detach().clone().requires_grad_(True) for x in (q, k, v))
    grad = torch.randn(q.shape, device=q.device, generator=torch.Generator(q.device).manual_seed(1)).to(q.dtype)
    out = pattern_attention_triton(q, k, v, pattern, HEAD_DIM**-0.5)
    ours = (out, *torch.autograd.grad(out, (q, k, v), grad))
    q32, k32, v32 = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref_out = pattern_attention_reference(q32, k32, v32, pattern, HEAD_DIM**-0.5)
    refs = (ref_out, *torch.autograd.grad(ref_out, (q32, k32, v32), grad.float()))
    errors = {name: rel_err(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), ours, refs)}
    errors["finite"] = all(bool(torch.isfinite(a).all()) for a in ours)
    return errors


TILE_KINDS = ("fwd", "dq", "dkdv")
"""Kernel kinds of ``pattern_attention_triton.CONFIG_OVERRIDE``: tiles ``BLOCK_MxBLOCK_NxWARPSxSTAGES``."""
FAR_SETTINGS = {"far_split": "FAR_SPLIT_TILES", "far_waves": "FAR_WAVES", "far_min_tiles": "FAR_MIN_TILES"}
"""``--variants`` keys for the far kernel's split rule -> the module constant each sets (positive integers)."""
VARIANT_FORM = "key=value pairs joined by ',' (variants joined by ';'), e.g. 'dkdv=64x64x4x3,far_split=64'"


def attention_variant(text: str) -> dict[str, Any]:
    """One ``--variants`` item -> settings: ``fwd`` / ``dq`` / ``dkdv`` = tiles ``BMxBNxWxS`` (powers of two,
    BM and BN >= 16), ``far_split`` / ``far_waves`` / ``far_min_tiles`` = a positive integer."""
    settings: dict[str, Any] = {}
    for item in text.split(","):
        key, _, value = (part.strip() for part in item.partition("="))
        if key in TILE_KINDS:
            parts = value.split("x")
            tiles = tuple(int(p) for p in parts) if len(parts) == 4 and all(p.isdigit() for p in parts) else None
            if tiles is None or any(t < 1 or t & (t - 1) for t in tiles) or min(tiles[:2]) < 16:
                raise argparse.ArgumentTypeError(
                    f"--variants {key}={value!r} is invalid: allowed values are BMxBNxWARPSxSTAGES, powers of two, "
                    "BM and BN >= 16 (e.g. 64x64x4x3)")  # fmt: skip
            settings[key] = tiles
        elif key in FAR_SETTINGS:
            if not value.isdigit() or int(value) < 1:
                raise argparse.ArgumentTypeError(f"--variants {key}={value!r} is invalid: allowed values are positive integers")
            settings[key] = int(value)
        else:
            raise argparse.ArgumentTypeError(
                f"--variants key {key!r} is unknown: allowed keys are {', '.join([*TILE_KINDS, *FAR_SETTINGS])} "
                f"({VARIANT_FORM})")  # fmt: skip
    return settings


def attention_variants(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``--variants``: ``[(name, settings)]``, the name being the item as given."""
    return [(item.strip(), attention_variant(item)) for item in text.split(";") if item.strip()]


@contextlib.contextmanager
def variant_settings(settings: dict[str, Any]):
    """The Triton pattern attention's launch settings changed to ``settings`` inside the block, restored after."""
    from ratplus_titan.kernels import pattern_attention_triton as pat

    saved_tiles, saved_far = dict(pat.CONFIG_OVERRIDE), {name: getattr(pat, name) for name in FAR_SETTINGS.values()}
    try:
        for key, value in settings.items():
            if key in TILE_KINDS:
                pat.CONFIG_OVERRIDE[key] = value
            else:
                setattr(pat, FAR_SETTINGS[key], value)
        yield
    finally:
        pat.CONFIG_OVERRIDE.clear()
        pat.CONFIG_OVERRIDE.update(saved_tiles)
        for name, value in saved_far.items():
            setattr(pat, name, value)


def bench_attention(results: dict, args: argparse.Namespace) -> None:
    """Forward/backward times (ms) and speedups over dense causal SDPA; bf16, B=1, 16 x 128 heads."""
    import torch._functorch.config as functorch_config

    from ratplus_titan.pattern import Pattern

    functorch_config.donated_buffer = False  # the flex backward is timed with retain_graph=True
    for name in ("recompile_limit", "cache_size_limit"):  # the flex path compiles once per shape
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    table = results.setdefault("attention", {"rows": []})
    table["heads"] = args.heads
    table["sdpa_backends"] = {"flash": torch.backends.cuda.flash_sdp_enabled(), "cudnn": torch.backends.cuda.cudnn_sdp_enabled()}
    rows = table["rows"]
    for method in args.methods.split(","):
        for seq_len in [int(t) for t in args.seq_lens.split(",")]:
            q, k, v = (
                torch.randn(1, args.heads, seq_len, HEAD_DIM, device=args.device).to(torch.bfloat16).requires_grad_(True)
                for _ in range(3)
            )
            rep_ms = 400 if seq_len <= 65536 else 1500
            variants = [(None, {})] + (args.variants if method == "triton" else [])
            for spec in ["dense"] if method.startswith("sdpa") else ATTENTION_PATTERNS:
                for variant, settings in variants:
                    row = {"T": seq_len, "method": method, "pattern": spec, **({"variant": variant} if variant else {})}
                    with variant_settings(settings):
                        time_attention_row(row, method, q, k, v, Pattern.parse(spec), rep_ms, args)
                    rows.append(row)
                    add_speedups(rows)
                    log("attention", row)
            del q, k, v
            if args.device == "cuda":
                torch.cuda.empty_cache()
    table["targets"] = attention_summary(rows)


def time_attention_row(row: dict, method: str, q, k, v, pattern, rep_ms: int, args: argparse.Namespace) -> None:
    """Fill ``row`` with the forward, backward and forward + backward ms (Triton rows: the check against the
    fp32 reference up to ``--check-max-t`` and, on CUDA, each kernel's time); an error is kept in the row."""
    try:
        row["fwd_ms"], row["bwd_ms"], row["fwdbwd_ms"] = time_attention(method, q, k, v, pattern, rep_ms)
        if method == "triton" and row["T"] <= args.check_max_t:
            row["check_vs_fp32_reference"] = check_attention(q, k, v, pattern)
        if method == "triton" and args.device == "cuda":  # where the time goes, kernel by kernel
            fwd = attention_forward(method, q, k, v, pattern)
            both = forward_backward(fwd, q, k, v, torch.randn_like(q))
            try:
                row["fwdbwd_kernels_ms"] = common.kernel_times(both)
            except Exception as err:  # noqa: BLE001 - the profiler's API moves between torch versions
                row["fwdbwd_kernels_ms"] = repr(err)[:200]
    except Exception as err:  # noqa: BLE001 - keep the other rows (e.g. flex OOM at 262K, a tile that fails)
        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"


def plot_attention(results: dict, path: Path) -> None:
    rows = [r for r in results.get("attention", {}).get("rows", []) if "fwd_speedup_vs_dense" in r and not r.get("variant")]
    if not rows:
        return
    fig, axes = common.figure(1, 2, figsize=(11, 4))
    for ax, key, title in [(axes[0], "fwd_speedup_vs_dense", "forward"), (axes[1], "bwd_speedup_vs_dense", "backward")]:
        for method in sorted({r["method"] for r in rows}):
            for pattern in sorted({r["pattern"] for r in rows}):
                pts = sorted((r["T"], r[key]) for r in rows if r["method"] == method and r["pattern"] == pattern)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                            linestyle="-" if method == "triton" else "--", label=f"{method} {pattern}")  # fmt: skip
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.set_ylabel("speedup over dense causal SDPA")
        ax.set_title(f"{title}, bf16, B=1, {results['attention'].get('heads', HEADS)}x{HEAD_DIM} heads")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    env = results["env"]
    fig.suptitle(f"{env['device']}, torch {env['torch']}, {env['date']}")
    common.save_figure(fig, path, dpi=110)


def bench_topk(results: dict, args: argparse.Namespace) -> None:
    """Top-k block attention (kernels/topk_attention_triton.py): check, decode, prefill; see ``bench/topk.py``."""
    from bench.topk import bench_topk as run

    run(results.setdefault("topk", {}), tiny=args.device == "cpu")


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

BENCHES = {
    "scan": (bench_scan, plot_scan),
    "attention": (bench_attention, plot_attention),
    "topk": (bench_topk, lambda results, path: None),  # no plot: bench/topk.py prints a table
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("benches", nargs="*", default=list(BENCHES), help=f"any of {', '.join(BENCHES)} (default: all)")
    parser.add_argument("--out", default=common.out_dir(), help="output folder (default: $OUT or bench/results)")
    parser.add_argument("--seq-lens", default="16384,65536,131072,262144", help="attention: sequence lengths")
    parser.add_argument(
        "--methods", default="sdpa_dense,sdpa_flash,triton",
        help=f"attention: comma list of {', '.join([*SDPA_BACKENDS, 'triton', 'flex'])}",
    )  # fmt: skip
    parser.add_argument("--heads", type=int, default=HEADS, help="attention: heads (of 128 dims)")
    parser.add_argument(
        "--variants", type=attention_variants, default=[],
        help=f"attention: the Triton rows again under other launch settings, side by side: {VARIANT_FORM}; "
        f"keys {', '.join(TILE_KINDS)} (tiles BMxBNxWARPSxSTAGES) and {', '.join(FAR_SETTINGS)} (the far split rule)",
    )  # fmt: skip
    parser.add_argument(
        "--check-max-t", type=int, default=16384,
        help="attention: check the Triton out and grads against the fp32 reference (2 heads) up to this T",
    )  # fmt: skip
    parser.add_argument(
        "--device", default="cuda", choices=("cuda", "cpu"),
        help="cpu: a smoke run of the attention bench (TRITON_INTERPRET=1, small --seq-lens and --heads)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    unknown = [name for name in args.benches if name not in BENCHES]
    if unknown:
        parser.error(f"bench {unknown[0]!r} is unknown: allowed are {', '.join(BENCHES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device (a CPU smoke run: --device cpu attention)")
    if args.device == "cpu" and "scan" in args.benches:
        parser.error("the scan bench needs a CUDA device")
    out, slug = Path(args.out), common.device_slug(args.device)
    results = {"env": common.environment(args.device)}
    results["copy_GBps"] = common.copy_bandwidth() / 1e9 if args.device == "cuda" else None
    env = results["env"]
    log(f"{env['device']}  torch {env['torch']}  triton {env['triton']}  copy {results['copy_GBps'] or 0:.0f} GB/s")
    json_path = out / f"kernels_{slug}.json"
    for name in args.benches:
        bench, plot = BENCHES[name]
        bench(results, args)
        common.write_json(json_path, results)
        common.plot_or_skip(plot, results, out / f"{name}_{slug}.png")
    log(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
