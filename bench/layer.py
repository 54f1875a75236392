"""``python -m bench.layer``: one whole RAT+ 1B sequence layer against the same layer without the recurrence.

Acceptance item: a whole RAT+ 1B layer (norm -> projections -> scan -> rope -> attention -> gate
-> out) forward+backward at T=4096 within 1.15x of the same layer with the recurrence removed
(the attention baseline), so the recurrence costs little.

What is timed, exactly:

- The model's own ``RATPlusLayer`` (the sequence/mixer sub-block of one ``RATPlusBlock``:
  input RMSNorm, fused ``in_proj``, gated recurrence, RoPE, pattern attention, output gate,
  ``out_proj`` and the residual add; no FFN), built from the 1B flavor's args. RAT+ is
  ``apply_re=True``; the baseline is the same args with ``apply_re=False`` (what
  ``train_configs/attention_1b.toml`` trains): its ``in_proj`` has no forget-gate rows
  (``d -> 4d`` instead of ``d -> 5d``) and the recurrence call is skipped. Everything else --
  width, heads, norm, RoPE, attention backend and pattern (dense: causal SDPA) -- is the same;
  ``check_only_recurrence_differs`` verifies this before any timing (and the JSON records it).
- bf16 parameters and activations (``module.to(bfloat16)``: what FSDP's ``param_dtype=bfloat16``
  computes with); the RoPE table stays fp32 as the model's buffer does. Weights normal(0, 0.02).
- Input ``x [B, T, d]`` bf16 random with ``requires_grad`` (a block input inside the model needs
  its gradient), ``B=8, T=4096`` (32K tokens). fwd+bwd = ``layer(x, cos_sin).backward(g)`` with a
  fixed random ``g``, gradients reset to None each call (as after ``zero_grad``). fwd = the
  forward alone with autograd on (the training forward). No activation checkpointing.
- Modes: ``eager`` and ``compile`` (``torch.compile(layer, fullgraph=True)``, as torchtitan's
  ``apply_compile`` does per block). Times: median of ``triton.testing.do_bench`` (CUDA events,
  L2 flushed), the two layers measured alternately for ``--rounds`` rounds, the lowest median kept.
- Ratio RAT+ / baseline per mode (goal <= 1.15), for fwd+bwd and fwd.
- Parts: the recurrence op alone (``gated_recurrence`` on the strided views of a fused
  ``[B, T, H, 5, hd]`` projection, fwd and fwd+bwd) and ``in_proj`` alone (5d vs 4d rows, fwd+bwd),
  as shares of the eager RAT+ layer.
- Extra rows: the RAT+ layer with the sparse prefill patterns (default d16w256s4, d64w256s4),
  eager then compiled, against the dense baseline of the same mode.

``--deadline`` seconds: phases that would not fit are skipped, and a watchdog saves the JSON and
exits when the time is up. ``--device cpu --tiny`` is a CPU smoke run (debugmodel-like dims, T=64).
Writes ``layer_<device>.json`` into ``--out`` (default ``$OUT`` when set, else ``bench/results``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from unittest import mock

_START = time.time()  # the deadline counts from here, before torch's import

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.common import log  # noqa: E402

common.import_without_train_spec()

from ratplus_titan.model import model as model_module  # noqa: E402
from ratplus_titan.model.args import RATPlusModelArgs  # noqa: E402
from ratplus_titan.model.model import RATPlusLayer, rope_cache  # noqa: E402
from ratplus_titan.pattern import Pattern  # noqa: E402

GOAL = 1.15
FULL = dict(flavor="1B", batch=8, seq_len=4096, patterns=("d16w256s4", "d64w256s4"))
TINY = dict(dim=256, n_heads=4, batch=2, seq_len=64, patterns=("d8w16s2",))  # debugmodel width, T=64


# ---- results, saved incrementally and by the watchdog -----------------------------------------------
class Results:
    def __init__(self, path: Path):
        self.path, self.data, self.lock = path, {}, threading.RLock()

    def save(self) -> None:
        with self.lock:
            for _ in range(20):  # the watchdog thread may catch the main thread mid-update: retry
                try:
                    common.write_json(self.path, self.data)
                    return
                except RuntimeError:
                    time.sleep(0.05)


def start_watchdog(results: Results, seconds: float) -> threading.Timer:
    def fire():
        log(f"DEADLINE near (watchdog after {seconds:.0f} s): saving what there is and exiting")
        with results.lock:
            results.data["deadline_hit"] = True
        results.save()
        try:
            print_table(results.data)
        except Exception as error:  # a half-filled result: the JSON is what counts
            log(f"(no table: {error!r})")
        log(f"wrote {results.path}")
        os._exit(0)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


# ---- the two layers -------------------------------------------------------------------------------
def layer_args(tiny: bool, apply_re: bool) -> RATPlusModelArgs:
    """The 1B flavor's args (or debugmodel-like tiny ones), with ``apply_re`` set: the only difference."""
    if tiny:
        return RATPlusModelArgs(
            dim=TINY["dim"], n_layers=1, n_heads=TINY["n_heads"], max_seq_len=TINY["seq_len"], apply_re=apply_re
        )
    from ratplus_titan.model.flavors import ratplus_flavors

    base = ratplus_flavors[FULL["flavor"]]
    return RATPlusModelArgs(
        dim=base.dim, n_layers=base.n_layers, n_heads=base.n_heads, vocab_size=base.vocab_size,
        ffn_multiplier=base.ffn_multiplier, norm_eps=base.norm_eps, rope_theta=base.rope_theta,
        max_seq_len=FULL["seq_len"], init_std=base.init_std, apply_re=apply_re,
        attention_backend=base.attention_backend,
    )  # fmt: skip


def build_layer(args: RATPlusModelArgs, device, dtype, seed: int = 0) -> RATPlusLayer:
    """Layer 0 of a model with ``args`` (dense training pattern), initialised as ``init_weights`` does."""
    torch.manual_seed(seed)
    layer = RATPlusLayer(args, args.patterns[0])
    for module in layer.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=args.init_std)
        elif isinstance(module, torch.nn.RMSNorm):
            torch.nn.init.ones_(module.weight)
    return layer.to(device=device, dtype=dtype)


def recurrence_param_count(dim: int) -> int:
    """What the recurrence adds, from the dims alone: the forget-gate rows of ``in_proj`` (d x d, no bias)."""
    return dim * dim


def check_only_recurrence_differs(dim: int, n_heads: int, seq_len: int, device) -> dict:
    """Build both layers at (dim, n_heads) and show that they differ by the recurrence only.

    1. same parameter names; same shapes except ``in_proj.weight`` (5d vs 4d rows); parameter
       difference = ``recurrence_param_count(dim)``; same pattern and attention backend;
    2. with the RAT+ layer's o, q, k, x rows copied from the baseline and the recurrence replaced
       by the identity (K = k, V = x), the two give the same output (fp32);
    3. with the real recurrence they differ (it is active in the RAT+ layer).
    """
    args_re = RATPlusModelArgs(dim=dim, n_layers=1, n_heads=n_heads, max_seq_len=seq_len, apply_re=True)
    args_base = RATPlusModelArgs(dim=dim, n_layers=1, n_heads=n_heads, max_seq_len=seq_len, apply_re=False)
    ratplus = build_layer(args_re, device, torch.float32, seed=1)
    base = build_layer(args_base, device, torch.float32, seed=2)
    shapes_re = {n: tuple(p.shape) for n, p in ratplus.named_parameters()}
    shapes_base = {n: tuple(p.shape) for n, p in base.named_parameters()}
    differing = sorted(n for n in shapes_re if shapes_re[n] != shapes_base.get(n))
    n_re, n_base = (sum(p.numel() for p in m.parameters()) for m in (ratplus, base))
    heads, head_dim = n_heads, dim // n_heads
    with torch.no_grad():
        ratplus.input_norm.weight.copy_(1 + 0.1 * torch.randn_like(ratplus.input_norm.weight))
        base.input_norm.weight.copy_(ratplus.input_norm.weight)
        ratplus.out_proj.weight.copy_(base.out_proj.weight)
        # in_proj rows are head-interleaved [head][part][hd]; parts o, q, k, x (, f)
        ratplus.in_proj.weight.view(heads, 5, head_dim, dim)[:, :4] = base.in_proj.weight.view(heads, 4, head_dim, dim)
    gen = torch.Generator(device="cpu").manual_seed(3)
    x = torch.randn(2, seq_len, dim, generator=gen).to(device)
    cos_sin = rope_cache(head_dim, seq_len, args_re.rope_theta, device=device)
    with torch.no_grad():
        out_base = base(x, cos_sin)
        out_re = ratplus(x, cos_sin)
        with mock.patch.object(model_module, "gated_recurrence", lambda f, k, v: (k, v)):
            out_identity = ratplus(x, cos_sin)
    # compare the sub-layer's contribution (output minus the residual input)
    mixed_base = out_base - x
    identity_err = ((out_identity - x - mixed_base).norm() / mixed_base.norm()).item()
    recurrence_effect = ((out_re - x - mixed_base).norm() / mixed_base.norm()).item()
    report = {
        "param_names_equal": sorted(shapes_re) == sorted(shapes_base),
        "params_differing_in_shape": differing,
        "in_proj_rows": [shapes_re["in_proj.weight"][0], shapes_base["in_proj.weight"][0]],
        "params_ratplus": n_re,
        "params_baseline": n_base,
        "param_difference": n_re - n_base,
        "param_difference_expected": recurrence_param_count(dim),
        "same_pattern": str(ratplus.pattern) == str(base.pattern),
        "same_attention_backend": ratplus.attention_backend == base.attention_backend,
        "identity_recurrence_rel_err": identity_err,
        "real_recurrence_rel_change": recurrence_effect,
    }
    report["ok"] = (
        report["param_names_equal"]
        and differing == ["in_proj.weight"]
        and report["param_difference"] == report["param_difference_expected"]
        and report["same_pattern"]
        and report["same_attention_backend"]
        and identity_err < 1e-4
        and recurrence_effect > 0.05
    )
    return report


# ---- timing -----------------------------------------------------------------------------------------
def make_timer(device: str, quick: bool):
    """Median ms of a call (``common.do_bench``): shorter runs for the tiny smoke run."""
    warmup, rep = (10, 40) if quick else (50, 300)
    return lambda fn: common.do_bench(fn, warmup_ms=warmup, rep_ms=rep, device=device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_fns(module, params, x, cos_sin, grad):
    """``fwd`` (autograd on, output dropped) and ``fwd_bwd`` (gradients reset to None first)."""

    def clear():
        x.grad = None
        for p in params:
            p.grad = None

    def fwd():
        module(x, cos_sin)

    def fwd_bwd():
        clear()
        module(x, cos_sin).backward(grad)

    return fwd, fwd_bwd, clear


def peak_memory_gib(fn, clear, device: str) -> float | None:
    """Peak memory of ``fn()`` above what was allocated before it (gradients cleared first), GiB."""
    clear()
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def layer_flops(dim: int, seq_len: int, batch: int, apply_re: bool, pattern: Pattern) -> float:
    """Forward FLOPs of one layer: matmuls, attention under ``pattern`` (QK^T and PV), recurrence."""
    args = RATPlusModelArgs(dim=dim, n_layers=1, n_heads=1, max_seq_len=seq_len, apply_re=apply_re)
    tokens = batch * seq_len
    matmul = 2 * tokens * dim * ((5 if apply_re else 4) * dim + dim)
    attention = 4 * dim * args.attention_pairs(seq_len, pattern) * tokens
    recurrence = 10 * dim * tokens if apply_re else 0
    return matmul + attention + recurrence


# ---- main -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.layer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=common.out_dir(), help="output folder (default: $OUT or bench/results)")
    parser.add_argument(
        "--deadline", type=float, default=200.0, help="seconds: skip what does not fit, then save and exit"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="debugmodel-like dims, T=64 (CPU smoke test)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--modes", default=None, help="comma list of eager,compile (default: both; tiny: eager)")
    parser.add_argument(
        "--patterns", default=None, help="comma list of sparse patterns for extra RAT+ rows ('' for none)"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternate the two layers this many times, keep the lowest median"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device; use --device cpu --tiny")
    results = Results(Path(args.out) / f"layer_{common.device_slug(args.device)}.json")
    # The deadline counts from process start on the command line, from this call for in-process callers.
    start = _START if argv is None else time.time()
    # the watchdog fires a little before the deadline, so that the save lands in time
    budget = args.deadline - min(10.0, 0.05 * args.deadline)
    watchdog = start_watchdog(results, max(1.0, budget - (time.time() - start)))
    try:
        return run(args, results, start, budget)
    finally:
        watchdog.cancel()  # an in-process caller (the tests) must not be shot later


def run(args: argparse.Namespace, results: Results, start: float, budget: float) -> int:
    device, dtype = args.device, torch.bfloat16
    batch = args.batch or (TINY if args.tiny else FULL)["batch"]
    seq_len = args.seq_len or (TINY if args.tiny else FULL)["seq_len"]
    modes = (args.modes or ("eager" if args.tiny else "eager,compile")).split(",")
    specs = (
        (TINY if args.tiny else FULL)["patterns"]
        if args.patterns is None
        else [p for p in args.patterns.split(",") if p]
    )
    sparse = [Pattern.parse(spec) for spec in specs]

    left = lambda: budget - (time.time() - start)  # noqa: E731

    args_re, args_base = layer_args(args.tiny, True), layer_args(args.tiny, False)
    args_re.max_seq_len = args_base.max_seq_len = seq_len
    dim, n_heads, head_dim = args_re.dim, args_re.n_heads, args_re.head_dim
    data = results.data
    data.update(
        bench="layer",
        goal="RAT+ layer fwd+bwd <= 1.15 x attention-baseline layer (apply_re=false), T=4096",
        env=common.environment(device),
        tiny=args.tiny,
        dtype=str(dtype).removeprefix("torch."),
        shape={"batch": batch, "seq_len": seq_len, "dim": dim, "n_heads": n_heads, "head_dim": head_dim,
               "tokens": batch * seq_len, "flavor": "tiny(debugmodel dims)" if args.tiny else FULL["flavor"]},
        layers={
            "ratplus": {"apply_re": True, "attention_backend": args_re.attention_backend, "pattern": str(args_re.patterns[0])},
            "baseline": {"apply_re": False, "attention_backend": args_base.attention_backend, "pattern": str(args_base.patterns[0])},
        },
        timing="median ms of triton.testing.do_bench (CUDA) / perf_counter (CPU); lowest median over rounds",
        notes="sequence sub-block only (norm, in_proj, [recurrence], rope, attention, gate, out_proj, residual); "
              "no FFN, no activation checkpointing; bf16 params and activations, fp32 RoPE table",
        rows=[],
        skipped=[],
    )  # fmt: skip
    log(f"device {data['env']['device']}, torch {torch.__version__}, triton {data['env']['triton']}; "
        f"B={batch} T={seq_len} d={dim} H={n_heads}x{head_dim} {data['dtype']}; modes {modes}; deadline {args.deadline:.0f} s")  # fmt: skip

    # 1. the two layers differ by the recurrence only (fp32, small, on the bench device)
    try:
        check = check_only_recurrence_differs(TINY["dim"] if args.tiny else dim, n_heads, 64, device)
        data["equivalence_check"] = check
        log(f"check: only the recurrence differs: {'ok' if check['ok'] else 'FAIL'} "
            f"(param diff {check['param_difference']} = d^2 {check['param_difference_expected']}, "
            f"identity-recurrence rel err {check['identity_recurrence_rel_err']:.1e}, "
            f"real recurrence changes the output by {check['real_recurrence_rel_change']:.2e})")  # fmt: skip
    except Exception as error:
        data["equivalence_check"] = {"ok": False, "error": repr(error)[:500]}
        log(traceback.format_exc())
    results.save()

    # 2. the benchmark layers and inputs
    layers = {"ratplus": build_layer(args_re, device, dtype), "baseline": build_layer(args_base, device, dtype)}
    params = {name: list(layer.parameters()) for name, layer in layers.items()}
    data["layers"]["ratplus"]["params"] = sum(p.numel() for p in params["ratplus"])
    data["layers"]["baseline"]["params"] = sum(p.numel() for p in params["baseline"])
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, seq_len, dim, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    grad = torch.randn(batch, seq_len, dim, generator=gen).to(device=device, dtype=dtype)
    cos_sin = rope_cache(head_dim, seq_len, args_re.rope_theta, device=device)
    timer = make_timer(device, quick=args.tiny)
    dense = Pattern()
    flops = {name: layer_flops(dim, seq_len, batch, name == "ratplus", dense) for name in layers}
    data["fwd_flops"] = flops
    data["flop_ratio_ratplus_over_baseline"] = flops["ratplus"] / flops["baseline"]

    def add_row(row: dict) -> dict:
        with results.lock:
            data["rows"].append(row)
        results.save()
        return row

    def measure(mode: str, names: list[str], pattern: Pattern | None, compiled: dict) -> list[dict]:
        """Time fwd and fwd+bwd of ``names`` (alternating over rounds) in ``mode`` under ``pattern``."""
        rows = {}
        for name in names:
            layer = layers[name]
            layer.pattern = dense if pattern is None else pattern
            module = compiled.get(name, layer)
            row = {"layer": name, "mode": mode, "pattern": str(layer.pattern)}
            first = time.time()
            fwd, fwd_bwd, clear = step_fns(module, params[name], x, cos_sin, grad)
            fwd_bwd()  # first call: compile (compile mode), Triton JIT, allocator warm-up
            fwd()
            sync(device)
            row["first_call_s"] = time.time() - first
            row["peak_mem_fwd_bwd_gib"] = peak_memory_gib(fwd_bwd, clear, device)
            clear()
            row["fwd_ms_rounds"], row["fwd_bwd_ms_rounds"] = [], []
            rows[name] = row
        for _ in range(args.rounds):
            for name in names:
                layers[name].pattern = dense if pattern is None else pattern
                fwd, fwd_bwd, clear = step_fns(compiled.get(name, layers[name]), params[name], x, cos_sin, grad)
                rows[name]["fwd_ms_rounds"].append(timer(fwd))
                rows[name]["fwd_bwd_ms_rounds"].append(timer(fwd_bwd))
                clear()
        for name, row in rows.items():
            row["fwd_ms"], row["fwd_bwd_ms"] = min(row["fwd_ms_rounds"]), min(row["fwd_bwd_ms_rounds"])
            layer_flop = layer_flops(dim, seq_len, batch, name == "ratplus", layers[name].pattern)
            row["fwd_bwd_tflops"] = 3 * layer_flop / row["fwd_bwd_ms"] / 1e9
            log(f"  {mode:7s} {name:8s} {row['pattern']:10s} fwd {row['fwd_ms']:8.3f} ms  fwd+bwd {row['fwd_bwd_ms']:8.3f} ms  "
                f"({row['fwd_bwd_tflops']:.0f} TFLOP/s, first call {row['first_call_s']:.1f} s)")  # fmt: skip
            add_row(row)
        for layer in layers.values():
            layer.pattern = dense
        return list(rows.values())

    def compiled_layers(names):
        return {name: torch.compile(layers[name], fullgraph=True) for name in names}

    compile_estimate = [40.0]  # seconds for one layer's first fwd+bwd under compile; updated once seen
    ratios = data.setdefault("ratios", {})

    def phase(label: str, need_s: float, fn) -> None:
        if left() < need_s:
            data["skipped"].append(f"{label} (needs ~{need_s:.0f} s, {left():.0f} s left)")
            log(f"skip {label}: needs ~{need_s:.0f} s, {left():.0f} s left")
            results.save()
            return
        log(f"{label} ({left():.0f} s left)")
        try:
            fn()
        except Exception as error:
            data.setdefault("errors", []).append({"phase": label, "error": repr(error)[:800]})
            log(traceback.format_exc())
        results.save()

    def dense_rows(mode: str) -> None:
        compiled = compiled_layers(layers) if mode == "compile" else {}
        rows = {row["layer"]: row for row in measure(mode, ["baseline", "ratplus"], None, compiled)}
        if mode == "compile":
            compile_estimate[0] = max(row["first_call_s"] for row in rows.values())
        ratio = {key: rows["ratplus"][key] / rows["baseline"][key] for key in ("fwd_bwd_ms", "fwd_ms")}
        ratios[mode] = {
            "fwd_bwd": ratio["fwd_bwd_ms"],
            "fwd": ratio["fwd_ms"],
            "meets_goal": ratio["fwd_bwd_ms"] <= GOAL,
        }
        log(f"  {mode}: RAT+/baseline fwd+bwd {ratio['fwd_bwd_ms']:.3f}x, fwd {ratio['fwd_ms']:.3f}x "
            f"(goal <= {GOAL}: {'met' if ratio['fwd_bwd_ms'] <= GOAL else 'NOT met'})")  # fmt: skip

    def parts() -> None:
        """The recurrence op alone on the layer's strided views; in_proj alone (5d vs 4d)."""
        from ratplus_titan.kernels.recurrence_dispatch import gated_recurrence

        # strided [B, T, H, hd] views of one fused projection output, as the layer hands them over
        fused = torch.randn(batch, seq_len, n_heads, 5, head_dim, device=device, dtype=dtype)
        gate, key, value = (fused[..., i, :].detach().requires_grad_(True) for i in (4, 2, 3))
        gk, gv = torch.randn(2, batch, seq_len, n_heads, head_dim, device=device, dtype=dtype)

        def scan_fwd():
            with torch.no_grad():
                gated_recurrence(gate, key, value)

        def scan_fwd_bwd():
            states = gated_recurrence(gate, key, value)
            torch.autograd.grad(states, (gate, key, value), (gk, gv))

        scan_fwd_bwd()
        part = {"scan_fwd_ms": timer(scan_fwd), "scan_fwd_bwd_ms": timer(scan_fwd_bwd)}
        z = torch.randn(batch, seq_len, dim, device=device, dtype=dtype, requires_grad=True)
        for name in ("ratplus", "baseline"):
            proj = layers[name].in_proj
            g = torch.randn(batch, seq_len, proj.out_features, device=device, dtype=dtype)

            def proj_fwd_bwd(proj=proj, g=g):
                z.grad = None
                proj.weight.grad = None
                proj(z).backward(g)

            part[f"in_proj_{name}_fwd_bwd_ms"] = timer(proj_fwd_bwd)
            proj.weight.grad = None
        eager = {row["layer"]: row for row in data["rows"] if row["mode"] == "eager" and row["pattern"] == "dense"}
        if "ratplus" in eager and "baseline" in eager:
            total, extra = (
                eager["ratplus"]["fwd_bwd_ms"],
                eager["ratplus"]["fwd_bwd_ms"] - eager["baseline"]["fwd_bwd_ms"],
            )
            forget_rows = part["in_proj_ratplus_fwd_bwd_ms"] - part["in_proj_baseline_fwd_bwd_ms"]
            part.update(
                scan_share_of_ratplus_eager_fwd_bwd=part["scan_fwd_bwd_ms"] / total,
                forget_gate_rows_share_of_ratplus_eager_fwd_bwd=forget_rows / total,
                eager_extra_ms=extra,
                eager_extra_explained_by_scan_and_forget_rows=(part["scan_fwd_bwd_ms"] + forget_rows) / extra if extra else math.nan,
            )  # fmt: skip
        data["parts"] = part
        log("  " + ", ".join(f"{k} {v:.3f}" for k, v in part.items()))

    def sparse_rows(mode: str) -> None:
        compiled = compiled_layers(["ratplus"]) if mode == "compile" else {}
        base = next(
            (r for r in data["rows"] if r["mode"] == mode and r["layer"] == "baseline" and r["pattern"] == "dense"),
            None,
        )
        for pattern in sparse:
            if mode == "compile" and left() < 1.3 * compile_estimate[0]:
                data["skipped"].append(f"compile {pattern} ({left():.0f} s left)")
                continue
            (row,) = measure(mode, ["ratplus"], pattern, compiled)
            if base is not None:
                row["fwd_bwd_over_dense_baseline"] = row["fwd_bwd_ms"] / base["fwd_bwd_ms"]
                row["fwd_over_dense_baseline"] = row["fwd_ms"] / base["fwd_ms"]
                results.save()

    # most important first: the acceptance ratio eager and compiled, then the breakdown, then extras
    eager_need = 5.0 if args.tiny else 25.0
    if "eager" in modes:
        phase("eager dense", eager_need, lambda: dense_rows("eager"))
    if "compile" in modes:
        phase("compile dense", 2 * compile_estimate[0] + 10, lambda: dense_rows("compile"))
    if "eager" in modes:
        phase("parts (scan op, in_proj)", 2.0 if args.tiny else 8.0, parts)
    if sparse and "eager" in modes:
        phase(f"eager sparse {specs}", eager_need, lambda: sparse_rows("eager"))
    if sparse and "compile" in modes:
        phase(f"compile sparse {specs}", 1.3 * compile_estimate[0], lambda: sparse_rows("compile"))

    data["total_s"] = time.time() - start
    results.save()
    print_table(data)
    log(f"wrote {results.path}")
    return 0


def print_table(data: dict) -> None:
    log("")
    log(f"RAT+ layer vs attention baseline: {data['env']['device']}, B={data['shape']['batch']} T={data['shape']['seq_len']} "
        f"d={data['shape']['dim']}, {data['dtype']}")  # fmt: skip
    log(f"{'mode':8s} {'layer':9s} {'pattern':10s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'vs base':>8s}")
    base = {r["mode"]: r for r in data["rows"] if r["layer"] == "baseline" and r["pattern"] == "dense"}
    for row in data["rows"]:
        ref = base.get(row["mode"])
        rel = f"{row['fwd_bwd_ms'] / ref['fwd_bwd_ms']:.3f}x" if ref else "-"
        log(
            f"{row['mode']:8s} {row['layer']:9s} {row['pattern']:10s} {row['fwd_ms']:9.3f} {row['fwd_bwd_ms']:11.3f} {rel:>8s}"
        )
    for mode, ratio in data.get("ratios", {}).items():
        log(f"{mode}: RAT+/baseline fwd+bwd {ratio['fwd_bwd']:.3f}x (goal <= {GOAL}: "
            f"{'met' if ratio['meets_goal'] else 'NOT met'}), fwd {ratio['fwd']:.3f}x")  # fmt: skip
    log(f"FLOP ratio (fwd, dense): {data['flop_ratio_ratplus_over_baseline']:.3f}")
    if "parts" in data and "scan_share_of_ratplus_eager_fwd_bwd" in data["parts"]:
        part = data["parts"]
        log(f"recurrence op fwd+bwd {part['scan_fwd_bwd_ms']:.3f} ms = {100 * part['scan_share_of_ratplus_eager_fwd_bwd']:.1f}% "
            f"of the eager RAT+ layer; forget-gate rows of in_proj {100 * part['forget_gate_rows_share_of_ratplus_eager_fwd_bwd']:.1f}%")  # fmt: skip
    if data.get("skipped"):
        log(f"skipped: {data['skipped']}")


if __name__ == "__main__":
    sys.exit(main())
