"""``python -m bench.topk``: top-k block attention in Triton (kernels/topk_attention_triton.py) on one GPU.

One call of the default phases (``check,decode,prefill``), about 90 s on an H200 (``--budget`` seconds:
work that would not fit is skipped):

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
4. ``select`` (not run by default: a tuning sweep, minutes at full size; give it ``--budget``): the selection
   alone (``topk_select``: ``_select_kernel`` and ``_pair_list_kernel``) at the prefill phase's shapes, iid
   inputs, T from ``--seq-lens``, for each score: the default launch, then each setting of
   ``topk_select_triton.SELECT_OVERRIDE`` in ``--select-scores`` (scores a program holds: SEL_M = it / padded
   blocks, clamped to [16, list_m]) x ``--select-warps`` (warps of both kernels), x ``--select-list-m`` when
   given (queries per selection program, ``list_m`` of ``CONFIG_OVERRIDE``), x ``--select-top-k`` when given
   (how ``_select_kernel`` finds each row's top-k, ``SELECT_OVERRIDE["top_k"]``: ``radix``, the default's
   radix search, and ``sorted``, a bitwise-equal bitonic top-k; e.g. ``--select-top-k radix,sorted`` times
   both side by side). Each row: ms, ratio to the default's, whether bits, pairs and starts are bitwise the
   default's (``equal``), on CUDA each kernel's time; a setting that fails is recorded with its error. Settings
   with the launch of an earlier row (same list_m, SEL_M, warps and top-k algorithm: the same compiled kernels)
   repeat its numbers (``same_launch_as``). On CUDA every launch is first
   compiled in parallel processes (``--select-jobs``; a compile takes 10 s to minutes, the fewer warps the
   longer), at most 240 s: a launch whose compile runs longer is stopped and its rows say so.

Writes ``topk_<device>.json`` into ``--out`` (default ``$OUT`` or bench/results) and prints a table.
``--tiny`` runs the same code at toy sizes (on CPU under TRITON_INTERPRET=1: the test's smoke run).
Lengths: ``--seq-lens`` (default 16384,65536; tiny 96) for the decode, prefill and select phases.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import multiprocessing
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import triton

from bench import common
from bench.common import log

common.import_without_train_spec()

from ratplus_titan import cli  # noqa: E402
from ratplus_titan.kernels import topk_attention_triton as tat  # noqa: E402
from ratplus_titan.kernels import topk_select_triton as tsel  # noqa: E402
from ratplus_titan.kernels.decode_triton import decode_attention_triton  # noqa: E402
from ratplus_titan.kernels.topk_attention import topk_decode_attention  # noqa: E402
from ratplus_titan.topk import SCORES, TopKPattern  # noqa: E402

# The check runs at the first timed length and decode shape, so that it compiles the kernels the timings use.
# ``select``: the grid of the select phase (scores a selection program holds x warps).
FULL = dict(seq_lens=(16384, 65536), heads=16, head_dim=128, block=64, sinks=4, decode_batch=32,
            check=dict(seq_len=16384, heads=1, top_k=16, decode_rows=16384 + 64),
            select=dict(scores_per_program=(2048, 4096, 8192, 16384), num_warps=(4, 8, 16, 32)))
TINY = dict(seq_lens=(96,), heads=2, head_dim=16, block=4, sinks=2, decode_batch=2,
            check=dict(seq_len=40, heads=2, top_k=2, decode_rows=40),
            select=dict(scores_per_program=(512, 16384), num_warps=(1, 2)))
INPUTS = ("iid", "smooth64", "smooth256")
PHASES = ("check", "decode", "prefill", "select")
SELECT_REP_MS = 200  # timing window of each select setting (a few calls at 40 ms; settings are compared)
SELECT_COMPILE_S = 40  # budget the select phase keeps for a launch that is not compiled yet (CUDA)
# At most this long for the compiles of the select phase's launches (in parallel processes): they take ~10 s to
# minutes each on the CPU (the fewer warps, the more the scores spill, the longer ptxas takes).
SELECT_COMPILE_TIMEOUT_S = 240
DEFAULT_PHASES = ("check", "decode", "prefill")


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


def top_k_for(seq_len: int, block: int) -> int:
    """top_k of the decode, prefill and select phases: T / 16 / block, at least 1."""
    return max(1, seq_len // 16 // block)


def prefill_pattern(sizes: dict, seq_len: int, score: str) -> TopKPattern:
    """The pattern of the prefill and select phases at length ``seq_len``."""
    return TopKPattern(sizes["block"], top_k_for(seq_len, sizes["block"]), score, sizes["sinks"])


def prefill_inputs(sizes: dict, kind: str, seq_len: int, device: str):
    """``q, k, v`` of the prefill and select phases: B=1, the sizes' heads and head dim, bf16."""
    return make_inputs(kind, 1, sizes["heads"], seq_len, sizes["head_dim"], device, torch.bfloat16)


def select(q: torch.Tensor, k: torch.Tensor, pattern: TopKPattern):
    """``torch.ops.ratplus.topk_select`` under ``pattern``: ``(bits, pairs, starts)``."""
    return torch.ops.ratplus.topk_select(q, k, pattern.block_size, pattern.top_k, pattern.sinks, pattern.score)


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
        top_k = top_k_for(ctx, block)
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


def fwd_bwd(attention, leaves: list[torch.Tensor], grad: torch.Tensor):
    return torch.autograd.grad(attention(*leaves), leaves, grad)


def bench_prefill(sizes: dict, device: str, clock: Clock, inputs=INPUTS, scores=SCORES) -> list[dict]:
    block, sinks = sizes["block"], sizes["sinks"]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows_out = []
    for seq_len in sizes["seq_lens"]:
        if clock.left() < 15:
            log(f"prefill T={seq_len}: skipped (budget)")
            continue
        top_k = top_k_for(seq_len, block)
        rep = 100 if seq_len <= 16384 else 50
        tile_m = tat._config(torch.bfloat16, block)["tile_m"]
        base = {"seq_len": seq_len, "top_k": top_k, "block": block, "sinks": sinks, "tile_m": tile_m}
        q, k, v = prefill_inputs(sizes, "iid", seq_len, device)
        grad = torch.randn_like(q)
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
        base["sdpa_fwd_ms"] = clock.ms(functools.partial(sdpa, q, k, v, is_causal=True), rep)
        base["sdpa_fwd_bwd_ms"] = clock.ms(functools.partial(fwd_bwd, functools.partial(sdpa, is_causal=True),
                                                             leaves, grad), rep)
        log(f"prefill T={seq_len}: SDPA fwd {base['sdpa_fwd_ms']:.3f} ms, fwd+bwd {base['sdpa_fwd_bwd_ms']:.3f} ms")
        for kind in inputs:
            q, k, v = prefill_inputs(sizes, kind, seq_len, device)
            leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
            for score in scores:
                if clock.left() < 8:
                    log(f"prefill T={seq_len} {kind} {score}: skipped (budget)")
                    continue
                pattern = prefill_pattern(sizes, seq_len, score)
                row = dict(base, inputs=kind, score=score)
                try:
                    _, _, starts = select(q, k, pattern)
                    row["work_ratio"] = work_ratio(seq_len, pattern, starts.cpu(), tile_m)
                    attention = functools.partial(tat.topk_attention_triton, pattern=pattern)
                    row["select_ms"] = clock.ms(functools.partial(select, q, k, pattern), rep)
                    row["fwd_ms"] = clock.ms(functools.partial(attention, q, k, v), rep)
                    row["fwd_bwd_ms"] = clock.ms(functools.partial(fwd_bwd, attention, leaves, grad), rep)
                    row["select_share"] = row["select_ms"] / row["fwd_ms"]
                    if device == "cuda":  # where the time goes (the forward's two pair passes share one kernel)
                        try:
                            row["fwd_bwd_kernels_ms"] = common.kernel_times(functools.partial(fwd_bwd, attention, leaves, grad))
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


# ---- 4. select ---------------------------------------------------------------------------------
@contextlib.contextmanager
def select_override(settings: dict):
    """Inside the block, ``topk_select_triton.SELECT_OVERRIDE`` holds exactly ``settings`` but ``list_m``, which
    goes to ``topk_attention_triton.CONFIG_OVERRIDE`` (queries per selection program); both put back after."""
    saved = dict(tsel.SELECT_OVERRIDE), dict(tat.CONFIG_OVERRIDE)
    tsel.SELECT_OVERRIDE.clear()
    tsel.SELECT_OVERRIDE.update({name: value for name, value in settings.items() if name != "list_m"})
    if "list_m" in settings:
        tat.CONFIG_OVERRIDE["list_m"] = settings["list_m"]
    try:
        yield
    finally:
        for overrides, values in zip((tsel.SELECT_OVERRIDE, tat.CONFIG_OVERRIDE), saved):
            overrides.clear()
            overrides.update(values)


def select_label(settings: dict) -> str:
    """How a row of the select phase names its setting: ``default`` or ``<scores_per_program>/<num_warps>``, then
    ``/<list_m>`` and ``/<top-k algorithm>`` when the setting has them."""
    if not settings:
        return "default"
    names = ("scores_per_program", "num_warps", "list_m", "top_k")
    return "/".join(str(settings[name]) for name in names if name in settings)


def select_numbers(q, k, pattern: TopKPattern, device: str, clock: Clock, expected) -> dict:
    """The selection under the current ``SELECT_OVERRIDE``: ``equal`` (outputs bitwise ``expected``'s; ``None``
    without them), ``ms``, and on CUDA ``kernels_ms`` (each kernel's time, torch.profiler)."""
    out = select(q, k, pattern)  # compiles the launch when it is new
    numbers = {"equal": None if expected is None else all(torch.equal(a, b) for a, b in zip(out, expected))}
    out = None
    run = functools.partial(select, q, k, pattern)
    numbers["ms"] = clock.ms(run, SELECT_REP_MS)
    if device == "cuda":
        try:
            numbers["kernels_ms"] = common.kernel_times(run)
        except Exception as error:  # the profiler's API moves between torch versions
            numbers["kernels_ms"] = repr(error)[:200]
    return numbers


def select_launch_of(settings: dict, nb_pad: int, block: int) -> tuple[int, int, int, str]:
    """``(list_m, SEL_M, warps, top-k algorithm)`` of the selection's kernels under ``settings``
    (``topk_select_triton.select_launch``) for bf16 inputs in blocks of ``block``."""
    with select_override(settings):
        config = tat._config(torch.bfloat16, block)
        return (config["list_m"], *tsel.select_launch(nb_pad, config["list_m"], config.get("sel_m")))


def _compile_select(conn, sizes: dict, seq_len: int, score: str, settings: dict, device: str) -> None:
    """Process of ``precompile_select``: one selection under ``settings`` at the select phase's shapes (zeros: the
    kernels specialize on shapes and strides only), which compiles its kernels into Triton's on-disk cache;
    sends ``None``, or the error."""
    os.setpgrp()  # a group of its own: stopping it stops the ptxas it runs too
    try:
        q = torch.zeros(1, sizes["heads"], seq_len, sizes["head_dim"], device=device, dtype=torch.bfloat16)
        with select_override(settings):
            select(q, q, prefill_pattern(sizes, seq_len, score))
        if device == "cuda":
            torch.cuda.synchronize()
        conn.send(None)
    except Exception as error:
        conn.send(repr(error)[:500])


def precompile_select(sizes: dict, device: str, jobs: int, tasks: dict, score: str, timeout_s: float) -> dict:
    """Compile the launches ``tasks`` (``{(seq_len, (list_m, SEL_M, warps, top-k algorithm)): settings}``) in up to
    ``jobs`` processes at once, so that the sweep finds them in Triton's on-disk cache -> ``{task: None, or why it is
    not compiled}``; compiles still running after ``timeout_s`` are stopped."""
    begin = time.time()
    log(f"select: compiling {len(tasks)} launches, {jobs} at a time (at most {timeout_s:.0f} s)")
    spawn = multiprocessing.get_context("spawn")  # CUDA does not survive a fork
    waiting, running, out = list(tasks.items()), {}, {}

    def done(task, why):
        out[task] = why
        list_m, sel_m, warps, algorithm = task[1]
        log(f"select T={task[0]} list_m {list_m} SEL_M {sel_m} warps {warps} top_k {algorithm}: {why or 'compiled'} "
            f"({time.time() - begin:.0f} s)")

    try:
        while (waiting or running) and time.time() - begin < timeout_s:
            while waiting and len(running) < jobs:
                task, settings = waiting.pop(0)
                receive, send = spawn.Pipe(duplex=False)
                process = spawn.Process(target=_compile_select, args=(send, sizes, task[0], score, settings, device))
                process.start()
                running[task] = (process, receive)
            for task, (process, receive) in list(running.items()):
                alive = process.is_alive()  # before the poll: a process that ended has sent what it sent
                if receive.poll():
                    done(task, receive.recv())
                elif not alive:
                    done(task, f"its compile process ended with exit code {process.exitcode}")
                else:
                    continue
                process.join()
                del running[task]
            time.sleep(0.2)
    finally:
        for task, (process, _) in running.items():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.kill()
            process.join()
            done(task, f"not compiled: its compile ran past {timeout_s:.0f} s (stopped)")
        for task, _ in waiting:
            done(task, f"not compiled: not started within {timeout_s:.0f} s")
    return out


def bench_select(sizes: dict, device: str, clock: Clock, scores=SCORES, scores_per_program=None,
                 warps=None, jobs: int = 0, list_m=None, top_k_algorithms=None) -> list[dict]:
    """The select phase (module docstring): the default launch, then the grid ``scores_per_program`` x ``warps``
    (default: the sizes' ``select`` grid) of ``SELECT_OVERRIDE`` settings, x ``list_m`` (queries per selection
    program) when given, x ``top_k_algorithms`` (of ``topk_select_triton.TOP_K_ALGORITHMS``: ``SELECT_OVERRIDE``'s
    ``top_k``) when given, for each length and score. ``jobs``: on CUDA, first compile every launch in that many
    processes at once (``precompile_select``)."""
    grid = [{}] + [dict(scores_per_program=n, num_warps=w, **({} if m is None else {"list_m": m}),
                        **({} if a is None else {"top_k": a}))
                   for n in scores_per_program or sizes["select"]["scores_per_program"]
                   for w in warps or sizes["select"]["num_warps"] for m in list_m or (None,)
                   for a in top_k_algorithms or (None,)]
    compile_s = SELECT_COMPILE_S if device == "cuda" else 0
    compiles = {}  # (seq_len, launch) -> None (compiled) or why not; the score is a runtime flag of the kernels
    if device == "cuda" and jobs > 0:
        tasks = {}
        for seq_len in sizes["seq_lens"]:
            nb_pad = tsel.blocks_padded(triton.cdiv(seq_len, sizes["block"]))
            for settings in grid:
                with contextlib.suppress(ValueError):  # a bad setting: its rows say why
                    tasks.setdefault((seq_len, select_launch_of(settings, nb_pad, sizes["block"])), settings)
        timeout_s = min(SELECT_COMPILE_TIMEOUT_S, clock.left() - 120)  # leaves two minutes for the timings
        if timeout_s >= 30 and tasks:
            compiles = precompile_select(sizes, device, jobs, tasks, scores[0], timeout_s)
        else:
            log(f"select: no parallel compile ({timeout_s:.0f} s of budget for it): each launch compiles in turn")
    rows_out = []
    for seq_len in sizes["seq_lens"]:
        if clock.left() < 8 + compile_s:
            log(f"select T={seq_len}: skipped (budget)")
            continue
        q, k, _ = prefill_inputs(sizes, "iid", seq_len, device)
        nb_pad = tsel.blocks_padded(triton.cdiv(seq_len, sizes["block"]))
        compiled = {launch for (t, launch), error in compiles.items() if t == seq_len and error is None}
        failed = {launch: error for (t, launch), error in compiles.items() if t == seq_len and error is not None}
        for score in scores:
            pattern = prefill_pattern(sizes, seq_len, score)
            expected = default_ms = None  # the default's outputs and time
            measured = {}  # (list_m, SEL_M, warps, top-k algorithm) -> (label of the first row with it, its numbers)
            for settings in grid:
                label = select_label(settings)
                row = {"seq_len": seq_len, "score": score, "top_k": pattern.top_k, "setting": label,
                       "scores_per_program": settings.get("scores_per_program", tsel._SCORES_PER_PROGRAM),
                       "same_launch_as": None}
                head = f"select T={seq_len} {score:7s} {label:>13s}"
                launch = None
                try:
                    launch = select_launch_of(settings, nb_pad, sizes["block"])
                    row["list_m"], row["sel_m"], row["num_warps"], row["top_k_algorithm"] = launch
                    if launch in failed:
                        raise RuntimeError(failed[launch])
                    if launch in measured:  # the same compiled kernels: their numbers again
                        row["same_launch_as"], numbers = measured[launch]
                    elif clock.left() < 8 + (0 if launch in compiled else compile_s):
                        log(f"{head}: skipped (budget)")
                        continue
                    else:
                        compiled.add(launch)
                        with select_override(settings):
                            if not settings:  # the default comes first: every other row's reference
                                expected = select(q, k, pattern)
                            numbers = select_numbers(q, k, pattern, device, clock, expected)
                        measured[launch] = (label, numbers)
                    row.update(numbers)
                except Exception as error:  # report and go on
                    row["error"] = repr(error)[:500]
                    if launch is not None and launch not in failed:  # a launch that fails once is not run again
                        failed[launch] = row["error"]
                        log(traceback.format_exc())
                if not settings:
                    default_ms = row.get("ms")
                if "ms" in row and default_ms:
                    row["vs_default"] = row["ms"] / default_ms
                rows_out.append(row)
                if "error" in row:
                    log(f"{head}: error {row['error'][:200]}")
                else:
                    log(f"{head}: list_m {row['list_m']:>3} SEL_M {row['sel_m']:>3} warps {row['num_warps']:>2} "
                        f"top_k {row['top_k_algorithm']}: {row['ms']:8.3f} ms"
                        + (f" = {row['vs_default']:.2f}x default" if "vs_default" in row else "")
                        + f", equal {row['equal']}"
                        + (f" (same launch as {row['same_launch_as']})" if row["same_launch_as"] else ""))
            expected = None
        q = k = None
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows_out


def kernel_ms(row: dict, name: str) -> float:
    """Milliseconds of the kernels named ``name`` in a row's ``kernels_ms`` (NaN without them)."""
    times = row.get("kernels_ms")
    picked = [ms for kernel, ms in times if kernel == name] if isinstance(times, list) else []
    return sum(picked) if picked else float("nan")


def print_table(results: dict) -> None:
    if "prefill" in results:
        log("\nprefill (B=1, 16 x 128 heads, bf16): ms and speedup over dense causal SDPA")
        log(f"{'T':>6} {'inputs':>9} {'score':>7} {'work':>6} {'select':>7} {'share':>6} {'fwd':>8} {'x SDPA':>7} "
            f"{'fwd+bwd':>8} {'x SDPA':>7}")
        for r in results["prefill"]:
            if "fwd_ms" in r:
                log(f"{r['seq_len']:>6} {r['inputs']:>9} {r['score']:>7} {r['work_ratio']:>6.2f} "
                    f"{r['select_ms']:>7.3f} {r['select_share']:>6.2f} {r['fwd_ms']:>8.3f} "
                    f"{r['fwd_speedup_vs_sdpa']:>7.2f} {r['fwd_bwd_ms']:>8.3f} {r['fwd_bwd_speedup_vs_sdpa']:>7.2f}")
    if "decode" in results:
        log("decode (one step): top-k over the dilated flat kernel at the same rows read")
        for r in results["decode"]:
            log(f"  ctx {r['context']:>6} batch {r['batch']} rows {r['rows_read']}: dilated {r['dilated_ms']:.3f} ms; "
                + ", ".join(f"{s} {r[f'{s}_ms']:.3f} ms = {r[f'{s}_vs_dilated']:.2f}x" for s in SCORES
                            if f"{s}_ms" in r))
    if "select" in results:
        log("\nselect (topk_select alone, iid inputs): ms per setting (scores per program / warps [/ list_m] "
            "[/ top-k algorithm]); kernels: _select_kernel, _pair_list_kernel (CUDA)")
        log(f"{'T':>6} {'score':>7} {'setting':>13} {'list_m':>6} {'SEL_M':>5} {'warps':>5} {'top_k':>6} {'ms':>8} "
            f"{'x dflt':>6} {'select':>8} {'pairs':>8} {'equal':>5}  same launch as")
        for r in results["select"]:
            if "error" in r:
                log(f"{r['seq_len']:>6} {r['score']:>7} {r['setting']:>13}  error: {r['error'][:150]}")
                continue
            log(f"{r['seq_len']:>6} {r['score']:>7} {r['setting']:>13} {r['list_m']:>6} {r['sel_m']:>5} {r['num_warps']:>5} "
                f"{r['top_k_algorithm']:>6} {r['ms']:>8.3f} {r.get('vs_default', float('nan')):>6.2f} "
                f"{kernel_ms(r, '_select_kernel'):>8.3f} {kernel_ms(r, '_pair_list_kernel'):>8.3f} {str(r['equal']):>5}  "
                f"{r['same_launch_as'] or ''}")


def bench_topk(results: dict, tiny: bool = False, budget: float = 88.0, start: float | None = None,
               phases=DEFAULT_PHASES, inputs=INPUTS, scores=SCORES, seq_lens: tuple[int, ...] | None = None,
               select_scores: tuple[int, ...] | None = None, select_warps: tuple[int, ...] | None = None,
               select_jobs: int = 0, select_list_m: tuple[int, ...] | None = None,
               select_top_k: tuple[str, ...] | None = None) -> None:
    """Fill ``results`` with the phases' rows (see the module docstring); stops starting work near ``budget`` s.
    ``seq_lens``, ``select_scores``, ``select_warps``: in place of the sizes' lengths and select grid;
    ``select_jobs``, ``select_list_m``, ``select_top_k``: processes that compile the select phase's launches at
    once, its queries per selection program, its top-k algorithms (``bench_select``)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = dict(TINY if tiny else FULL)
    if seq_lens:
        sizes["seq_lens"] = tuple(seq_lens)
    clock = Clock(device, time.time() if start is None else start, budget)
    results.update(tiny=tiny, sizes={k: v for k, v in sizes.items() if k not in ("check", "select")}, budget_s=budget)
    if "check" in phases:
        results["check"] = check(sizes, device)
    if "decode" in phases:
        results["decode"] = bench_decode(sizes, device, clock, scores)
    if "prefill" in phases:
        results["prefill"] = bench_prefill(sizes, device, clock, inputs, scores)
    if "select" in phases:
        results["select"] = bench_select(sizes, device, clock, scores, select_scores, select_warps, select_jobs,
                                         select_list_m, select_top_k)
    results["elapsed_s"] = time.time() - clock.start


def main(argv: list[str] | None = None) -> int:
    start = time.time()
    parser = argparse.ArgumentParser(prog="python -m bench.topk", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=common.out_dir(), help="output folder (default: $OUT or bench/results)")
    parser.add_argument("--phases", type=cli.comma_list(cli.one_of(PHASES)), default=list(DEFAULT_PHASES),
                        help=f"comma-separated, of {', '.join(PHASES)} (default: {','.join(DEFAULT_PHASES)})")
    parser.add_argument("--inputs", default=",".join(INPUTS), help=f"prefill input kinds, comma-separated: {INPUTS}")
    parser.add_argument("--scores", default=",".join(SCORES), help=f"decode, prefill and select scores: {SCORES}")
    parser.add_argument("--seq-lens", type=cli.comma_list(cli.positive_int), default=None,
                        help="decode contexts and prefill / select lengths, comma-separated (default: "
                             f"{','.join(map(str, FULL['seq_lens']))}; --tiny: {','.join(map(str, TINY['seq_lens']))})")
    parser.add_argument("--select-scores", type=cli.comma_list(cli.positive_int), default=None,
                        help="select: SELECT_OVERRIDE scores_per_program values, powers of two >= 16 (default: "
                             f"{','.join(map(str, FULL['select']['scores_per_program']))}; --tiny: "
                             f"{','.join(map(str, TINY['select']['scores_per_program']))})")
    parser.add_argument("--select-warps", type=cli.comma_list(cli.positive_int), default=None,
                        help="select: SELECT_OVERRIDE num_warps values, of 1, 2, 4, 8, 16, 32 (default: "
                             f"{','.join(map(str, FULL['select']['num_warps']))}; --tiny: "
                             f"{','.join(map(str, TINY['select']['num_warps']))})")
    parser.add_argument("--select-list-m", type=cli.comma_list(cli.positive_int), default=None,
                        help="select: also sweep these queries per selection program (list_m of "
                             "topk_attention_triton.CONFIG_OVERRIDE; powers of two >= 16; default: only the "
                             f"config's, {tat._GPU_CONFIG['list_m']} on a GPU)")
    parser.add_argument("--select-top-k", type=cli.comma_list(cli.one_of(tsel.TOP_K_ALGORITHMS)), default=None,
                        help="select: also sweep these top-k algorithms of _select_kernel (SELECT_OVERRIDE top_k), "
                             f"of {', '.join(tsel.TOP_K_ALGORITHMS)}: radix (the default's radix search), sorted "
                             "(bitonic top-k, the same picks); e.g. radix,sorted times both side by side (default: "
                             "only the default's)")
    parser.add_argument("--select-jobs", type=int, default=len(os.sched_getaffinity(0)),
                        help="select, on CUDA: first compile the sweep's launches in this many processes at once "
                             "(default: the cores; 0: each launch compiles in turn, in the sweep)")
    parser.add_argument("--budget", type=float, default=88.0,
                        help="seconds: work that would not fit is skipped (the select phase at full size: "
                             "give it 500)")
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
        bench_topk(results, args.tiny, args.budget, start, args.phases, tuple(args.inputs.split(",")),
                   tuple(args.scores.split(",")), args.seq_lens, args.select_scores, args.select_warps,
                   args.select_jobs, args.select_list_m, args.select_top_k)
    finally:
        common.write_json(path, results)
        print_table(results)
        log(f"wrote {path} ({time.time() - start:.0f} s)")
    return 0 if math.isfinite(results.get("elapsed_s", float("nan"))) else 1


if __name__ == "__main__":
    sys.exit(main())
