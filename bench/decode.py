"""``python -m bench.decode``: decode speed of RAT+ sparse patterns against dense attention (DESIGN §4).

One script for one device call (correctness first, then timings):

1. ``check``: the Triton decode kernels (``KERNELS``: the default flat kernel and the previous split
   one) against the PyTorch reference on the GPU (bf16, ragged masks and counts), the cache update,
   and a tiny model's prefill + decode (eager and CUDA-graph replay) against its full-sequence forward (fp32).
2. ``kernel``: the decode-attention kernels at batch 64, 16 heads x 128, bf16, contexts 16K and 64K,
   for the dense row layout and the D=16 / D=64 layouts, valid rows as counts (what the decode cache
   passes): ms per call inside a CUDA graph of 8 calls over 2-4 cache sets larger than L2 (as decoding
   replays it) and ``do_bench`` (L2 flushed before each call), cache bytes read against the copy bandwidth.
3. ``throughput``: a 1B-shape model (dim 2048, 24 layers, 16 heads, vocab 32000, random bf16
   weights), decode steps captured in a CUDA graph, contexts 4K and 16K, for dense,
   d16w256s4 and d64w256s4, each at the largest batch (<= 256) whose cache fits; the cache is
   filled with random rows as if a prompt of the context's length had been prefilled.
4. ``latency``: the same model, batch 1, context 1K: milliseconds per token.

Writes ``decode_<device>.json`` (and ``.png`` when matplotlib is there) into ``--out``
(default ``$OUT`` or ``bench/results``). ``--plot FILE.json`` only draws the PNG of a JSON file.
``--device cpu --phases kernel`` with small ``--kernel-contexts`` is a smoke run (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import time
import traceback
from pathlib import Path

import torch

from bench import common
from bench.common import log

PATTERNS = ("dense", "d16w256s4", "d64w256s4")


def kernel_configs() -> dict:
    """The decode kernels timed side by side: the default flat kernel and the previous split + merge path."""
    from ratplus_titan.kernels import decode_triton

    return {"split": dataclasses.replace(decode_triton.DecodeConfig(), kernel="split"),
            "flat": dataclasses.replace(decode_triton.DecodeConfig(), kernel="flat")}  # fmt: skip


@contextlib.contextmanager
def use_config(config):
    """``decode_triton.CONFIG`` set to ``config`` inside the block."""
    from ratplus_titan.kernels import decode_triton

    saved, decode_triton.CONFIG = decode_triton.CONFIG, config
    try:
        yield
    finally:
        decode_triton.CONFIG = saved


# ---- 1. checks ------------------------------------------------------------------------
def check_kernel() -> dict:
    from ratplus_titan.kernels.decode import cache_update_reference, decode_attention_reference
    from ratplus_titan.kernels.decode_triton import cache_update_triton, decode_attention_triton, split_plan

    results = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for batch, heads, rows, head_dim in [(1, 16, 1, 128), (8, 16, 3000, 128), (64, 16, 517, 128), (3, 4, 70000, 64)]:
        def rand(*shape):
            return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16)

        q, k_new, v_new = rand(batch, heads, head_dim), rand(batch, heads, head_dim), rand(batch, heads, head_dim)
        k_cache, v_cache = rand(batch, heads, rows, head_dim), rand(batch, heads, rows, head_dim)
        valid = torch.rand(batch, rows, generator=gen, device="cuda") < 0.8
        valid[0] = False
        if batch > 2:
            valid[2, rows // 3 :] = False
        counts = torch.randint(0, rows + 1, (batch,), generator=gen, device="cuda")
        ref = decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), valid, k_new.float(), v_new.float())
        ref_c = decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), counts, k_new.float(),
                                           v_new.float())
        for kernel, config in kernel_configs().items():
            with use_config(config):
                out = decode_attention_triton(q, k_cache, v_cache, valid, k_new, v_new)
                out_c = decode_attention_triton(q, k_cache, v_cache, counts, k_new, v_new)
            rel = ((out.float() - ref).norm() / ref.norm()).item()
            rel_c = ((out_c.float() - ref_c).norm() / ref_c.norm()).item()
            results.append({"shape": [batch, heads, rows, head_dim], "kernel": kernel,
                            "splits": split_plan(batch, heads, rows, q.device, config)[0],
                            "rel_err_mask": rel, "rel_err_counts": rel_c,
                            "finite": bool(out.isfinite().all() and out_c.isfinite().all())})
            log(f"check {kernel} kernel {batch}x{heads}x{rows}x{head_dim}: rel err {rel:.2e} (mask), {rel_c:.2e} (counts)")
            assert rel < 1e-2 and rel_c < 1e-2 and results[-1]["finite"], results[-1]
    # cache update
    batch, heads, rows, head_dim = 32, 16, 300, 128
    k_cache = torch.randn(batch, heads, rows, head_dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    k_new, v_new = (torch.randn(batch, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    slot = torch.randint(0, rows, (batch,), device="cuda")
    dst = (slot + 1 + torch.randint(0, rows - 1, (batch,), device="cuda")) % rows
    move, write = torch.rand(batch, device="cuda") < 0.5, torch.rand(batch, device="cuda") < 0.5
    expected = [k_cache.clone(), v_cache.clone()]
    cache_update_reference(*expected, k_new, v_new, slot, dst, move, slot, write)
    cache_update_triton(k_cache, v_cache, k_new, v_new, slot, dst, move, slot, write)
    update_ok = torch.equal(k_cache, expected[0]) and torch.equal(v_cache, expected[1])
    log(f"check cache update: {'equal' if update_ok else 'DIFFERENT'}")
    assert update_ok
    return {"decode_attention": results, "cache_update_equal": update_ok}


def check_model() -> dict:
    """A tiny fp32 model on the GPU: prefill + decode (eager and graph) against the full forward."""
    from ratplus_titan.inference import RATPlusLM
    from ratplus_titan.inference.generate import make_decoder
    from ratplus_titan.model.args import RATPlusModelArgs

    out = {}
    for pattern in ["dense", "d4w8s2", "d3w0s1", "d2w100s2", ["dense", "d-1w8s2"]]:  # d2w100s2: full layout, mask
        torch.manual_seed(0)
        args = RATPlusModelArgs(dim=256, n_layers=2, n_heads=2, vocab_size=100, max_seq_len=256, init_std=0.05,
                                attention_backend="sdpa")
        lm = RATPlusLM(args, pattern=pattern, device="cuda", max_seq_len=160, max_batch_size=3)
        tokens = torch.randint(0, 100, (3, 150), device="cuda")
        lengths = [5, 40, 77]
        full = lm(tokens)
        errs = {}
        for mode in ("eager", "graph"):
            lm.setup_cache(3)
            decoder = make_decoder(lm, mode)
            logits = lm.prefill([tokens[b, :n].tolist() for b, n in enumerate(lengths)], all_logits=True)
            err = max((logits[b, :n] - full[b, :n]).abs().max().item() for b, n in enumerate(lengths))
            for i in range(150 - max(lengths)):
                step = decoder(torch.stack([tokens[b, n + i] for b, n in enumerate(lengths)]))
                err = max(err, max((step[b] - full[b, n + i]).abs().max().item() for b, n in enumerate(lengths)))
            errs[mode] = err
        scale = full.abs().max().item()
        key = pattern if isinstance(pattern, str) else ",".join(pattern)
        out[key] = {"max_abs_err": errs, "logit_scale": scale}
        log(f"check model {key}: max abs err {errs} (logits up to {scale:.2f})")
        assert max(errs.values()) < 2e-3 * max(scale, 1.0), errs
    return out


# ---- 2. decode kernels -----------------------------------------------------------------------
def graph_ms(call, calls: int = 8, replays: int = 5) -> float:
    """Milliseconds per ``call()`` inside a CUDA graph of ``calls`` calls (as decoding replays a step)."""
    call()  # compile, fit the launch
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (replays * calls)


def rotating_call(sets: list, valid: torch.Tensor):
    """A call of the decode kernel on the next cache set at each invocation (the sets together exceed L2)."""
    from ratplus_titan.kernels.decode_triton import decode_attention_triton

    counter = [0]

    def call():
        q, k_cache, v_cache, k_new, v_new = sets[counter[0] % len(sets)]
        counter[0] += 1
        return decode_attention_triton(q, k_cache, v_cache, valid, k_new, v_new)

    return call


def kernel_timings(contexts: list[int], batch: int, copy_bw: float | None, device: str = "cuda") -> list[dict]:
    """Each kernel of ``kernel_configs()`` at every (context, pattern): graph ms, do_bench ms, share of the copy BW."""
    from ratplus_titan.pattern import Pattern

    heads, head_dim = 16, 128
    configs = kernel_configs()
    results = []
    for ci, (ctx, name) in enumerate((c, p) for c in contexts for p in PATTERNS):
        rows = Pattern.parse(name).cache_rows(ctx)
        set_bytes = 2 * batch * heads * rows * head_dim * 2  # keys and values, bf16
        n_sets = 1 if device != "cuda" or set_bytes > 4e9 else max(2, min(4, math.ceil(1e9 / set_bytes)))
        gen = torch.Generator(device=device).manual_seed(ci)

        def rand(*shape):
            return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(torch.bfloat16)  # noqa: B023

        sets = [(rand(batch, heads, head_dim), rand(batch, heads, rows, head_dim), rand(batch, heads, rows, head_dim),
                 rand(batch, heads, head_dim), rand(batch, heads, head_dim)) for _ in range(n_sets)]  # fmt: skip
        valid = torch.full((batch,), rows, dtype=torch.long, device=device)
        for kernel, config in configs.items():
            row = {"context": ctx, "pattern": name, "rows": rows, "batch": batch, "variant": kernel,
                   "bytes_read": set_bytes, "cache_sets": n_sets}  # fmt: skip
            try:
                with use_config(config):
                    call = rotating_call(sets, valid)
                    call()  # compile
                    row["ms"] = common.do_bench(call, warmup_ms=10, rep_ms=40, device=device)
                    if device == "cuda":
                        row["graph_ms"] = graph_ms(call)
                        row["graph_fraction_of_copy_bw"] = set_bytes / (row["graph_ms"] / 1e3) / copy_bw
            except Exception as err:  # e.g. out of memory: keep the other rows
                traceback.print_exc()
                row["error"] = repr(err)[:500]
            results.append(row)
            timing = f"graph {row['graph_ms']:.3f} ms = {row['graph_fraction_of_copy_bw']:.0%} of copy, " if "graph_ms" in row else ""
            log(f"kernel {kernel:5s} ctx {ctx:6d} {name:10s} rows {rows:6d}: {timing}do_bench {row.get('ms', float('nan')):.3f} ms")
        sets = None
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


# ---- 3./4. the 1B-shape model -------------------------------------------------------------
def build_lm(max_seq_len: int, max_batch: int):
    from ratplus_titan.inference import RATPlusLM
    from ratplus_titan.model.args import RATPlusModelArgs

    args = RATPlusModelArgs(dim=2048, n_layers=24, n_heads=16, vocab_size=32000, max_seq_len=4096)
    torch.manual_seed(0)
    return RATPlusLM(args, pattern="dense", dtype=torch.bfloat16, device="cuda", max_seq_len=max_seq_len,
                     max_batch_size=max_batch)


def fake_prefill(lm, context: int) -> None:
    """Random cache rows and states, every sequence at position ``context`` (as after a prefill)."""
    for layer in lm.cache.layers:
        for buffer in (layer.k, layer.v, layer.key_state, layer.value_state):
            buffer.normal_()
    lm.cache.pos.fill_(context)


def time_decode(lm, pattern: str, context: int, batch: int | None, steps: int, max_batch: int, reserve: float) -> dict:
    from ratplus_titan.inference.generate import make_decoder

    lm.set_pattern(pattern)
    torch.cuda.empty_cache()
    cache_len = context + steps + 16
    per_seq = _bytes_per_sequence(lm, cache_len)
    if batch is None:
        free, _ = torch.cuda.mem_get_info()
        batch = int(min(max_batch, (free - reserve) // per_seq))
    if batch < 1:
        return {"pattern": pattern, "context": context, "batch": 0, "error": "cache of one sequence does not fit"}
    lm.setup_cache(batch, cache_len)
    decoder = make_decoder(lm, "graph")  # captures (and scribbles on the cache)
    fake_prefill(lm, context)
    tokens = torch.randint(0, lm.args.vocab_size, (batch,), device="cuda")
    decoder.tokens.copy_(tokens)
    decoder.graph.replay()  # warm
    lm.cache.pos.fill_(context)
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(steps):
        decoder.graph.replay()
    end.record()
    end.synchronize()
    ms_per_step = begin.elapsed_time(end) / steps
    assert bool(decoder.logits.isfinite().all()), "non-finite logits"
    result = {
        "pattern": pattern, "context": context, "batch": batch, "ms_per_step": ms_per_step,
        "tokens_per_s": batch / (ms_per_step / 1e3), "cache_bytes_per_sequence": lm.cache.bytes_per_sequence(),
        "cache_bytes_total": lm.cache.total_bytes(),
        "kv_rows_per_layer": [layer.k.shape[2] for layer in lm.cache.layers][:1],
    }
    log(f"decode ctx {context:6d} {pattern:10s} batch {batch:3d}: {ms_per_step:7.3f} ms/step, "
        f"{result['tokens_per_s']:9.0f} tokens/s, cache {result['cache_bytes_total'] / 1e9:.1f} GB")
    lm.free_cache()
    decoder = None
    torch.cuda.empty_cache()
    return result


def _bytes_per_sequence(lm, max_seq_len: int) -> int:
    rows = sum(p.cache_rows(max_seq_len) for p in lm.patterns)
    return 2 * rows * lm.args.dim * 2 + 2 * lm.args.n_layers * lm.args.dim * 4


# ---- summary and plot ------------------------------------------------------------------------
def summarize(result: dict) -> dict:
    summary = {}
    by = {(r["context"], r["pattern"]): r for r in result.get("throughput", []) if r.get("batch")}
    for ctx in sorted({c for c, _ in by}):
        dense = by.get((ctx, "dense"))
        for name in PATTERNS[1:]:
            if dense and (ctx, name) in by:
                summary[f"throughput_ratio_{name}_vs_dense_ctx{ctx}"] = by[(ctx, name)]["tokens_per_s"] / dense["tokens_per_s"]
    lat = {r["pattern"]: r for r in result.get("latency", []) if r.get("batch")}
    for name in PATTERNS[1:]:
        if "dense" in lat and name in lat:
            summary[f"latency_ratio_{name}_vs_dense_b1_ctx1024"] = lat[name]["ms_per_step"] / lat["dense"]["ms_per_step"]
    for r in result.get("kernel", []) if isinstance(result.get("kernel"), list) else []:
        if "graph_fraction_of_copy_bw" in r:
            summary[f"kernel_{r['variant']}_bw_fraction_{r['pattern']}_ctx{r['context']}"] = r["graph_fraction_of_copy_bw"]
    return summary


def plot(result: dict, path: Path) -> None:
    fig, axes = common.figure(1, 3, figsize=(16, 4.5))
    throughput = result.get("throughput", [])
    contexts = sorted({r["context"] for r in throughput})
    width = 0.8 / max(len(PATTERNS), 1)
    for i, name in enumerate(PATTERNS):
        values = [next((r["tokens_per_s"] for r in throughput if r["context"] == c and r["pattern"] == name
                        and r.get("batch")), 0) for c in contexts]  # fmt: skip
        bars = axes[0].bar([j + i * width for j in range(len(contexts))], values, width, label=name)
        batches = [next((r["batch"] for r in throughput if r["context"] == c and r["pattern"] == name), 0)
                   for c in contexts]  # fmt: skip
        for bar, b in zip(bars, batches):
            axes[0].annotate(f"B={b}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", fontsize=7)
    axes[0].set_xticks([j + width for j in range(len(contexts))], [f"{c // 1024}K" for c in contexts])
    axes[0].set_yscale("log")
    axes[0].set_title("decode tokens/s (largest batch <= 256)")
    axes[0].legend()
    lat = [r for r in result.get("latency", []) if r.get("batch")]
    axes[1].bar([r["pattern"] for r in lat], [r["ms_per_step"] for r in lat], color=["C0", "C1", "C2"][: len(lat)])
    axes[1].set_title("batch 1, context 1K: ms per token")
    kernel = [r for r in result.get("kernel", []) if isinstance(r, dict) and r.get("variant") == "flat"]
    kcontexts = sorted({r["context"] for r in kernel})
    for i, name in enumerate(PATTERNS):
        values = [next((r.get("graph_fraction_of_copy_bw", 0) for r in kernel if r["context"] == c and r["pattern"] == name), 0)
                  for c in kcontexts]  # fmt: skip
        axes[2].bar([j + i * width for j in range(len(kcontexts))], values, width, label=name)
    axes[2].set_xticks([j + width for j in range(len(kcontexts))], [f"{c // 1024}K" for c in kcontexts])
    axes[2].set_title("flat decode kernel in a CUDA graph: cache read BW / copy BW (B=64)", fontsize=10)
    axes[2].legend()
    env = result.get("env", {})
    fig.suptitle(f"RAT+ decode, 1B shape, bf16 - {env.get('device', '?')}, torch {env.get('torch', '?')}, {env.get('date', '')}")
    common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.decode", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=common.out_dir(), help="output folder (default: $OUT or bench/results)")
    parser.add_argument("--phases", default="check,kernel,throughput,latency",
                        help="comma-separated phases: check, kernel, throughput, latency")  # fmt: skip
    parser.add_argument("--contexts", default="4096,16384", help="throughput contexts")
    parser.add_argument("--kernel-contexts", default="16384,65536", help="decode kernel contexts")
    parser.add_argument("--kernel-batch", type=int, default=64, help="decode kernel batch")
    parser.add_argument("--max-batch", type=int, default=256, help="largest batch tried")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per configuration")
    parser.add_argument("--reserve-gb", type=float, default=4.0, help="GPU memory left free when sizing batches")
    parser.add_argument("--plot", default=None, help="only draw the PNG of this JSON file")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: a smoke run of the kernel phase (TRITON_INTERPRET=1, small --kernel-contexts)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return 0
    phases = args.phases.split(",")
    unknown = [p for p in phases if p not in ("check", "kernel", "throughput", "latency")]
    if unknown:
        parser.error(f"phase {unknown[0]!r} is unknown: allowed are check, kernel, throughput, latency")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device (a CPU smoke run: --device cpu --phases kernel)")
    if args.device == "cpu" and phases != ["kernel"]:
        parser.error("--device cpu runs the kernel phase only (--phases kernel)")
    common.import_without_train_spec()

    result: dict = {"env": common.environment(args.device)}
    path = Path(args.out) / f"decode_{common.device_slug(args.device)}.json"

    def save():
        result["summary"] = summarize(result)
        common.write_json(path, result)

    t0 = time.time()
    copy_bw = common.copy_bandwidth() if args.device == "cuda" else None
    result["copy_bytes_per_s"] = copy_bw
    log(f"copy bandwidth {(copy_bw or 0) / 1e12:.2f} TB/s (read + write)")
    kernel_contexts = [int(c) for c in args.kernel_contexts.split(",")]
    for phase, fn in (
        ("check", lambda: {"kernel": check_kernel(), "model": check_model()}),
        ("kernel", lambda: kernel_timings(kernel_contexts, args.kernel_batch, copy_bw, args.device)),
    ):
        if phase in phases:
            try:
                result[phase] = fn()
            except Exception as err:  # keep going: the other phases still report
                traceback.print_exc()
                result[phase] = {"error": repr(err)}
            save()
            log(f"[{phase} done at {time.time() - t0:.0f} s]")

    if {"throughput", "latency"} & set(phases):
        contexts = [int(c) for c in args.contexts.split(",")]
        lm = build_lm(max(contexts) + args.steps + 16, args.max_batch)
        reserve = args.reserve_gb * 1024**3
        if "throughput" in phases:
            result["throughput"] = []
            for ctx in contexts:
                for name in PATTERNS:
                    try:
                        result["throughput"].append(time_decode(lm, name, ctx, None, args.steps, args.max_batch, reserve))
                    except Exception as err:
                        traceback.print_exc()
                        result["throughput"].append({"pattern": name, "context": ctx, "error": repr(err)})
                        lm.free_cache()
                        torch.cuda.empty_cache()
                    save()
            log(f"[throughput done at {time.time() - t0:.0f} s]")
        if "latency" in phases:
            result["latency"] = []
            for name in PATTERNS:
                try:
                    result["latency"].append(time_decode(lm, name, 1024, 1, 50, 1, reserve))
                except Exception as err:
                    traceback.print_exc()
                    result["latency"].append({"pattern": name, "context": 1024, "error": repr(err)})
                save()
            log(f"[latency done at {time.time() - t0:.0f} s]")
    from ratplus_titan.kernels import decode_triton

    result["kernel_config"] = vars(decode_triton.CONFIG)
    save()
    log(json.dumps(result["summary"], indent=1))
    common.plot_or_skip(plot, result, path.with_suffix(".png"))
    log(f"wrote {path} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
