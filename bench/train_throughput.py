"""Training throughput of RAT+ through torchtitan, side by side with torchtitan's llama3.

    python -m bench.train_throughput --flavor 1B --steps 20 --batch 8 --variants ratplus,llama3

Each variant is a fresh ``torchrun`` of the real training entry point (``ratplus_titan.train``
for RAT+, torchtitan's stock ``torchtitan.train`` for llama3 at the same width, depth, heads
and FFN size: ``bench/llama3_same_shape.py``), bf16, compile, selective AC, on the bundled corpus.
tokens/s, TFLOPs, MFU and memory are parsed from torchtitan's own step log and averaged
over the steps after ``--skip``. Writes ``train_<flavor>_<device>.json``, a PNG and the logs into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from bench import common
from bench.common import REPO

STEP = re.compile(
    r"step:\s*(\d+)\s+loss:\s*([\d.naninf]+).*?memory:\s*([\d.]+)GiB.*?tps:\s*([\d,]+)\s+tflops:\s*([\d.,]+)\s+mfu:\s*([\d.]+)%"
)
SPARSE = re.compile(r"step\s+(\d+)\s+loss_sparse\s+([\d.]+)")

VARIANTS = {
    "ratplus": ("ratplus_titan.train", ["--ratplus.no-joint-train"]),
    "llama3": ("torchtitan.train", ["--model.name", "llama3_same_shape", "--experimental.custom_import", "bench.llama3_same_shape"]),
    "ratplus_joint": ("ratplus_titan.train", ["--ratplus.joint-train"]),
    "ratplus_float8": ("ratplus_titan.train", ["--ratplus.no-joint-train", "--model.converters", "quantize.linear.float8"]),
    "attention": ("ratplus_titan.train", ["--ratplus.no-joint-train", "--ratplus.apply-re", "False"]),
    # torchtitan's own Llama 3 8B next to the 7B flavor (issue: 7B on 4 x H200)
    "llama3_8b": ("torchtitan.train", ["--model.name", "llama3_same_shape", "--model.flavor", "llama3_8B",
                                       "--experimental.custom_import", "bench.llama3_same_shape"]),
}


def launch(module: str, args: list[str], ngpu: int, log_path: Path) -> tuple[list[dict], str, int]:
    """One ``torchrun`` of a torchtitan entry point; the per-step rows parsed from its log."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ngpu}", "--rdzv_backend", "c10d",
        "--rdzv_endpoint=localhost:0", "--local-ranks-filter", "0", "--role", "rank", "--tee", "3", "-m", module, *args,
    ]  # fmt: skip
    print(f"$ {' '.join(cmd[3:])}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=os.environ.copy())
    output = proc.stdout + proc.stderr
    log_path.write_text(output)
    rows = [
        {"step": int(m[1]), "loss": float(m[2]), "memory_gib": float(m[3]), "tps": float(m[4].replace(",", "")),
         "tflops": float(m[5].replace(",", "")), "mfu": float(m[6])}
        for m in STEP.finditer(output)
    ]  # fmt: skip
    sparse = {int(m[1]): float(m[2]) for m in SPARSE.finditer(output)}
    for row in rows:
        if row["step"] in sparse:
            row["loss_sparse"] = sparse[row["step"]]
    return rows, output, proc.returncode


def run_variant(name: str, flavor: str, steps: int, batch: int, seq_len: int, ngpu: int, extra: list[str], log_dir: Path) -> dict:
    module, variant_args = VARIANTS[name]
    config = REPO / "train_configs" / f"ratplus_{flavor.lower()}.toml"
    args = [
        "--job.config_file", str(config),
        "--job.dump_folder", str(log_dir / name), "--training.steps", str(steps),
        "--training.seq_len", str(seq_len), "--training.local_batch_size", str(batch),
        "--training.global_batch_size", "-1", "--training.dataset", "bundled",
        "--lr_scheduler.warmup_steps", "2", "--checkpoint.no-enable", "--metrics.log_freq", "1",
        "--metrics.no-enable-tensorboard", "--metrics.disable_color_printing",
        "--compile.enable", "--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op",
        *variant_args, *extra,
    ]  # fmt: skip
    rows, output, returncode = launch(module, args, ngpu, log_dir / f"{name}_b{batch}.log")
    result = {"variant": name, "batch": batch, "returncode": returncode, "steps": rows}
    if returncode != 0 or not rows:
        oom = "out of memory" in output.lower()
        result["error"] = "out of memory" if oom else output[-3000:]
        print(f"[{name}] failed ({'OOM' if oom else returncode})\n{output[-3000:] if not oom else ''}", flush=True)
    return result


def summarize(result: dict, skip: int) -> dict:
    rows = [r for r in result["steps"] if r["step"] > skip]
    if not rows:
        return result
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    result["summary"] = {
        "tokens_per_s_per_gpu": mean("tps"), "tflops": mean("tflops"), "mfu": mean("mfu"),
        "peak_memory_gib": max(r["memory_gib"] for r in rows), "steps_averaged": len(rows),
        "first_loss": result["steps"][0]["loss"], "last_loss": result["steps"][-1]["loss"],
    }  # fmt: skip
    return result


def plot(results: dict, path: Path) -> None:
    names = [n for n, r in results["variants"].items() if "summary" in r]
    fig, axes = common.figure(1, 2, figsize=(10, 4))
    axes[0].bar(names, [results["variants"][n]["summary"]["tokens_per_s_per_gpu"] for n in names])
    axes[0].set_ylabel("tokens / s / GPU")
    axes[1].bar(names, [results["variants"][n]["summary"]["peak_memory_gib"] for n in names], color="tab:orange")
    axes[1].set_ylabel("peak memory (GiB)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    env = results["env"]
    fig.suptitle(f"{results['flavor']} training, seq {results['seq_len']}, {env['device']}, torch {env['torch']}")
    common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_throughput", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flavor", default="1B", help="1B | 3B | 7B")
    parser.add_argument("--variants", default="ratplus,llama3", help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--batch", default="8,4", help="local batch sizes to try, largest first (first that fits wins)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=5, help="steps left out of the averages (compile, warm-up)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--ngpu", type=int, default=max(1, torch.cuda.device_count()))
    parser.add_argument("--out", default=common.out_dir(), help="folder for JSON, PNG and logs (default: $OUT or bench/results)")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("extra", nargs="*", help="more torchtitan arguments for every variant (after --)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "env": common.environment(), "flavor": args.flavor, "seq_len": args.seq_len, "ngpu": args.ngpu, "variants": {},
    }  # fmt: skip
    for name in args.variants.split(","):
        for batch in [int(b) for b in args.batch.split(",")]:
            result = run_variant(name, args.flavor, args.steps, batch, args.seq_len, args.ngpu, args.extra, log_dir)
            if result.get("error") != "out of memory":
                break
        results["variants"][name] = summarize(result, args.skip)
    stem = f"train_{args.flavor}_{common.device_slug()}{args.tag}"
    common.write_json(out / f"{stem}.json", results)
    common.plot_or_skip(plot, results, out / f"{stem}.png")
    base = results["variants"].get("llama3", {}).get("summary")
    print(f"\n{'variant':16s} {'batch':>5s} {'tok/s/GPU':>10s} {'vs llama3':>9s} {'MFU%':>6s} {'mem GiB':>8s}")
    for name, r in results["variants"].items():
        s = r.get("summary")
        if s:
            ratio = f"{s['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.3f}" if base else "-"
            print(f"{name:16s} {r['batch']:5d} {s['tokens_per_s_per_gpu']:10.0f} {ratio:>9s} {s['mfu']:6.1f} {s['peak_memory_gib']:8.1f}")
        else:
            print(f"{name:16s} failed: {str(r.get('error'))[:200]}")


if __name__ == "__main__":
    main()
