"""``python -m bench.topk``: top-k block attention in Triton (kernels/topk_attention_triton.py) on one GPU.

One call, about 90 s on an H200 (``--budget`` seconds: phases that would not fit are skipped):

1. ``check``: at a reduced size (B=1, one head, T=16384, bf16, block 64, top_k 16, 4 sinks) against
   the reference: the picks of every query bit for bit (rows whose fp32 scores tie within rounding may
   differ: counted), forward and backward against a float64 softmax under the reference's picks;
   decode against ``topk_decode_attention`` on a ragged batch of 4 over 16448 cache rows.
2. ``decode``: one step, batch 32, 16 x 128 heads, bf16, contexts from ``--seq-lens``, block 64,
   top_k = T/16/64, 4 sinks: the top-k step (selection over the block summaries + the flat decode kernel
   over the picked rows) against the flat dilated decode kernel over the same number of rows
   (S + (top_k + 1) * 64, as counts). Target: top-k within 1.3x.
3. ``prefill``: B=1, 16 x 128 heads, bf16, the same pattern, T from ``--seq-lens``: dense causal SDPA
   forward and forward+backward, and for each input kind and score the top-k forward, forward+backward
   and the selection alone (``select_share``: its share of the forward, which includes it); ``work_ratio``
   = (query, key block) products the kernels compute / those the queries attend (own block and picks):
   above 1 only by the padding of each block's last gathered query tile, the causal triangle of the own
   blocks and the sink blocks; on CUDA ``fwd_bwd_kernels_ms`` lists each kernel's time (torch.profiler).
   Input kinds: ``iid``
   (independent Gaussian q, k, v: neighbouring queries pick unrelated blocks, the worst case) and
   ``smooth64``, ``smooth256`` (queries interpolated between Gaussian anchors 64 / 256 positions apart,
   keys iid: neighbouring queries pick alike). Target: forward >= 8x SDPA.

Writes ``topk_<device>.json`` into ``--out`` (default ``$OUT`` or bench/results) and prints a table.
``--tiny`` runs the same code at toy sizes (on CPU under TRITON_INTERPRET=1: the test's smoke run).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
import traceback
from pathlib import Path

import torch

from bench import common
from bench.common import log

common.import_without_train_spec()

from ratplus_titan.kernels import topk_attention_triton as tat  # noqa: E402
from ratplus_titan.kernels.decode_triton import decode_attention_triton  # noqa: E402
from ratplus_titan.kernels.topk_attention import topk_decode_attention  # noqa: E402
from ratplus_titan.topk import SCORES, TopKPattern  # noqa: E402

# The check runs at the first timed length and decode shape, so that it compiles the kernels the timings use.
FULL = dict(seq_lens=(16384, 65536), heads=16, head_dim=128, block=64, sinks=4, decode_batch=32,
            check=dict(seq_len=16384, heads=1, top_k=16, decode_rows=16384 + 64))
TINY = dict(seq_lens=(96,), heads=2, head_dim=16, block=4, sinks=2, decode_batch=2,
            check=dict(seq_len=40, heads=2, top_k=2, decode_rows=40))
INPUTS = ("iid", "smooth64", "smooth256")


class Clock:
    """Milliseconds of a call: ``do_bench`` medians on CUDA, one wall-clock run elsewhere (the smoke run)."""

    def __init__(self, device: str, start: float, budget: float):
        self.device, self.start, self.budget = device, start, budget

    def left(self) -> float:
        return self.budget - (time.time() - self.start)

    def ms(self, fn, rep_ms: float = 100) -> float:
        if self.device == "cuda":
            return common.do_bench(fn, warmup_ms=min(25, rep_ms / 4), rep_ms=rep_ms)
        begin = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - begin)


def make_inputs(kind: str, batch, heads, seq_len, head_dim, device, dtype, seed=0):
    """``iid``: Gaussian q, k, v. ``smooth<N>``: keys and values iid, queries interpolated linearly between
    Gaussian anchors ``N`` positions apart (unit variance): neighbouring queries are alike."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    k, v = randn(batch, heads, seq_len, head_dim), randn(batch, heads, seq_len, head_dim)
    if kind == "iid":
        q = randn(batch, heads, seq_len, head_dim)
    elif kind.startswith("smooth") and kind[6:].isdigit():
        anchor = int(kind[6:])
        points = randn(batch * heads, head_dim, seq_len // anchor + 2)
        q = torch.nn.functional.interpolate(points, scale_factor=anchor, mode="linear", align_corners=True)
        q = q[..., :seq_len].transpose(1, 2).reshape(batch, heads, seq_len, head_dim)
        q = q / q.std()
    else:
        raise ValueError(f"input kind {kind!r} is unknown: allowed values are iid, smooth<N> (e.g. {INPUTS[1]})")
    return q.to(dtype), k.to(dtype), v.to(dtype)


def reference_float64(q, k, v, pattern: TopKPattern, grad_out):
    """The reference's picks on these inputs; float64 softmax under them; out and the three gradients."""
    seq_len = q.shape[-2]
    idx = torch.arange(seq_len, device=q.device)
    picks = pattern.selected_blocks(pattern.scores(q, pattern.summaries(k)), idx)  # [B, H, T, NB]
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    scores = (q64 @ k64.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~pattern.allows(idx[:, None], idx[None, :], picks), float("-inf"))
    out = torch.softmax(scores, -1) @ v64
    return picks, out.detach(), torch.autograd.grad((out * grad_out.double()).sum(), (q64, k64, v64))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``|actual - expected| / |expected|`` (L2 norms, in float64)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


# ---- 1. check -----------------------------------------------------------------------------------
def check(sizes: dict, device: str) -> dict:
    c = sizes["check"]
    out = {}
    for score in SCORES:
        pattern = TopKPattern(sizes["block"], c["top_k"], score, sizes["sinks"])
        q, k, v = make_inputs("iid", 1, c["heads"], c["seq_len"], sizes["head_dim"], device, torch.bfloat16, seed=1)
        for x in (q, k, v):
            x.requires_grad_(True)
        got = tat.topk_attention_triton(q, k, v, pattern)
        grad_out = torch.randn_like(got)
        grads = torch.autograd.grad((got.float() * grad_out.float()).sum(), (q, k, v))
        picks, ref, ref_grads = reference_float64(q.detach(), k.detach(), v.detach(), pattern, grad_out)
        bits, _, _ = torch.ops.ratplus.topk_select(q.detach(), k.detach(), pattern.block_size, pattern.top_k,
                                                   pattern.sinks, score)
        shifts = torch.arange(32, device=device, dtype=torch.int32)
        ours = (((bits[..., None] >> shifts) & 1) != 0).flatten(-2)[..., : picks.shape[-1]]
        differ = (ours != picks.flatten(0, 1)).any(-1)  # [B*H, T]
        same = ~differ.view(picks.shape[:3])[..., None]
        row = {"rows_with_other_picks": int(differ.sum()), "rows": int(differ.numel()),
               "out_rel_err": rel_err(got * same, ref * same)}
        for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            row[f"{name}_rel_err"] = rel_err(g, r)
        out[score] = row
        log(f"check {score}: {row}")
        assert row["rows_with_other_picks"] <= max(2, row["rows"] // 1000), row
        assert row["out_rel_err"] < 2e-2 and torch.isfinite(got).all(), row
        if row["rows_with_other_picks"] == 0:
            assert max(row[f"{n}_rel_err"] for n in ("dq", "dk", "dv")) < 3e-2, row
    out["decode"] = check_decode(sizes, device)
    return out


def check_decode(sizes: dict, device: str) -> dict:
    c, heads, head_dim, block = sizes["check"], sizes["check"]["heads"], sizes["head_dim"], sizes["block"]
    rows = c["decode_rows"]
    gen = torch.Generator(device=device).manual_seed(2)
    errs = {}
    for score in SCORES:
        pattern = TopKPattern(block, c["top_k"], score, sizes["sinks"])
        k_cache, v_cache = (torch.randn(4, heads, rows, head_dim, generator=gen, device=device).to(torch.bfloat16)
                            for _ in range(2))
        q, k_new, v_new = (torch.randn(4, heads, head_dim, generator=gen, device=device).to(torch.bfloat16)
                           for _ in range(3))
        pos = torch.tensor([0, block + 1, rows // 2 + 3, rows - 1], device=device)
        summaries = pattern.summaries(k_cache)
        got = tat.topk_decode_attention_triton(pattern, q, k_cache, v_cache, summaries, pos, k_new, v_new)
        ref = topk_decode_attention(pattern, q.float(), k_cache.float(), v_cache.float(), summaries, pos,
                                    k_new.float(), v_new.float())
        errs[score] = rel_err(got, ref)
        assert errs[score] < 2e-2 and torch.isfinite(got).all(), (score, errs[score])
    log(f"check decode: rel err {errs}")
    return errs


# ---- 2. decode ----------------------------------------------------------------------------------
def bench_decode(sizes: dict, device: str, clock: Clock, scores=SCORES) -> list[dict]:
    heads, head_dim, block, sinks, batch = (sizes[n] for n in ("heads", "head_dim", "block", "sinks", "decode_batch"))
    rows_out = []
    for ctx in sizes["seq_lens"]:
        if clock.left() < 10:
            log(f"decode ctx {ctx}: skipped (budget)")
            continue
        top_k = max(1, ctx // 16 // block)
        rows = ctx + block  # the query sits at the end of a block: its own block has block - 1 rows
        dtype = torch.bfloat16
        k_cache = torch.randn(batch, heads, rows, head_dim, device=device, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        q, k_new, v_new = (torch.randn(batch, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
        pos = torch.full((batch,), rows - 1, device=device)
        row = {"context": ctx, "batch": batch, "top_k": top_k, "rows_read": sinks + (top_k + 1) * block}
        for score in scores:
            pattern = TopKPattern(block, top_k, score, sinks)
            summaries = pattern.summaries(k_cache).contiguous()
            row[f"{score}_ms"] = clock.ms(functools.partial(
                tat.topk_decode_attention_triton, pattern, q, k_cache, v_cache, summaries, pos, k_new, v_new))
        k_cache = v_cache = summaries = None
        dil_k = torch.randn(batch, heads, row["rows_read"], head_dim, device=device, dtype=dtype)
        dil_v = torch.randn_like(dil_k)
        counts = torch.full((batch,), row["rows_read"], device=device, dtype=torch.long)
        row["dilated_ms"] = clock.ms(functools.partial(decode_attention_triton, q, dil_k, dil_v, counts, k_new, v_new))
        for score in scores:
            row[f"{score}_vs_dilated"] = row[f"{score}_ms"] / row["dilated_ms"]
        rows_out.append(row)
        log(f"decode ctx {ctx}: " + ", ".join(f"{s} {row[f'{s}_ms']:.3f} ms ({row[f'{s}_vs_dilated']:.2f}x)"
                                              for s in scores) + f"; dilated {row['dilated_ms']:.3f} ms")
        dil_k = dil_v = None
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows_out


# ---- 3. prefill ---------------------------------------------------------------------------------
def work_ratio(seq_len: int, pattern: TopKPattern, starts: torch.Tensor, tile_m: int) -> float:
    """(query, key block) products computed / attended (picks + own block), over all (batch, head)s.

    Computed: each block's picking queries in gathered tiles of ``tile_m`` (the last one padded), and each
    query tile of the local part against its sink blocks and own blocks (``topk_prefill_triton._local_block``).
    """
    bs, heads = pattern.block_size, starts.shape[0]
    t = torch.arange(seq_len, dtype=torch.float64)
    attended = (torch.clamp(t // bs, max=pattern.top_k) + 1).sum().item() * heads
    counts = (starts[:, 1:] - starts[:, :-1]).double()
    picked = (torch.ceil(counts / tile_m) * tile_m).sum().item()
    m0 = torch.arange(0, seq_len, tile_m)
    first, last = m0 // bs, (torch.clamp(m0 + tile_m, max=seq_len) - 1) // bs
    local = (torch.clamp(first, max=-(-pattern.sinks // bs)) + last - first + 1).sum().item() * tile_m * heads
    return (picked + local) / attended


def kernel_times(fn) -> list[list]:
    """``[name, ms]`` of each CUDA kernel of one call of ``fn``, in launch order (torch.profiler; after a warm call)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [[e.name[:60], e.device_time / 1e3] for e in sorted(kernels, key=lambda e: e.time_range.start)]


def fwd_bwd(attention, leaves: list[torch.Tensor], grad: torch.Tensor):
    return torch.autograd.grad(attention(*leaves), leaves, grad)


def bench_prefill(sizes: dict, device: str, clock: Clock, inputs=INPUTS, scores=SCORES) -> list[dict]:
    heads, head_dim, block, sinks = (sizes[n] for n in ("heads", "head_dim", "block", "sinks"))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows_out = []
    for seq_len in sizes["seq_lens"]:
        if clock.left() < 15:
            log(f"prefill T={seq_len}: skipped (budget)")
            continue
        top_k = max(1, seq_len // 16 // block)
        rep = 100 if seq_len <= 16384 else 50
        tile_m = tat._config(torch.bfloat16, block)["tile_m"]
        base = {"seq_len": seq_len, "top_k": top_k, "block": block, "sinks": sinks, "tile_m": tile_m}
        q, k, v = make_inputs("iid", 1, heads, seq_len, head_dim, device, torch.bfloat16)
        grad = torch.randn_like(q)
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
        base["sdpa_fwd_ms"] = clock.ms(functools.partial(sdpa, q, k, v, is_causal=True), rep)
        base["sdpa_fwd_bwd_ms"] = clock.ms(functools.partial(fwd_bwd, functools.partial(sdpa, is_causal=True),
                                                             leaves, grad), rep)
        log(f"prefill T={seq_len}: SDPA fwd {base['sdpa_fwd_ms']:.3f} ms, fwd+bwd {base['sdpa_fwd_bwd_ms']:.3f} ms")
        for kind in inputs:
            q, k, v = make_inputs(kind, 1, heads, seq_len, head_dim, device, torch.bfloat16)
            leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
            for score in scores:
                if clock.left() < 8:
                    log(f"prefill T={seq_len} {kind} {score}: skipped (budget)")
                    continue
                pattern = TopKPattern(block, top_k, score, sinks)
                row = dict(base, inputs=kind, score=score)
                try:
                    _, _, starts = torch.ops.ratplus.topk_select(q, k, block, top_k, sinks, score)
                    row["work_ratio"] = work_ratio(seq_len, pattern, starts.cpu(), tile_m)
                    select = functools.partial(torch.ops.ratplus.topk_select, q, k, block, top_k, sinks, score)
                    attention = functools.partial(tat.topk_attention_triton, pattern=pattern)
                    row["select_ms"] = clock.ms(select, rep)
                    row["fwd_ms"] = clock.ms(functools.partial(attention, q, k, v), rep)
                    row["fwd_bwd_ms"] = clock.ms(functools.partial(fwd_bwd, attention, leaves, grad), rep)
                    row["select_share"] = row["select_ms"] / row["fwd_ms"]
                    if device == "cuda":  # where the time goes (the forward's two pair passes share one kernel)
                        try:
                            row["fwd_bwd_kernels_ms"] = kernel_times(functools.partial(fwd_bwd, attention, leaves, grad))
                        except Exception as error:  # the profiler's API moves between torch versions
                            row["fwd_bwd_kernels_ms"] = repr(error)[:200]
                    row["fwd_speedup_vs_sdpa"] = base["sdpa_fwd_ms"] / row["fwd_ms"]
                    row["fwd_bwd_speedup_vs_sdpa"] = base["sdpa_fwd_bwd_ms"] / row["fwd_bwd_ms"]
                    log(f"prefill T={seq_len} {kind:9s} {score:7s}: fwd {row['fwd_ms']:.3f} ms "
                        f"({row['fwd_speedup_vs_sdpa']:.2f}x SDPA; select {row['select_ms']:.3f} = "
                        f"{100 * row['select_share']:.0f}%), fwd+bwd {row['fwd_bwd_ms']:.3f} ms "
                        f"({row['fwd_bwd_speedup_vs_sdpa']:.2f}x); work ratio {row['work_ratio']:.2f}")
                except Exception as error:  # report and go on
                    row["error"] = repr(error)[:500]
                    log(traceback.format_exc())
                rows_out.append(row)
        q = k = v = grad = leaves = None
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows_out


def print_table(results: dict) -> None:
    log("\nprefill (B=1, 16 x 128 heads, bf16): ms and speedup over dense causal SDPA")
    log(f"{'T':>6} {'inputs':>9} {'score':>7} {'work':>6} {'select':>7} {'share':>6} {'fwd':>8} {'x SDPA':>7} "
        f"{'fwd+bwd':>8} {'x SDPA':>7}")
    for r in results.get("prefill", []):
        if "fwd_ms" in r:
            log(f"{r['seq_len']:>6} {r['inputs']:>9} {r['score']:>7} {r['work_ratio']:>6.2f} {r['select_ms']:>7.3f} "
                f"{r['select_share']:>6.2f} {r['fwd_ms']:>8.3f} {r['fwd_speedup_vs_sdpa']:>7.2f} {r['fwd_bwd_ms']:>8.3f} "
                f"{r['fwd_bwd_speedup_vs_sdpa']:>7.2f}")
    log("decode (one step): top-k over the dilated flat kernel at the same rows read")
    for r in results.get("decode", []):
        log(f"  ctx {r['context']:>6} batch {r['batch']} rows {r['rows_read']}: dilated {r['dilated_ms']:.3f} ms; "
            + ", ".join(f"{s} {r[f'{s}_ms']:.3f} ms = {r[f'{s}_vs_dilated']:.2f}x" for s in SCORES if f"{s}_ms" in r))


def bench_topk(results: dict, tiny: bool = False, budget: float = 88.0, start: float | None = None,
               phases=("check", "decode", "prefill"), inputs=INPUTS, scores=SCORES) -> None:
    """Fill ``results`` with the phases' rows (see the module docstring); stops starting work near ``budget`` s."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = TINY if tiny else FULL
    clock = Clock(device, time.time() if start is None else start, budget)
    results.update(tiny=tiny, sizes={k: v for k, v in sizes.items() if k != "check"}, budget_s=budget)
    if "check" in phases:
        results["check"] = check(sizes, device)
    if "decode" in phases:
        results["decode"] = bench_decode(sizes, device, clock, scores)
    if "prefill" in phases:
        results["prefill"] = bench_prefill(sizes, device, clock, inputs, scores)
    results["elapsed_s"] = time.time() - clock.start


def main(argv: list[str] | None = None) -> int:
    start = time.time()
    parser = argparse.ArgumentParser(prog="python -m bench.topk", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=common.out_dir(), help="output folder (default: $OUT or bench/results)")
    parser.add_argument("--phases", default="check,decode,prefill", help="comma-separated: check, decode, prefill")
    parser.add_argument("--inputs", default=",".join(INPUTS), help=f"prefill input kinds, comma-separated: {INPUTS}")
    parser.add_argument("--scores", default=",".join(SCORES), help=f"decode and prefill scores: {SCORES}")
    parser.add_argument("--budget", type=float, default=88.0, help="seconds: later phases are skipped past it")
    parser.add_argument("--tile-m", type=int, default=None,
                        help="query tile and gathered rows per tile of the prefill kernels (16/32/64/128)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (CPU smoke run under TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    if args.tile_m:
        tat.CONFIG_OVERRIDE["tile_m"] = args.tile_m
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {"env": common.environment(device)}
    env = results["env"]
    log(f"{env['device']}  torch {env['torch']}  triton {env['triton']}")
    path = Path(args.out) / f"topk_{common.device_slug(device)}{'_tiny' if args.tiny else ''}.json"
    try:
        bench_topk(results, args.tiny, args.budget, start, tuple(args.phases.split(",")), tuple(args.inputs.split(",")),
                   tuple(args.scores.split(",")))
    finally:
        common.write_json(path, results)
        print_table(results)
        log(f"wrote {path} ({time.time() - start:.0f} s)")
    return 0 if math.isfinite(results.get("elapsed_s", float("nan"))) else 1


if __name__ == "__main__":
    sys.exit(main())
