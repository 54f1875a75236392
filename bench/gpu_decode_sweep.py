"""``python -m bench.gpu_decode_sweep``: the decode-attention kernel variants, checked then timed (one quick device call).

1. copy bandwidth: a 2 GiB device-to-device copy, bytes read + written per second (``do_bench`` median);
2. checks: every variant against ``decode_attention_reference`` on random bf16 inputs, every element
   (ragged counts, ragged masks, one head per program vs heads merged across programs by the atomic
   counter); a variant that fails is not timed;
3. timings: batch 64, 16 heads x 128, bf16, counts (as the decode cache passes them), for dense 16K,
   d16w256s4 and d64w256s4 at 16K and 64K: ``triton.testing.do_bench`` median (it clears L2 between
   calls; the calls also rotate over several cache sets), as a fraction of the copy bandwidth. For the
   old default (``split``) and the new default (``flat``) also: a CUDA graph of 8 calls (what decoding
   replays), and the old bench's eager per-call timing (CUDA events around one call after a sync, which
   includes the host's launch overhead: bench/results/decode_h100.json "kernel" was measured that way).

Prints a table and writes ``gpu_decode_sweep_<device>.json`` into ``--out`` (default ``$OUT`` or
bench/results). ``--deadline S``: stop starting new work S seconds after the start (default 150).
``--dry-run``: tiny shapes on the CPU under ``TRITON_INTERPRET=1`` (checks the script and the kernels).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch

ROOT = Path(__file__).resolve().parent.parent
T0 = time.time()


def log(*args) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *args, flush=True)


def import_kernels():
    """The kernel modules (without torchtitan on the device machine: through bare packages)."""
    from bench._package import import_without_train_spec

    import_without_train_spec()
    from ratplus_titan.kernels import decode_triton
    from ratplus_titan.kernels.decode import decode_attention_reference
    from ratplus_titan.pattern import Pattern

    return decode_triton, decode_attention_reference, Pattern


def variants(dt) -> dict:
    """Name -> DecodeConfig, in timing priority order (the first two: the old and the new default)."""
    base = dt.DecodeConfig()
    flat = dataclasses.replace(base, kernel="flat")

    def f(block_n, warps, prefetch, per_sm, rows=True, **kw):
        return dataclasses.replace(flat, flat_block_n=block_n, flat_num_warps=warps, flat_prefetch=prefetch,
                                   flat_programs_per_sm=per_sm, flat_row_stats=rows, **kw)

    def tag(c):
        return (f"n{c.flat_block_n}w{c.flat_num_warps}{'pf' if c.flat_prefetch else 'x'}{c.flat_programs_per_sm}"
                f"{'r' if c.flat_row_stats else ''}")

    default_flat = dataclasses.replace(base, kernel="flat")
    # "r": per-row-slot softmax statistics (no barrier in the loop); registers (ptxas, Triton 3.9, no merge):
    # n64w8r 118 -> 2/SM, n32w8r 75 -> 3, n32w4r 122 -> 4 (of 4 warps), n64w4r 202 -> 2, n64w8pfr 128 -> 2,
    # n64w8 64 -> 4, n128w8 100 -> 2. The fit is checked at run time (resident_programs_per_sm).
    out = {
        "split_default": dataclasses.replace(base, kernel="split"),
        f"flat_default({tag(default_flat)})": default_flat,
        "flat_n64w8x2r": f(64, 8, False, 2),
        "flat_n32w8x3r": f(32, 8, False, 3),
        "flat_n32w4x4r": f(32, 4, False, 4),
        "flat_n64w8pf2r": f(64, 8, True, 2),
        "flat_n64w4x2r": f(64, 4, False, 2),
        "flat_n128w8x1r": f(128, 8, False, 1),
        "flat_n64w8x2r_streamk": f(64, 8, False, 2, flat_whole_heads=False),
        "flat_n64w8x4": f(64, 8, False, 4, rows=False),
        "flat_n128w8x2": f(128, 8, False, 2, rows=False),
        "flat_n64w4pf2": f(64, 4, True, 2, rows=False),
        "flat_n32w4x6": f(32, 4, False, 6, rows=False),
        "split_n64w4s3p16": dataclasses.replace(base, kernel="split", block_n=64, num_warps=4, num_stages=3,
                                                programs_per_sm=16, min_rows_per_split=256),
    }
    seen, unique = set(), {}
    for name, config in out.items():  # the default may equal a named variant: keep the first name
        key = tuple(sorted(vars(config).items()))
        if key not in seen:
            seen.add(key)
            unique[name] = config
    return unique


class UseConfig:
    def __init__(self, dt, config):
        self.dt, self.config = dt, config

    def __enter__(self):
        self.saved, self.dt.CONFIG = self.dt.CONFIG, self.config

    def __exit__(self, *exc):
        self.dt.CONFIG = self.saved


def random_inputs(batch, heads, rows, head_dim, device, gen, dtype=torch.bfloat16):
    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    q, k_new, v_new = rand(batch, heads, head_dim), rand(batch, heads, head_dim), rand(batch, heads, head_dim)
    k_cache, v_cache = rand(batch, heads, rows, head_dim), rand(batch, heads, rows, head_dim)
    return q, k_cache, v_cache, k_new, v_new


def check_cases(device, dry: bool):
    """(name, batch, heads, rows, head_dim, valid kind, full?): full cases run for the defaults only."""
    if dry:
        return [("counts ragged", 3, 2, 37, 16, "counts", False), ("mask ragged", 2, 3, 70, 16, "mask", True),
                ("b1 merge", 1, 2, 300, 32, "counts", False), ("empty", 2, 1, 0, 8, "counts", True)]
    return [
        ("b64 h16 516 counts ragged", 64, 16, 516, 128, "counts", False),  # whole heads (the timed layout)
        ("b1 h16 16384 counts", 1, 16, 16384, 128, "counts", False),  # heads over many programs: merge
        ("b64 h16 516 mask ragged", 64, 16, 516, 128, "mask", True),
        ("b8 h16 3000 counts ragged", 8, 16, 3000, 128, "counts", True),
        ("b3 h4 70000 hd64 mask ragged", 3, 4, 70000, 64, "mask", True),
        ("b2 h16 0 rows", 2, 16, 0, 128, "counts", True),
    ]


def run_checks(dt, reference, configs: dict, device, dry: bool, deadline: float) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    results = {}
    cases = []
    for name, batch, heads, rows, head_dim, kind, full_only in check_cases(device, dry):
        q, k_cache, v_cache, k_new, v_new = random_inputs(batch, heads, rows, head_dim, device, gen)
        if kind == "counts":
            valid = torch.randint(0, rows + 1, (batch,), generator=gen, device=device)
            valid[0] = rows
            if batch > 2:
                valid[1] = 0
        else:
            valid = torch.rand(batch, rows, generator=gen, device=device) < 0.8
            valid[0] = False
            if batch > 2:
                valid[2, rows // 3:] = False
        ref = reference(q.float(), k_cache.float(), v_cache.float(), valid, k_new.float(), v_new.float())
        cases.append((name, full_only, (q, k_cache, v_cache, valid, k_new, v_new), ref))
    defaults = list(configs)[:2]
    for vname, config in configs.items():
        errs, ok = {}, True
        for name, full_only, args, ref in cases:
            if full_only and vname not in defaults:
                continue
            if time.time() > deadline:
                errs[name] = "skipped (deadline)"
                ok = False  # unchecked: not timed
                continue
            try:
                with UseConfig(dt, config):
                    out = dt.decode_attention_triton(*args)
                    again = dt.decode_attention_triton(*args)
                diff = (out.float() - ref).abs()
                bad = diff > 2e-2 + 2e-2 * ref.abs()
                errs[name] = {"max_abs_err": diff.max().item() if diff.numel() else 0.0, "bad_elements": int(bad.sum()),
                              "finite": bool(out.isfinite().all()), "deterministic": bool(torch.equal(out, again))}
                ok &= errs[name]["bad_elements"] == 0 and errs[name]["finite"] and errs[name]["deterministic"]
            except Exception as err:  # e.g. out of resources: report, do not time
                traceback.print_exc()
                errs[name] = {"error": repr(err)}
                ok = False
        results[vname] = {"ok": ok, "cases": errs}
        log(f"check {vname:28s} {'ok' if ok else 'FAILED'} "
            + " ".join(f"{v['max_abs_err']:.1e}" if isinstance(v, dict) and "max_abs_err" in v else "?" for v in errs.values()))
    return results


def kernel_info(dt, config, batch, heads, rows, head_dim, device) -> dict:
    """Registers, programs per SM that fit, and the plan of a flat config (CUDA only)."""
    if config.kernel != "flat":
        return {"splits": dt.split_plan(batch, heads, rows, device, config)[0]}
    plan = dt.flat_plan(batch, heads, rows, device, config)
    info = {"plan": dataclasses.asdict(plan)}
    if device.type == "cuda":
        q = torch.empty(batch, heads, head_dim, dtype=torch.bfloat16, device=device)
        cache = torch.empty(batch, heads, max(rows, 1), head_dim, dtype=torch.bfloat16, device=device)
        valid = torch.full((batch,), rows, dtype=torch.long, device=device)
        try:
            info["resident_per_sm"] = dt.resident_programs_per_sm(q, cache, cache, valid, q, q, config, plan)
            kernel = dt._flat_launch(q, cache, cache, valid, q, q, 1.0, config, plan, warmup=True)
            kernel._init_handles()
            info["n_regs"], info["n_spills"] = int(kernel.n_regs), int(kernel.n_spills)
        except Exception as err:
            info["error"] = repr(err)
    return info


def bench_ms(fn, device, dry: bool) -> float:
    if dry:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def eager_ms(fn, iters: int = 20) -> float:
    """bench/decode.py's old timing: events around one call after a sync (includes host launch overhead)."""
    from bench.decode import cuda_time_ms

    return cuda_time_ms(fn, iters=iters, warmup=1)


def graph_ms(dt, config, sets, valid, calls: int = 8) -> float:
    """Milliseconds per call inside a CUDA graph of ``calls`` calls over the rotating cache sets."""
    with UseConfig(dt, config):
        for s in sets:
            dt.decode_attention_triton(s[0], s[1], s[2], valid, s[3], s[4])  # compile, fit
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                s = sets[i % len(sets)]
                dt.decode_attention_triton(s[0], s[1], s[2], valid, s[3], s[4])
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 5
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (reps * calls)


def copy_bandwidth(device, dry: bool) -> float:
    n = 1024**3 if not dry else 1 << 16  # 2 GiB of bf16 (dry: 128 KiB)
    src = torch.randn(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device, dry)
    return 2 * n * 2 / (ms / 1e3)


def rotating_call(dt, sets, valid):
    """A call of the kernel on the next cache set at each invocation."""
    counter = [0]

    def call():
        s = sets[counter[0] % len(sets)]
        counter[0] += 1
        return dt.decode_attention_triton(s[0], s[1], s[2], valid, s[3], s[4])

    return call


def run_timings(dt, Pattern, configs: dict, ok: dict, device, dry: bool, copy_bw: float, deadline: float) -> list:
    batch, heads, head_dim = (64, 16, 128) if not dry else (2, 2, 32)
    cases = [(16384, "dense"), (16384, "d16w256s4"), (16384, "d64w256s4"), (65536, "d16w256s4"), (65536, "d64w256s4"),
             (65536, "dense")]  # last: 34 GB of cache, one set
    if dry:
        cases = [(256, "dense"), (1024, "d16w256s4"), (1024, "d64w256s4")]
    names = [n for n in configs if ok.get(n, False)]
    defaults = [n for n in list(configs)[:2] if n in names]
    results = []
    for ci, (ctx, pattern) in enumerate(cases):
        rows = Pattern.parse(pattern).cache_rows(ctx)
        set_bytes = 2 * batch * heads * rows * head_dim * 2
        n_sets = 1 if dry or set_bytes > 4e9 else max(2, min(4, math.ceil(1e9 / set_bytes)))
        gen = torch.Generator(device=device).manual_seed(ci)
        sets = [random_inputs(batch, heads, rows, head_dim, device, gen) for _ in range(n_sets)]
        valid = torch.full((batch,), rows, dtype=torch.long, device=device)
        case_deadline = time.time() + (deadline - time.time()) / (len(cases) - ci)
        for vname in names:
            if time.time() > case_deadline and vname not in defaults:
                log(f"time {ctx:6d} {pattern:10s} {vname}: skipped (deadline)")
                continue
            if time.time() > deadline:
                break
            config = configs[vname]
            call = rotating_call(dt, sets, valid)

            entry = {"context": ctx, "pattern": pattern, "rows": rows, "batch": batch, "variant": vname,
                     "bytes_read": set_bytes, "cache_sets": n_sets}
            try:
                with UseConfig(dt, config):
                    call()  # compile
                    entry["ms"] = bench_ms(call, device, dry)
                    if vname in defaults and not dry:
                        entry["eager_ms"] = eager_ms(call)
                if vname in defaults and not dry:
                    entry["graph_ms"] = graph_ms(dt, config, sets, valid)
                entry["fraction_of_copy_bw"] = set_bytes / (entry["ms"] / 1e3) / copy_bw
                entry.update(kernel_info(dt, config, batch, heads, rows, head_dim, device))
            except Exception as err:
                traceback.print_exc()
                entry["error"] = repr(err)
            results.append(entry)
            extra = "".join(f" {k} {entry[k]:.3f}" for k in ("graph_ms", "eager_ms") if k in entry)
            log(f"time {ctx:6d} {pattern:10s} rows {rows:6d} {vname:28s} "
                + (f"{entry['ms']:.3f} ms = {entry['fraction_of_copy_bw']:.0%} of copy{extra}" if "ms" in entry
                   else entry.get("error", "?")))
        sets = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def table(results: list, configs: dict) -> str:
    cases = []
    for r in results:
        key = (r["context"], r["pattern"])
        if key not in cases:
            cases.append(key)
    by = {(r["context"], r["pattern"], r["variant"]): r for r in results if "ms" in r}
    names = [n for n in configs if any(k[2] == n for k in by)]
    width = max([len(n) for n in names] + [10])
    head = f"{'variant':{width}s} " + " ".join(f"{f'{c // 1024}K {p}':>16s}" for c, p in cases) + "  geomean"
    lines = ["fraction of copy bandwidth (do_bench median, ms in brackets)", head]
    geo = {}
    for n in names:
        cells, fracs = [], []
        for c, p in cases:
            r = by.get((c, p, n))
            cells.append(f"{r['fraction_of_copy_bw']:5.0%} ({r['ms']:6.3f})" if r else f"{'-':>16s}")
            if r:
                fracs.append(r["fraction_of_copy_bw"])
        geo[n] = math.exp(sum(math.log(max(f, 1e-9)) for f in fracs) / len(fracs)) if len(fracs) == len(cases) else None
        lines.append(f"{n:{width}s} " + " ".join(f"{x:>16s}" for x in cells)
                     + (f"  {geo[n]:6.1%}" if geo[n] is not None else "  (incomplete)"))
    for n in names:
        extra = [f"{c // 1024}K {p}: graph {by[(c, p, n)]['graph_ms']:.3f} ms, eager {by[(c, p, n)]['eager_ms']:.3f} ms"
                 for c, p in cases if (c, p, n) in by and "graph_ms" in by[(c, p, n)]]
        if extra:
            lines.append(f"{n}: " + "; ".join(extra))
    complete = {n: g for n, g in geo.items() if g is not None}
    if complete:
        best = max(complete, key=complete.get)
        lines.append(f"best geomean: {best} {complete[best]:.1%}; config: {vars(configs[best])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench/results", help="output folder")
    parser.add_argument("--deadline", type=float, default=150.0, help="seconds after the start to stop starting work")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    parser.add_argument("--variants", default=None, help="comma-separated subset of the variant names")
    args = parser.parse_args(argv)
    deadline = T0 + args.deadline - (3.0 if args.dry_run else 8.0)  # leave time for the table and the JSON
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    if not dry and not torch.cuda.is_available():
        log("no CUDA device: use --dry-run")
        return 2
    dt, reference, Pattern = import_kernels()
    import triton

    configs = variants(dt)
    if args.variants:
        keep = args.variants.split(",")
        configs = {n: c for n, c in configs.items() if n in keep or n in list(configs)[:2]}
    slug = "cpu" if dry else torch.cuda.get_device_name().lower().replace(" ", "_")
    for s in ("h200", "h100", "a100"):
        slug = s if s in slug else slug
    result: dict = {"env": {"device": "cpu (interpreter)" if dry else torch.cuda.get_device_name(), "torch": torch.__version__,
                            "triton": triton.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                timespec="seconds"),
                            "sms": torch.cuda.get_device_properties(0).multi_processor_count if not dry else 0},
                    "variants": {n: vars(c) for n, c in configs.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_decode_sweep_{slug}.json"

    def save():
        path.write_text(json.dumps(result, indent=1) + "\n")

    result["copy_bytes_per_s"] = copy_bw = copy_bandwidth(device, dry)
    log(f"copy bandwidth {copy_bw / 1e12:.3f} TB/s (read + write)")
    result["checks"] = run_checks(dt, reference, configs, device, dry, T0 + 0.45 * args.deadline)
    save()
    ok = {n: r["ok"] for n, r in result["checks"].items()}
    result["timings"] = run_timings(dt, Pattern, configs, ok, device, dry, copy_bw, deadline)
    result["table"] = table(result["timings"], configs)
    save()
    print(result["table"], flush=True)
    log(f"wrote {path}")
    return 0 if all(ok.get(n, False) for n in list(configs)[:2]) else 1


if __name__ == "__main__":
    sys.exit(main())
