"""Regenerate the README's results section from the JSON files in ``bench/results/``.

    python -m bench.readme_tables          # rewrites README.md between the results markers
    python -m bench.readme_tables --print  # prints the markdown only

``SOURCES`` names the JSON file of each table and the benchmark that writes that format; after a
rerun (e.g. on another GPU: other file names), point the table at the new file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- results:begin (python -m bench.readme_tables) -->", "<!-- results:end -->"

SOURCES = {  # table: JSON file in bench/results/ (written by)
    "training": "train_1B_NVIDIA_H100_80GB_HBM3.json",  # python -m bench.train_throughput
    "training_recompute": "train_1B_H100_recompute.json",  # python -m bench.train_throughput --tag _recompute ...
    "layouts": "parallel_layouts_NVIDIA_H200.json",  # python -m bench.parallel_layouts
    "layer": "layer_H100.json",  # python -m bench.layer
    "attention": "kernels_H100_all.json",  # python -m bench.kernels attention
    "scan": "kernels_H100_all.json",  # python -m bench.kernels scan
    "decode": "decode_h100.json",  # python -m bench.decode
    "decode_kernel": "gpu_decode_sweep_h100.json",  # python -m bench.decode --phases kernel
    "decode_kernel_repeat": "gpu_decode_sweep_h100_repeat.json",  # the same, a second call (optional)
    "evaluation": "eval_throughput_h100.json",  # python -m bench.eval_throughput
}


def load(table: str) -> dict | None:
    path = RESULTS / SOURCES[table]
    return json.loads(path.read_text()) if path.exists() else None


def env_of(data: dict) -> dict:
    """The environment record: ``data["env"]`` (older files keep device, torch, date at the top level)."""
    return data.get("env", data)


TRAINING_LABELS = {
    "ratplus": "RAT+ (joint training off)", "attention": "attention baseline (`apply_re = false`)",
    "llama3": "torchtitan llama3, same width/depth/heads/FFN", "ratplus_joint": "RAT+ joint training (2 passes a batch)",
    "ratplus_float8": "RAT+ float8 (torchao)",
    "ratplus_fc1_recompute": "RAT+, `recompute = \"fc1\"` (joint training off)",
    "ratplus_joint_fc1_recompute": "RAT+ joint training, `recompute = \"fc1\"`",
}  # fmt: skip


def training(table: str = "training") -> list[str]:
    """The 1B training table of ``bench/train_throughput.py``'s JSON: tokens/s and peak memory against llama3."""
    data = load(table)
    if not data:
        return []
    env = env_of(data)
    llama3 = data["variants"]["llama3"]["summary"]
    title = "Training, 1B flavor" if table == "training" else "Training memory, 1B flavor, `[ratplus] recompute`"
    lines = [
        f"**{title}** — {env['device']}, torch {env['torch']}, {env['date'][:10]}; seq {data['seq_len']}, "
        "bf16, compile, selective AC, local batch 8 (largest that fits), mean of steps 7–18 in one call "
        f"(`bench/train_throughput.py`, `{SOURCES[table]}`).",
        "",
        "| run | tokens/s/GPU | vs llama3 | MFU % | peak memory GiB | vs llama3 |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in data["variants"].items():
        s = run["summary"]
        lines.append(f"| {TRAINING_LABELS.get(name, name)} | {s['tokens_per_s_per_gpu']:,.0f} "
                     f"| {s['tokens_per_s_per_gpu'] / llama3['tokens_per_s_per_gpu']:.3f}x | {s['mfu']:.1f} "
                     f"| {s['peak_memory_gib']:.1f} | {s['peak_memory_gib'] / llama3['peak_memory_gib']:.2f}x |")  # fmt: skip
    if table == "training":
        lines += ["", "MFU is torchtitan's (peak 989 TFLOP/s); RAT+ counts each layer's real attention pairs (causal: T/2 keys a "
                  "query) and the recurrence, torchtitan's llama3 counts T keys a query, so compare tokens/s."]  # fmt: skip
    return lines


def layouts() -> list[str]:
    data = load("layouts")
    if not data:
        return []
    env, runs = env_of(data), data["runs"]
    lines = [
        f"**FSDP2 vs tensor parallel** — 2 x {env['device']}, torch {env['torch']}, {env['date']}; 7B width, 4 layers, "
        f"seq {data['seq_len']}, joint training, bf16, same seed checkpoint and batches (`bench/parallel_layouts.py`).",
        "",
        "| run | " + " | ".join(f"step {r['step']}" for r in runs["fsdp"]["steps"]) + " |",
        "|---|" + "---|" * len(runs["fsdp"]["steps"]),
    ]
    steps = [r["step"] for r in runs["fsdp"]["steps"]]
    for name, run in runs.items():
        by_step = {r["step"]: r["loss"] for r in run["steps"]}
        cells = [f"{by_step[s]:.3f}" if s in by_step else "" for s in steps] if by_step else ["failed"] + [""] * (len(steps) - 1)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if any(run["rc"] for run in runs.values()):
        lines += ["", "The cross-layout resumes failed in this run (see the JSON)."]
    else:
        # a resumed run continues the run whose step-5 checkpoint it loaded
        gaps = []
        for name, run in runs.items():
            if "_resumed_as_" in name:
                origin = {r["step"]: r["loss"] for r in runs[name.split("_step")[0]]["steps"]}
                gaps.append(max(abs(r["loss"] - origin[r["step"]]) for r in run["steps"]))
        lines += ["", f"Each resumed run loads the other layout's step-5 DCP checkpoint (model, optimizer, scheduler, "
                  f"data position) and continues within {max(gaps):.4f} of the run that saved it."]  # fmt: skip
    return lines


def attention() -> list[str]:
    data = load("attention")
    if not data:
        return []
    rows = data["attention"]["rows"]
    dense = {r["T"]: r for r in rows if r["method"] == "sdpa_dense"}
    flash = {r["T"]: r for r in rows if r["method"] == "sdpa_flash"}
    lines = [
        f"**Pattern attention prefill** (Triton, one pass) — {data['env']['device']}, torch {data['env']['torch']}, "
        f"{data['env']['date'][:10]}; B=1, 16 heads x 128, bf16; speedup over dense causal SDPA (default backend; "
        f"FlashAttention-2 in brackets) (`bench/kernels.py`, `{SOURCES['attention']}`).",
        "",
        "| T | d16w256s4 fwd | d16w256s4 bwd | d64w256s4 fwd | d64w256s4 bwd |",
        "|---|---|---|---|---|",
    ]
    for seq_len in sorted(dense):
        cells = []
        for pattern in ("d16w256s4", "d64w256s4"):
            ours = next((r for r in rows if r["T"] == seq_len and r["method"] == "triton" and r["pattern"] == pattern
                         and not r.get("variant")), None)  # fmt: skip
            for key in ("fwd_ms", "bwd_ms"):
                if ours is None:
                    cells.append("-")
                else:
                    cells.append(f"{dense[seq_len][key] / ours[key]:.1f}x ({flash[seq_len][key] / ours[key]:.1f}x)")
        lines.append(f"| {seq_len:,} | " + " | ".join(cells) + " |")
    return lines


def scan() -> list[str]:
    data = load("scan")
    if not data:
        return []
    env = env_of(data)
    lines = [
        f"**Recurrence scan** (Triton) — {env['device']}, torch {env['torch']}, {env['date'][:10]}; bf16; "
        f"copy bandwidth {data['copy_GBps']:.0f} GB/s (`bench/kernels.py`, `{SOURCES['scan']}`).",
        "",
        "| shape [B, T, H, hd] | fwd ms | fwd % of copy BW | bwd ms | bwd % of copy BW | vs associative_scan fwd / bwd |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["scan"]:
        ratio = f"{r['assoc_fwd_ms'] / r['fwd_ms']:.2f}x / {r['assoc_bwd_ms'] / r['bwd_ms']:.2f}x" if "assoc_bwd_ms" in r else "-"
        lines.append(f"| {r['shape_BTHhd']} | {r['fwd_ms']:.3f} | {r['fwd_pct_copy']:.0f}% | {r['bwd_ms']:.3f} | "
                     f"{r['bwd_pct_copy']:.0f}% | {ratio} |")  # fmt: skip
    return lines


def layer() -> list[str]:
    data = load("layer")
    if not data:
        return []
    env, shape, parts = env_of(data), data["shape"], data.get("parts", {})
    lines = [
        f"**Whole RAT+ layer vs the attention baseline** — {env['device']}, torch {env['torch']}, {env['date'][:10]}; "
        f"1B layer (norm, projections, scan, RoPE, attention, gate, out), B={shape['batch']} T={shape['seq_len']}, bf16, "
        f"forward + backward (`bench/layer.py`, `{SOURCES['layer']}`).",
        "",
        "| mode | layer | pattern | fwd ms | fwd+bwd ms | vs baseline |",
        "|---|---|---|---|---|---|",
    ]
    base = {r["mode"]: r["fwd_bwd_ms"] for r in data["rows"] if r["layer"] == "baseline"}
    for r in data["rows"]:
        lines.append(f"| {r['mode']} | {r['layer']} | {r['pattern']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
                     f"{r['fwd_bwd_ms'] / base[r['mode']]:.3f}x |")  # fmt: skip
    if parts:
        lines += ["", f"The RAT+ layer does {data['flop_ratio_ratplus_over_baseline']:.3f}x the baseline's matrix FLOPs "
                  f"(the forget-gate rows of the input projection). Alone, the scan op takes {parts['scan_fwd_bwd_ms']:.2f} ms "
                  f"forward + backward ({parts['scan_share_of_ratplus_eager_fwd_bwd']:.0%} of the eager RAT+ layer) and the "
                  f"forget-gate rows {parts['in_proj_ratplus_fwd_bwd_ms'] - parts['in_proj_baseline_fwd_bwd_ms']:.2f} ms."]  # fmt: skip
    return lines


def decode() -> list[str]:
    data = load("decode")
    if not data:
        return []
    env = data["env"]
    lines = [
        f"**Decoding, 1B shape** — {env['device']}, torch {env['torch']}, {env['date'][:10]}; bf16, CUDA graphs, largest "
        f"batch that fits (cap 256) (`bench/decode.py`, `{SOURCES['decode']}`).",
        "",
        "| context | pattern | batch | tokens/s | vs dense | KV cache / sequence (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    dense = {r["context"]: r["tokens_per_s"] for r in data["throughput"] if r["pattern"] == "dense"}
    for r in data["throughput"]:
        lines.append(f"| {r['context']:,} | {r['pattern']} | {r['batch']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / dense[r['context']]:.1f}x | {r['cache_bytes_per_sequence'] / 2**20:,.0f} |")  # fmt: skip
    lat = {r["pattern"]: r["ms_per_step"] for r in data["latency"]}
    lines += ["", "Batch 1, 1K context, ms per token: " + ", ".join(f"{p} {ms:.3f}" for p, ms in lat.items()) + "."]
    return lines + decode_kernel()


def kernel_rows(data: dict) -> list[dict]:
    """The decode-kernel rows timed in a CUDA graph: ``kernel`` of ``bench/decode.py`` (``timings`` in older files)."""
    rows = data.get("kernel", data.get("timings", []))
    return [r for r in rows if "graph_ms" in r] if isinstance(rows, list) else []


def repeat_spread(rows: list[dict]) -> float | None:
    """Largest relative difference of the graph times against the repeat run of the same kernels (None: no repeat)."""
    repeat = load("decode_kernel_repeat") or {}
    again = {(r["context"], r["pattern"], r["variant"]): r["graph_ms"] for r in kernel_rows(repeat)}
    diffs = [abs(again[key] / r["graph_ms"] - 1) for r in rows if (key := (r["context"], r["pattern"], r["variant"])) in again]
    return max(diffs) if diffs else None


def decode_kernel() -> list[str]:
    data = load("decode_kernel")
    if not data:
        return []
    env, copy_bw = data["env"], data["copy_bytes_per_s"]
    rows = kernel_rows(data)  # the previous (split) kernel and the default (flat) one
    dense = {(r["context"], r["variant"]): r["graph_ms"] for r in rows if r["pattern"] == "dense"}
    lines = [
        "",
        f"**Decode kernel** — {env['device']}, torch {env['torch']}, {env['date'][:10]}; batch 64, 16 heads x 128, bf16; "
        f"ms per call inside a CUDA graph of 8 calls over 2-4 cache sets larger than L2 (as decoding replays it; "
        f"`triton.testing.do_bench` with its L2 flush in brackets); share of the copy bandwidth "
        f"({copy_bw / 1e12:.2f} TB/s) for the cache bytes read; speedup over dense decode at the same context "
        f"(`bench/decode.py`, `{SOURCES['decode_kernel']}`).",
        "",
        "| context | pattern | cache rows | kernel | ms | share of copy BW | vs dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kernel = "split + merge (previous)" if r["variant"].startswith("split") else "flat, one launch (default)"
        share = r["bytes_read"] / (r["graph_ms"] / 1e3) / copy_bw
        base = dense.get((r["context"], r["variant"]))
        speedup = f"{base / r['graph_ms']:.1f}x" if base and r["pattern"] != "dense" else "-"
        lines.append(f"| {r['context'] // 1024}K | {r['pattern']} | {r['rows']:,} | {kernel} | {r['graph_ms']:.3f} "
                     f"({r['ms']:.3f}) | {share:.0%} | {speedup} |")  # fmt: skip
    note = ("The copy bandwidth counts bytes read plus written; a kernel that only reads can pass 100% of it. "
            "`do_bench` times of the sub-0.3 ms cases moved by up to 2x between runs of the same kernel "
            "(its L2 flush writes 256 MB just before each call)")  # fmt: skip
    spread = repeat_spread(rows)
    if spread is not None:
        note += (f"; a second call timing both kernels again (`{SOURCES['decode_kernel_repeat']}`) gave graph times "
                 f"within {spread:.1%} of these")  # fmt: skip
    lines += ["", note + "."]
    return lines


def evaluation() -> list[str]:
    data = load("evaluation")
    if not data:
        return []
    env = env_of(data)
    lines = [
        f"**lm-eval throughput** — {env['device']}, torch {env['torch']}, lm-eval {data['lm_eval']}, {env['date'][:10]}; "
        f"1B shape, {data['weights']} weights, {data['mean_request_tokens']:.0f}-token multiple-choice requests "
        "(`bench/eval_throughput.py`).",
        "",
        "| pattern | batch | requests/min (loglikelihood) | requests/min (whole simple_evaluate) |",
        "|---|---|---|---|",
    ]
    for r in data["runs"]:
        lines.append(f"| {r['pattern']} | {r['batch_size']} | {r['requests_per_min']:,} | {r['simple_evaluate_requests_per_min']:,} |")
    return lines


def section() -> str:
    parts = [training(), training("training_recompute"), layouts(), layer(), attention(), scan(), decode(), evaluation()]
    return "\n\n".join("\n".join(p) for p in parts if p)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.readme_tables", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--print", action="store_true", help="print the markdown instead of rewriting README.md")
    args = parser.parse_args(argv)
    text = section()
    if args.print:
        print(text)
        return
    readme = README.read_text()
    if BEGIN not in readme:
        raise SystemExit(f"README.md has no {BEGIN!r} marker")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
