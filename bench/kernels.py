"""Kernel benchmarks on one GPU: one ``bench_<kernel>(results)`` function per kernel.

Each bench times with ``do_bench`` (``triton.testing.do_bench`` medians), counts the bytes
the op must move (each input read once, each output written once) and reports GB/s as a
fraction of the measured device-to-device copy bandwidth (bytes read + written).

``main`` runs the benches named on the command line (default: every ``bench_*`` here) and
writes ``kernels_<device>.json`` plus one PNG per kernel into ``--out`` (default ``$OUT`` when
set, else ``bench/results``). Usage: ``python -m bench.kernels [scan ...] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from bench._package import import_without_train_spec  # noqa: E402

import_without_train_spec()


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------


def log(*args) -> None:
    print(*args, flush=True)


def device_slug() -> str:
    name = torch.cuda.get_device_name()
    for key in ("H100", "H200", "A100", "B200"):
        if key in name:
            return key
    return name.replace(" ", "_")


def do_bench(fn, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of ``fn()`` (CUDA events, L2 flushed between runs)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def copy_bandwidth(gib: float = 2.0) -> float:
    """Device-to-device copy, GB/s counting bytes read plus bytes written."""
    src = torch.randn(int(gib * 2**30) // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


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
    return fwd_ms, bwd_ms


def bench_scan(results: dict, shapes=SCAN_SHAPES, baseline: bool = True) -> None:
    """Forward and backward of the Triton scan at ``shapes`` (bf16), against compiled associative_scan."""
    from ratplus_titan.kernels import recurrence_triton as rt

    copy_bw = results["copy_GBps"]
    rows = results.setdefault("scan", [])
    fwd_base = torch.compile(assoc_scan_forward, fullgraph=True, dynamic=False)
    bwd_base = torch.compile(assoc_scan_backward, fullgraph=True, dynamic=False)
    for shape in shapes:
        row = {"shape_BTHhd": list(shape), "dtype": "bfloat16"}
        rows.append(row)
        try:
            fused, gates, keys, values, grad_k, grad_v = scan_inputs(*shape)
            fwd_bytes, bwd_bytes = scan_bytes(*shape)
            fwd_cfg, bwd_cfg = rt.default_configs(shape, keys.dtype)
            fwd_ms, bwd_ms = _time_scan_ops(rt, gates, keys, values, grad_k, grad_v, fwd_cfg, bwd_cfg)
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
            if not baseline:
                continue
            ours = rt.recurrence_triton(gates, keys, values)
            states = rt._scan_fwd(gates, keys, values, *fwd_cfg)[2]
            ours_bwd = rt._scan_bwd(gates, keys, values, states, grad_k, grad_v, *bwd_cfg)
            for name, fn, args, our_out, key in (
                ("fwd", fwd_base, (gates, keys, values), ours, "fwd_ms"),
                ("bwd", bwd_base, (gates, keys, values, grad_k, grad_v), ours_bwd, "bwd_ms"),
            ):
                try:
                    start = time.time()
                    base_out = fn(*args)
                    torch.cuda.synchronize()
                    row[f"assoc_{name}_compile_s"] = time.time() - start
                    row[f"assoc_{name}_rel_err_vs_ours"] = max(rel_err(o, b) for o, b in zip(our_out, base_out))
                    del base_out
                    base_ms = do_bench(lambda fn=fn, args=args: fn(*args))
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results.get("scan", []) if "fwd_GBps" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels, width = [], 0.35
    for i, row in enumerate(rows):
        labels.append("B={} T={} H={} hd={}".format(*row["shape_BTHhd"]))
        for j, name in enumerate(("fwd", "bwd")):
            ours = row[f"{name}_GBps"]
            x = i + (j - 0.5) * width
            ax.bar(
                x, ours, width * 0.9, color=("tab:blue", "tab:orange")[j], label=f"Triton {name}" if i == 0 else None
            )
            ax.text(x, ours, f"{100 * ours / results['copy_GBps']:.0f}%", ha="center", va="bottom", fontsize=8)
            if f"assoc_{name}_ms" in row:
                base = row[f"{name}_bytes"] / row[f"assoc_{name}_ms"] / 1e6
                ax.bar(
                    x,
                    base,
                    width * 0.45,
                    color="gray",
                    label="associative_scan (compiled)" if i == 0 and j == 0 else None,
                )
    ax.axhline(results["copy_GBps"], color="k", linestyle="--", linewidth=1, label="D2D copy")
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("GB/s (fewest bytes / time)")
    ax.set_title(f"Gated recurrence scan, bf16, {results['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# pattern attention (kernels/pattern_attention_triton.py); the full check + sweep is bench/gpu_check_attention.py
# ----------------------------------------------------------------------------------------------


def bench_attention(results: dict, seq_lens=(16384, 65536, 131072, 262144)) -> None:
    """Forward/backward ms of the Triton pattern attention (d16w256s4, d64w256s4), bf16, B=1, 16 x 128 heads,
    against dense causal SDPA (default backend and FlashAttention-2) and the FlexAttention path."""
    from bench.gpu_check_attention import bench_attention as run

    run(results, seq_lens, methods=("sdpa_dense", "sdpa_flash", "flex_cbm", "triton"))


def plot_attention(results: dict, path: Path) -> None:
    from bench.gpu_check_attention import plot

    plot(results, str(path))


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

BENCHES = {"scan": (bench_scan, plot_scan), "attention": (bench_attention, plot_attention)}


def environment() -> dict:
    import triton

    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benches", nargs="*", default=list(BENCHES), help=f"any of {list(BENCHES)}")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = environment()
    results["copy_GBps"] = copy_bandwidth()
    log(
        f"{results['device']}  torch {results['torch']}  triton {results['triton']}  copy {results['copy_GBps']:.0f} GB/s"
    )
    json_path = out / f"kernels_{device_slug()}.json"
    for name in args.benches:
        bench, plot = BENCHES[name]
        bench(results)
        json_path.write_text(json.dumps(results, indent=1))
        try:
            plot(results, out / f"{name}_{device_slug()}.png")
        except ImportError as error:  # no matplotlib: the JSON holds everything
            log(f"no plot for {name}: {error}")
    log(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
