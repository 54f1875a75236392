"""GPU check and tile sweep of the Triton recurrence scan (kernels/recurrence_triton.py), one device call.

Phases (``--phases``, comma separated, in this order):

- ``check``: [4, 16384, 16, 128] bf16 forward and backward against the reference (fp32 loop) on the
  GPU, every element; [1, 262144, 16, 128] against a float64 CPU loop on sampled channels (every
  time step), two tilings against each other, two runs against each other; fp32 inputs; the
  decode step; ``torch.compile(fullgraph=True)`` (inductor) of a block, and activation checkpointing.
- ``sweep``: forward and backward times for several (chunk, block_c, warps, programs per SM) at both shapes.
- ``choose``: make the fastest complete (forward, backward) pair with one chunk the bf16 default.
- ``bench``: ``bench.kernels.bench_scan`` (defaults, against compiled associative_scan).

Writes ``scan_check_<device>.json`` (and the bench's JSON/PNG) into ``$OUT`` or bench/results.
A watchdog ends the process (after saving) when ``--deadline`` seconds have passed.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import kernels as kb  # noqa: E402
from ratplus_titan.kernels import recurrence_triton as rt  # noqa: E402
from ratplus_titan.kernels.recurrence import recurrence_reference, recurrence_step_reference  # noqa: E402

log = kb.log
RESULTS: dict = {}
SAVE_PATH = [None]


def save() -> None:
    if SAVE_PATH[0] is not None:
        SAVE_PATH[0].write_text(json.dumps(RESULTS, indent=1, default=str))


def watchdog(seconds: float) -> None:
    def fire():
        log(f"WATCHDOG: {seconds:.0f} s passed, saving and exiting")
        faulthandler.dump_traceback()
        RESULTS["watchdog"] = True
        save()
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def worst(actual, expected) -> float:
    """max |a - e| / max |e|."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def compare(name, actual, expected, bound_rel, bound_worst) -> dict:
    entry = {
        "rel_l2": kb.rel_err(actual, expected),
        "max_err_over_max": worst(actual, expected),
        "finite": bool(torch.isfinite(actual).all()),
    }
    entry["ok"] = entry["finite"] and entry["rel_l2"] < bound_rel and entry["max_err_over_max"] < bound_worst
    log(
        f"  {name:28s} rel {entry['rel_l2']:.2e}  worst {entry['max_err_over_max']:.2e}  {'ok' if entry['ok'] else 'FAIL'}"
    )
    return entry


def grads_of(fn, fused, gates, keys, values, grad_k, grad_v):
    key_states, value_states = fn(gates, keys, values)
    (grad,) = torch.autograd.grad(
        (key_states.float() * grad_k.float()).sum() + (value_states.float() * grad_v.float()).sum(), fused
    )
    return key_states.detach(), value_states.detach(), grad[:, :, :, 4], grad[:, :, :, 2], grad[:, :, :, 3]


NAMES = ("K", "V", "d gate", "d key", "d value")


def loop64_channels(f, k, x, gk, gv):
    """float64 forward and backward on [T, n] numpy arrays (the DESIGN recurrence, step by step)."""
    a = 1 / (1 + np.exp(-f))
    T = f.shape[0]
    K = np.empty_like(k)
    V = np.empty_like(x)
    ks = np.zeros(f.shape[1])
    vs = np.zeros(f.shape[1])
    for t in range(T):
        ks = a[t] * ks + (1 - a[t]) * k[t]
        vs = a[t] * vs + (1 - a[t]) * x[t]
        K[t], V[t] = ks, vs
    df, dk, dx = np.empty_like(f), np.empty_like(k), np.empty_like(x)
    gks = np.zeros(f.shape[1])
    gvs = np.zeros(f.shape[1])
    zero = np.zeros(f.shape[1])
    for t in range(T - 1, -1, -1):
        gks = gks + gk[t]
        gvs = gvs + gv[t]
        pk = K[t - 1] if t else zero
        pv = V[t - 1] if t else zero
        dk[t] = gks * (1 - a[t])
        dx[t] = gvs * (1 - a[t])
        df[t] = (gks * (pk - k[t]) + gvs * (pv - x[t])) * a[t] * (1 - a[t])
        gks = gks * a[t]
        gvs = gvs * a[t]
    return K, V, df, dk, dx


def check() -> None:
    res = RESULTS.setdefault("check", {})
    # 1. full size vs the reference
    shape = (4, 16384, 16, 128)
    log(f"check {shape} bf16 vs reference (fp32 loop)")
    fused, gates, keys, values, grad_k, grad_v = kb.scan_inputs(*shape, seed=1)
    fused.requires_grad_(True)
    _, _, keys, values, gates = fused.unbind(3)
    got = grads_of(rt.recurrence_triton, fused, gates, keys, values, grad_k, grad_v)
    torch.cuda.synchronize()
    start = time.time()
    ref = grads_of(recurrence_reference, fused, gates, keys, values, grad_k, grad_v)
    torch.cuda.synchronize()
    log(f"  (reference took {time.time() - start:.1f} s)")
    res["full_vs_reference"] = {n: compare(n, g, r, 8e-3, 3e-2) for n, g, r in zip(NAMES, got, ref)}
    del ref, got, fused, gates, keys, values, grad_k, grad_v
    save()

    # 2. fp32 inputs, smaller, vs reference; gates near 0 and 1
    for center in (-6.0, 6.0):
        shape32 = (2, 3000, 4, 96)
        log(f"check {shape32} fp32, gate logits centred at {center}")
        fused = torch.randn(shape32[0], shape32[1], shape32[2], 5, shape32[3], device="cuda")
        fused[:, :, :, 4] += center
        fused.requires_grad_(True)
        _, _, keys, values, gates = fused.unbind(3)
        grad_k, grad_v = torch.randn_like(keys), torch.randn_like(values)
        got = grads_of(rt.recurrence_triton, fused, gates, keys, values, grad_k, grad_v)
        ref = grads_of(recurrence_reference, fused, gates, keys, values, grad_k, grad_v)
        res[f"fp32_center{center:+.0f}"] = {n: compare(n, g, r, 1e-5, 1e-4) for n, g, r in zip(NAMES, got, ref)}
    save()

    # 3. long T: sampled channels vs float64, every step; two tilings; two runs
    shape = (1, 262144, 16, 128)
    log(f"check {shape} bf16: sampled channels vs float64 CPU loop")
    fused, gates, keys, values, grad_k, grad_v = kb.scan_inputs(*shape, seed=2)
    fwd_cfg, bwd_cfg = rt.default_configs(shape, torch.bfloat16)
    out = rt._scan_fwd(gates, keys, values, *fwd_cfg)
    grads = rt._scan_bwd(gates, keys, values, out[2], grad_k, grad_v, *bwd_cfg)
    torch.cuda.synchronize()
    heads = [0, 5, 15]
    dims = [0, 63, 64, 127]
    cpu = lambda t: t[0][:, heads][:, :, dims].reshape(shape[1], -1).double().cpu().numpy()  # noqa: E731
    start = time.time()
    exact = loop64_channels(cpu(gates), cpu(keys), cpu(values), cpu(grad_k), cpu(grad_v))
    log(f"  (float64 loop took {time.time() - start:.1f} s)")
    mine = [cpu(t) for t in (out[0], out[1], *grads)]
    res["longT_vs_float64"] = {
        n: compare(n, torch.from_numpy(m), torch.from_numpy(e), 8e-3, 3e-2) for n, m, e in zip(NAMES, mine, exact)
    }
    alt = rt._scan_fwd(gates, keys, values, 64, 32, 4, 2)  # persistent, other tiles
    alt_grads = rt._scan_bwd(gates, keys, values, alt[2], grad_k, grad_v, 64, 32, 4, 2)
    res["longT_other_tiling"] = {
        n: compare(n, a, b, 4e-3, 2e-2)
        for n, a, b in zip(NAMES, (alt[0], alt[1], *alt_grads), (out[0], out[1], *grads))
    }
    again = rt._scan_fwd(gates, keys, values, *fwd_cfg)
    res["longT_states_rerun_max_abs"] = (again[2] - out[2]).abs().max().item()
    log(f"  chunk states, two runs: max abs diff {res['longT_states_rerun_max_abs']:.2e}")
    del fused, gates, keys, values, grad_k, grad_v, out, grads, alt, alt_grads, again
    torch.cuda.empty_cache()
    save()

    # 4. decode step
    fused = torch.randn(8, 16, 5, 128, device="cuda", dtype=torch.bfloat16)
    _, _, k, x, f = fused.unbind(2)
    ks, vs = torch.randn(2, 8, 16, 128, device="cuda")
    got = rt.recurrence_step_triton(f, k, x, ks, vs)
    exp = recurrence_step_reference(f, k, x, ks, vs)
    res["step"] = {n: compare(n, g, e, 1e-6, 1e-6) for n, g, e in zip(("K", "V"), got, exp)}

    # 5. torch.compile (inductor, fullgraph) of a block, and activation checkpointing
    log("check torch.compile(fullgraph=True) and checkpointing")
    batch, seq_len, heads, head_dim = 2, 4096, 16, 128
    weight = torch.randn(5 * heads * head_dim, heads * head_dim, device="cuda", dtype=torch.bfloat16) * 0.02
    u = torch.randn(batch, seq_len, heads * head_dim, device="cuda", dtype=torch.bfloat16)

    def block(weight, u):
        fused = torch.nn.functional.linear(u, weight)
        _, _, k, x, f = fused.view(batch, seq_len, heads, 5, head_dim).unbind(3)
        key_states, value_states = rt.recurrence_triton(f, k, x)
        return (key_states.float() * value_states.float().sin()).sum()

    def grads(fn):
        w = weight.clone().requires_grad_(True)
        loss = fn(w, u)
        return loss.detach(), torch.autograd.grad(loss, w)[0]

    eager = grads(block)
    start = time.time()
    compiled = grads(torch.compile(block, fullgraph=True))
    res["compile_s"] = time.time() - start
    ckpt = grads(lambda w, u: torch.utils.checkpoint.checkpoint(block, w, u, use_reentrant=False))
    res["compiled_vs_eager"] = compare("compiled d weight", compiled[1], eager[1], 2e-2, 5e-2)
    res["checkpoint_vs_eager"] = compare("checkpointed d weight", ckpt[1], eager[1], 1e-3, 1e-2)
    save()


SWEEP = {  # (chunk, block_c, warps, programs per SM: 0 = one per tile, else persistent with prefetch)
    "fwd": [(32, 64, 2, 0), (32, 64, 1, 0), (16, 64, 2, 0), (16, 64, 1, 0), (16, 128, 2, 0), (16, 128, 1, 0),
            (16, 32, 1, 0)],
    "bwd": [(32, 32, 2, 0), (16, 64, 2, 0), (16, 32, 2, 0), (16, 32, 1, 0), (16, 64, 1, 0)],
}  # fmt: skip


def choose() -> None:
    """Set the bf16 defaults to the sweep's fastest (forward + backward, both shapes, same chunk)."""
    best = {}
    for kind in ("fwd", "bwd"):
        for cfg in SWEEP[kind]:
            entries = [e for e in RESULTS.get("sweep", []) if e["kind"] == kind and tuple(e["config"]) == cfg]
            if len(entries) == len(kb.SCAN_SHAPES) and all("ms" in e and e["rel_err"] < 1e-3 for e in entries):
                total = sum(e["ms"] for e in entries)
                key = (kind, cfg[0])
                if key not in best or total < best[key][0]:
                    best[key] = (total, cfg)
    chunks = [c for (kind, c) in best if kind == "fwd" and ("bwd", c) in best]
    if not chunks:
        log("choose: nothing complete, defaults kept")
        return
    chunk = min(chunks, key=lambda c: best[("fwd", c)][0] + best[("bwd", c)][0])
    fwd, bwd = best[("fwd", chunk)][1], best[("bwd", chunk)][1]
    for dtype in (torch.bfloat16, torch.float16):
        rt._FWD_CONFIG[dtype] = fwd
        rt._BWD_CONFIG[dtype] = bwd[1:]
    RESULTS["chosen"] = {"fwd (chunk, block_c, warps, per_sm)": fwd, "bwd": bwd}
    log(f"choose: fwd {fwd}, bwd {bwd}")


def sweep(deadline: float) -> None:
    for shape in kb.SCAN_SHAPES:
        if not sweep_shape(shape, deadline):
            log("sweep: out of time")
            return
        torch.cuda.empty_cache()


def sweep_shape(shape, deadline: float) -> bool:
    res = RESULTS.setdefault("sweep", [])
    copy_bw = RESULTS["copy_GBps"]
    fused, gates, keys, values, grad_k, grad_v = kb.scan_inputs(*shape, seed=3)
    fwd_bytes, bwd_bytes = kb.scan_bytes(*shape)
    ref = rt._scan_fwd(gates, keys, values, 64, 32, 4, 0)
    ref_grads = rt._scan_bwd(gates, keys, values, ref[2], grad_k, grad_v, 64, 32, 4, 0)

    def fwd(chunk, block_c, warps, per_sm):
        return rt._scan_fwd(gates, keys, values, chunk, block_c, warps, per_sm)

    def bwd(states, chunk, block_c, warps, per_sm):
        return rt._scan_bwd(gates, keys, values, states, grad_k, grad_v, chunk, block_c, warps, per_sm)

    for kind in ("fwd", "bwd"):
        for cfg in SWEEP[kind]:
            if time.time() > deadline:
                return False
            entry = {"shape": list(shape), "kind": kind, "config": cfg}
            try:
                if kind == "fwd":
                    out = fwd(*cfg)
                    entry["rel_err"] = max(kb.rel_err(a, b) for a, b in zip(out[:2], ref[:2]))
                    ms = kb.do_bench(lambda cfg=cfg: fwd(*cfg))
                    nbytes = fwd_bytes
                else:
                    states = fwd(cfg[0], 64, 4, 0)[2]
                    out = bwd(states, *cfg)
                    entry["rel_err"] = max(kb.rel_err(a, b) for a, b in zip(out, ref_grads))
                    ms = kb.do_bench(lambda s=states, cfg=cfg: bwd(s, *cfg))
                    nbytes = bwd_bytes
                entry.update(ms=ms, GBps=kb.gbps(nbytes, ms), pct_copy=100 * kb.gbps(nbytes, ms) / copy_bw)
                log(f"  {kind} {shape} (chunk, block_c, warps, per_sm) {cfg}: {ms:.3f} ms "
                    f"{entry['GBps']:6.0f} GB/s {entry['pct_copy']:5.1f}%  rel err {entry['rel_err']:.1e}")  # fmt: skip
            except Exception as error:
                entry["error"] = repr(error)[:300]
                log(f"  {kind} {cfg} failed: {error!r}"[:300])
            res.append(entry)
            save()
    return True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phases", default="check,sweep,choose,bench")
    parser.add_argument("--deadline", type=float, default=330.0, help="seconds before the watchdog exits")
    parser.add_argument("--sweep-until", type=float, default=240.0, help="seconds after which the sweep stops")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    start = time.time()
    watchdog(args.deadline)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    SAVE_PATH[0] = out / f"scan_check_{kb.device_slug()}.json"
    RESULTS.update(kb.environment())
    RESULTS["copy_GBps"] = kb.copy_bandwidth()
    log(f"{RESULTS['device']} torch {RESULTS['torch']} triton {RESULTS['triton']} copy {RESULTS['copy_GBps']:.0f} GB/s")
    phases = args.phases.split(",")
    for phase in phases:
        log(f"=== {phase} ({time.time() - start:.0f} s)")
        try:
            if phase == "check":
                check()
            elif phase == "sweep":
                sweep(start + args.sweep_until)
            elif phase == "choose":
                choose()
            elif phase == "bench":
                kb.main(["scan", "--out", str(out)])
        except Exception:
            RESULTS.setdefault("errors", []).append(traceback.format_exc()[-2000:])
            log(traceback.format_exc())
        save()
    log(f"done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
