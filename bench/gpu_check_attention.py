"""GPU check and benchmark of the Triton pattern attention (kernels/pattern_attention_triton.py).

One script for one device call (METHOD.md): correctness first, then a tile sweep, then timings.

- ``check``: forward and backward against float64 attention on the GPU at moderate T (every element),
  the full-size forward/dQ on sampled query rows at T=131072, and torch.compile(fullgraph=True).
- ``tune``: tile sweep of the three kernels at T=131072 (bf16, 16 x 128 heads).
- ``time``: forward and backward times of dense causal SDPA, our FlexAttention path (kernels/flex.py)
  and the Triton kernel for T in --seq-lens, bf16, B=1, 16 heads x 128, patterns d16w256s4, d64w256s4.

Writes ``attention_<device>.json`` and ``attention_<device>.png`` into --out (default $OUT or
bench/results). Usage: ``python bench/gpu_check_attention.py --phases check,tune,time``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script
from bench._package import import_without_train_spec  # noqa: E402

import_without_train_spec()

from ratplus_titan.kernels import pattern_attention_triton as pat  # noqa: E402
from ratplus_titan.pattern import Pattern  # noqa: E402

PATTERNS = [Pattern(16, 256, 4), Pattern(64, 256, 4)]
HEADS, HEAD_DIM = 16, 128
_DEADLINE = [float("inf")]  # time.time() after which phases stop starting new work
_SAVE = [lambda: None]


def out_of_time() -> bool:
    return time.time() > _DEADLINE[0]


def log(*args) -> None:
    print(*args, flush=True)


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def worst(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def randn(*shape, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=torch.float32).to(dtype)


# ---------------------------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------------------------
def full_reference(q, k, v, pattern, grad_out):
    """float64 masked softmax attention with autograd: out, lse, (dq, dk, dv)."""
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    scores = (q64 @ k64.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~pattern.dense_mask(q.shape[-2], device=q.device), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.softmax(scores, -1) @ v64
    grads = torch.autograd.grad((out * grad_out.double()).sum(), (q64, k64, v64))
    return out.detach(), lse.detach(), grads


def rows_reference(q, k, v, pattern, grad_out, rows):
    """float64 out, lse and dQ of the query rows ``rows`` only (they need no other query)."""
    scale = q.shape[-1] ** -0.5
    k64, v64 = k.double(), v.double()
    q_sel, do_sel = q[:, :, rows].double(), grad_out[:, :, rows].double()
    seq = torch.arange(q.shape[-2], device=q.device)
    scores = (q_sel @ k64.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~pattern.allows(rows[:, None], seq[None, :]), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    p = torch.exp(scores - lse[..., None])
    out = p @ v64
    ds = p * ((do_sel @ v64.transpose(-1, -2)) - (do_sel * out).sum(-1, keepdim=True))
    return out, lse, scale * (ds @ k64)


def check(results: dict) -> None:
    rows = []
    results["check"] = rows
    cases = [  # (T, pattern, dtype, heads)
        (4096, Pattern(16, 256, 4), torch.bfloat16, HEADS),
        (4096, Pattern(64, 256, 4), torch.bfloat16, HEADS),
        (3001, Pattern(16, 256, 4), torch.bfloat16, 4),  # T not a multiple of tiles or D
        (3001, Pattern(-1, 256, 4), torch.bfloat16, 4),
        (2500, Pattern(7, 100, 300), torch.bfloat16, 4),  # sinks > window, odd D
        (2048, Pattern(4, 0, 0), torch.bfloat16, 4),
        (2048, Pattern(1, 0, 0), torch.bfloat16, 4),  # dense through the kernel (the op itself)
        (3001, Pattern(16, 256, 4), torch.float16, 4),
        (3001, Pattern(16, 256, 4), torch.float32, 4),  # tf32 dots
        (2500, Pattern(-1, 64, 0), torch.float32, 4),
    ]
    for seq_len, pattern, dtype, heads in cases:
        q, k, v = (randn(1, heads, seq_len, HEAD_DIM, dtype=dtype).requires_grad_(True) for _ in range(3))
        out, lse = torch.ops.ratplus.pattern_attention(q, k, v, pattern.dilation, pattern.local_window,
                                                       pattern.sinks, HEAD_DIM ** -0.5)
        grad_out = randn(*out.shape, dtype=dtype)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        ref_out, ref_lse, ref_grads = full_reference(q, k, v, pattern, grad_out)
        row = {"T": seq_len, "pattern": str(pattern), "dtype": str(dtype).split(".")[-1], "heads": heads,
               "finite": bool(all(torch.isfinite(x).all() for x in (out, lse, *grads)))}
        for name, a, e in [("out", out, ref_out), ("lse", lse, ref_lse), *zip(("dq", "dk", "dv"), grads, ref_grads)]:
            row[name] = rel(a, e)
            row[name + "_worst"] = worst(a, e)
        rows.append(row)
        log("check", row)
        del q, k, v, out, lse, grads, ref_out, ref_lse, ref_grads
        torch.cuda.empty_cache()

    # full size: forward and dQ on sampled rows (first, last, around the window and tile edges)
    seq_len = 131072
    for pattern in PATTERNS:
        q, k, v = (randn(1, HEADS, seq_len, HEAD_DIM).requires_grad_(True) for _ in range(3))
        out, lse = torch.ops.ratplus.pattern_attention(q, k, v, pattern.dilation, pattern.local_window,
                                                       pattern.sinks, HEAD_DIM ** -0.5)
        grad_out = randn(*out.shape)
        (dq,) = torch.autograd.grad(out, (q,), grad_out)
        sel = torch.cat([torch.arange(0, 64), torch.arange(255, 300), torch.randint(0, seq_len, (64,)),
                         torch.arange(seq_len - 64, seq_len)]).cuda()
        ref_out, ref_lse, ref_dq = rows_reference(q.detach(), k.detach(), v.detach(), pattern, grad_out, sel)
        row = {"T": seq_len, "pattern": str(pattern), "dtype": "bfloat16", "heads": HEADS, "rows": int(sel.numel()),
               "finite": bool(torch.isfinite(out).all() and torch.isfinite(dq).all()),
               "out": rel(out[:, :, sel], ref_out), "out_worst": worst(out[:, :, sel], ref_out),
               "lse": rel(lse[:, :, sel], ref_lse), "dq": rel(dq[:, :, sel], ref_dq),
               "dq_worst": worst(dq[:, :, sel], ref_dq)}
        rows.append(row)
        log("check full size", row)
        del q, k, v, out, lse, dq, grad_out
        torch.cuda.empty_cache()

    # torch.compile of a block around the op: one graph, same gradients
    q, k, v = (randn(2, 4, 1024, HEAD_DIM).requires_grad_(True) for _ in range(3))
    pattern = Pattern(16, 64, 4)

    def block(q, k, v):
        return pat.pattern_attention_triton(q * 1.5, k, v, pattern).float().square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    expected = torch.autograd.grad(block(q, k, v), (q, k, v))
    results["compile_fullgraph"] = {name: rel(a, e.double()) for name, a, e in zip(("dq", "dk", "dv"), got, expected)}
    log("compile fullgraph", results["compile_fullgraph"])


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def bench_ms(fn, rep_ms: float) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=max(rep_ms / 4, 25), rep=rep_ms, return_mode="median"))


_FLEX_CBM_MASKS: dict = {}


def flex_compiled_masks(q, k, v, pattern: Pattern, scale: float) -> torch.Tensor:
    """kernels/flex.py's two calls + merge, with block masks built by ``create_block_mask(_compile=True)``
    (no T x T mask in memory)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from ratplus_titan.kernels.pattern_attention import compact_rows, merge_by_lse
    from ratplus_titan.kernels.pattern_attention_flex import _flex_attention

    seq_len = q.shape[-2]
    key = (pattern, seq_len)
    if key not in _FLEX_CBM_MASKS:
        def local_mask(b, h, q_idx, kv_idx):
            return pattern.local_allows(q_idx, kv_idx)

        def compact_mask(b, h, q_idx, row):
            return pattern.compact_allows(q_idx, row)

        rows = pattern.num_dilated_rows(seq_len)
        _FLEX_CBM_MASKS[key] = (
            create_block_mask(local_mask, None, None, seq_len, seq_len, device=q.device, _compile=True),
            create_block_mask(compact_mask, None, None, seq_len, rows, device=q.device, _compile=True),
        )
    local, compact = _FLEX_CBM_MASKS[key]
    out, lse = _flex_attention(q, k, v, block_mask=local, scale=scale, return_lse=True)
    c_out, c_lse = _flex_attention(q, compact_rows(k, pattern).contiguous(), compact_rows(v, pattern).contiguous(),
                                   block_mask=compact, scale=scale, return_lse=True)
    return merge_by_lse(out, lse, c_out, c_lse)


def time_method(method: str, q, k, v, pattern: Pattern, rep_ms: float) -> tuple[float, float]:
    """(forward ms, backward ms) of one method; backward = autograd backward alone."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    scale = HEAD_DIM ** -0.5
    sdpa = {"sdpa_dense": None, "sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}
    if method in sdpa:
        backend = sdpa[method]

        def fwd():
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    elif method == "flex":
        from ratplus_titan.kernels.pattern_attention_flex import flex_pattern_attention

        def fwd():
            return flex_pattern_attention(q, k, v, pattern, scale)
    elif method == "flex_cbm":
        def fwd():
            return flex_compiled_masks(q, k, v, pattern, scale)
    elif method == "triton":
        def fwd():
            return pat.pattern_attention_triton(q, k, v, pattern, scale)
    else:
        raise ValueError(method)
    with torch.no_grad():
        fwd_ms = bench_ms(fwd, rep_ms)
    out = fwd()
    grad = torch.randn_like(out)
    bwd_ms = bench_ms(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True), rep_ms)
    return fwd_ms, bwd_ms


def add_speedups(rows: list[dict]) -> None:
    """Speedup of each pattern row over the SDPA rows of the same T (sdpa_dense: SDPA's default choice,
    sdpa_flash: FlashAttention-2 forced)."""
    for row in rows:
        if row["method"].startswith("sdpa") or "fwd_ms" not in row:
            continue
        for base in rows:
            if base["T"] == row["T"] and base["method"].startswith("sdpa") and "fwd_ms" in base:
                suffix = "dense" if base["method"] == "sdpa_dense" else base["method"].removeprefix("sdpa_")
                row[f"fwd_speedup_vs_{suffix}"] = base["fwd_ms"] / row["fwd_ms"]
                row[f"bwd_speedup_vs_{suffix}"] = base["bwd_ms"] / row["bwd_ms"]


def bench_attention(results: dict, seq_lens=(16384, 65536, 131072, 262144),
                    methods=("sdpa_dense", "sdpa_flash", "flex_cbm", "triton"), patterns=PATTERNS) -> dict:
    """Forward/backward times (ms) and speedups over dense causal SDPA; bf16, B=1, 16 x 128 heads.

    Method by method (every T), so that slow compiles (flex) come last and the budget cuts them first."""
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False  # flex backward is timed with retain_graph=True
    for name in ("recompile_limit", "cache_size_limit"):  # the flex path compiles once per shape
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    table = results.setdefault("attention", {"rows": []})
    for method in methods:
        for seq_len in seq_lens:
            if out_of_time():
                table.setdefault("skipped", []).append(f"{method} T={seq_len}")
                continue
            q, k, v = (randn(1, HEADS, seq_len, HEAD_DIM).requires_grad_(True) for _ in range(3))
            rep_ms = 400 if seq_len <= 65536 else 1500
            for pattern in ([None] if method.startswith("sdpa") else patterns):
                row = {"T": seq_len, "method": method, "pattern": str(pattern) if pattern else "dense"}
                try:
                    row["fwd_ms"], row["bwd_ms"] = time_method(method, q, k, v, pattern or Pattern(), rep_ms)
                except Exception as err:  # noqa: BLE001 - keep the other rows (e.g. flex OOM at 262K)
                    row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                    torch.cuda.empty_cache()
                table["rows"].append(row)
                add_speedups(table["rows"])
                log("time", row)
                _SAVE[0]()
            del q, k, v
            torch.cuda.empty_cache()
    return table


def tune(results: dict, kinds=("fwd", "dq", "dkdv")) -> None:
    """Tile sweep of each kernel at T=131072 (the others at their defaults or --config)."""
    seq_len = 131072
    sweeps = {  # candidates without heavy register spills for hd=128 (ptxas resource report, sm_90)
        "fwd": [(64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (64, 32, 4, 2), (64, 128, 4, 2), (128, 64, 8, 3),
                (64, 64, 4, 4), (128, 32, 8, 3)],
        "dq": [(64, 64, 8, 3), (64, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
        "dkdv": [(64, 64, 8, 3), (32, 64, 4, 3), (32, 128, 8, 2), (64, 128, 8, 3)],
    }
    sweeps = {kind: configs for kind, configs in sweeps.items() if kind in kinds}
    rows = []
    results["tune"] = rows
    q, k, v = (randn(1, HEADS, seq_len, HEAD_DIM) for _ in range(3))
    for pattern in PATTERNS:
        args = (pattern.dilation, pattern.local_window, pattern.sinks, HEAD_DIM ** -0.5)
        out, lse = pat._forward(q, k, v, *args)
        grad_out = torch.randn_like(out)
        for kind, configs in sweeps.items():
            for config in configs:
                if out_of_time():
                    break
                saved = dict(pat.CONFIG_OVERRIDE)
                pat.CONFIG_OVERRIDE[kind] = config
                try:
                    if kind == "fwd":
                        ms = bench_ms(lambda: pat._forward(q, k, v, *args), 300)  # noqa: B023
                    else:
                        ms = bench_ms(lambda: pat._backward(grad_out, None, q, k, v, out, lse, *args), 300)  # noqa: B023
                    row = {"pattern": str(pattern), "kind": kind, "config": config, "ms": ms}
                except Exception as err:  # noqa: BLE001 - out of shared memory etc.
                    row = {"pattern": str(pattern), "kind": kind, "config": config, "error": str(err)[:200]}
                pat.CONFIG_OVERRIDE.clear()
                pat.CONFIG_OVERRIDE.update(saved)
                rows.append(row)
                log("tune", row)


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results.get("attention", {}).get("rows", []) if "fwd_speedup_vs_dense" in r]
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in [(axes[0], "fwd_speedup_vs_dense", "forward"), (axes[1], "bwd_speedup_vs_dense", "backward")]:
        for method in ("triton", "flex", "flex_cbm"):
            for pattern in sorted({r["pattern"] for r in rows}):
                pts = sorted((r["T"], r[key]) for r in rows if r["method"] == method and r["pattern"] == pattern)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                            linestyle="-" if method == "triton" else "--", label=f"{method} {pattern}")
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.set_ylabel("speedup over dense causal SDPA")
        ax.set_title(f"{title}, bf16, B=1, 16x128 heads")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    env = results.get("env", results)  # bench/kernels.py keeps these at the top level
    fig.suptitle(f"{env['device']}, torch {env['torch']}, {env['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", default="check,tune,time")
    parser.add_argument("--seq-lens", default="16384,65536,131072,262144")
    parser.add_argument("--methods", default="sdpa_dense,sdpa_flash,flex,flex_cbm,triton")
    parser.add_argument("--tune-kinds", default="fwd,dq,dkdv")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="start no new work after this")
    parser.add_argument("--config", action="append", default=[],
                        help="kind=BM,BN,warps,stages tiles to use, e.g. fwd=128,64,8,3 (repeatable)")
    args = parser.parse_args()
    _DEADLINE[0] = time.time() + args.budget_s
    for item in args.config:
        kind, numbers = item.split("=")
        pat.CONFIG_OVERRIDE[kind] = tuple(int(x) for x in numbers.split(","))
    if not torch.cuda.is_available():
        log("no CUDA device")
        return 1
    import triton

    name = torch.cuda.get_device_name().replace(" ", "_")
    results = {"env": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "date": datetime.date.today().isoformat(),
                       "sdpa_backends": {"flash": torch.backends.cuda.flash_sdp_enabled(),
                                         "cudnn": torch.backends.cuda.cudnn_sdp_enabled()}}}
    log(results["env"])
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, f"attention_{name}.json")
    results["env"]["configs"] = dict(pat.CONFIG_OVERRIDE)

    def save() -> None:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
        try:
            plot(results, os.path.join(args.out, f"attention_{name}.png"))
        except Exception as err:  # noqa: BLE001 - the JSON holds everything
            log(f"no plot: {err}")

    _SAVE[0] = save
    phases = args.phases.split(",")
    status = 0
    for phase in phases:
        start = time.time()
        try:
            if phase == "check":
                check(results)
            elif phase == "tune":
                tune(results, args.tune_kinds.split(","))
            elif phase == "time":
                bench_attention(results, [int(t) for t in args.seq_lens.split(",")], args.methods.split(","))
        except Exception:  # noqa: BLE001 - report and keep what was measured
            traceback.print_exc()
            results.setdefault("errors", []).append(f"{phase}: {traceback.format_exc()[-1500:]}")
            status = 1
        log(f"phase {phase}: {time.time() - start:.0f}s")
        save()
    summary(results)
    return status


def summary(results: dict) -> None:
    for row in results.get("check", []):
        errs = " ".join(f"{k}={row[k]:.1e}" for k in ("out", "lse", "dq", "dk", "dv") if k in row)
        log(f"CHECK T={row['T']} {row['pattern']} {row['dtype']} finite={row['finite']} {errs}")
    best = {}
    for row in results.get("tune", []):
        if "ms" in row:
            key = (row["pattern"], row["kind"])
            if key not in best or row["ms"] < best[key][1]:
                best[key] = (row["config"], row["ms"])
    for key, (config, ms) in sorted(best.items()):
        log(f"TUNE best {key}: {config} {ms:.2f} ms")
    for row in results.get("attention", {}).get("rows", []):
        if "error" in row:
            log(f"TIME T={row['T']} {row['method']} {row['pattern']} ERROR {row['error'][:100]}")
        else:
            sp = "".join(f" vs {name}: fwd {row[f'fwd_speedup_vs_{name}']:.1f}x bwd {row[f'bwd_speedup_vs_{name}']:.1f}x"
                         for name in ("dense", "flash", "cudnn") if f"fwd_speedup_vs_{name}" in row)
            log(f"TIME T={row['T']} {row['method']:10s} {row['pattern']:10s} fwd {row['fwd_ms']:9.3f} ms "
                f"bwd {row['bwd_ms']:9.3f} ms{sp}")


if __name__ == "__main__":
    sys.exit(main())
