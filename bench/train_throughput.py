"""Training throughput of RAT+ through torchtitan, side by side with torchtitan's llama3.

    python -m bench.train_throughput --flavor 1B --steps 20 --batch 8 --variants ratplus,llama3

    # the memory option [ratplus] recompute, off and on, joint training off and on, against llama3:
    python -m bench.train_throughput --flavor 1B --steps 20 --batch 8 --tag _recompute \
        --variants llama3,ratplus,ratplus_fc1_recompute,ratplus_joint,ratplus_joint_fc1_recompute

Each variant is a fresh ``torchrun`` of the real training entry point (``ratplus_titan.train``
for RAT+, torchtitan's stock ``torchtitan.train`` for llama3 at the same width, depth, heads
and FFN size: ``bench/llama3_same_shape.py``), bf16, compile, selective AC, on the bundled corpus.
tokens/s, TFLOPs, MFU and memory are parsed from torchtitan's own step log and averaged
over the steps after ``--skip``. Writes ``train_<flavor>_<device>.json``, a PNG and the logs into ``--out``.

Runs launch with ``PYTORCH_ALLOC_CONF=expandable_segments:True`` as torchtitan's ``run_train.sh``
does (``--alloc-conf ''`` for the allocator's defaults): torchtitan's ``memory`` is the peak
*reserved* memory, which fragmentation inflates otherwise.

``--memory-snapshot ratplus,llama3`` also records those variants' CUDA allocations (Python stacks)
over their last two steps (left out of the averages) and stores, per variant, the live allocations at
the allocated-memory peak grouped by allocation site and size, with the size in bf16 rows
``[B, T, d]`` (compare with the accounting in tests/model/test_saved_memory.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import subprocess
import sys
from collections import defaultdict
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
    # [ratplus] recompute = "fc1": backward recomputes fc1's output instead of keeping it (4 bf16 rows a token a layer
    # fewer, one more d x 4d matmul a token a layer in backward); DESIGN §3.5, tests/model/test_saved_memory.py
    "ratplus_fc1_recompute": ("ratplus_titan.train", ["--ratplus.no-joint-train", "--ratplus.recompute", "fc1"]),
    "ratplus_joint_fc1_recompute": ("ratplus_titan.train", ["--ratplus.joint-train", "--ratplus.recompute", "fc1"]),
    # torchtitan's own Llama 3 8B next to the 7B flavor (issue: 7B on 4 x H200)
    "llama3_8b": ("torchtitan.train", ["--model.name", "llama3_same_shape", "--model.flavor", "llama3_8B",
                                       "--experimental.custom_import", "bench.llama3_same_shape"]),
}


def launch(
    module: str, args: list[str], ngpu: int, log_path: Path, alloc_conf: str = "", snapshot: tuple[Path, int] | None = None,
) -> tuple[list[dict], str, int]:  # fmt: skip
    """One ``torchrun`` of a torchtitan entry point; the per-step rows parsed from its log.

    ``snapshot``: (summary JSON path, optimizer steps before recording starts): run the entry point
    through ``child_main`` here, which records allocations and writes the summary.
    """
    target = ["-m", module]
    if snapshot is not None:
        target = ["-m", "bench.train_throughput", "--child", module, str(snapshot[0]), str(snapshot[1])]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ngpu}", "--rdzv_backend", "c10d",
        "--rdzv_endpoint=localhost:0", "--local-ranks-filter", "0", "--role", "rank", "--tee", "3", *target, *args,
    ]  # fmt: skip
    print(f"$ {' '.join(cmd[3:])}", flush=True)
    env = os.environ.copy()
    if alloc_conf and not (env.get("PYTORCH_ALLOC_CONF") or env.get("PYTORCH_CUDA_ALLOC_CONF")):
        env["PYTORCH_ALLOC_CONF"] = alloc_conf
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
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


def run_variant(
    name: str, flavor: str, steps: int, batch: int, seq_len: int, ngpu: int, extra: list[str], log_dir: Path,
    alloc_conf: str = "", snapshot: bool = False,
) -> dict:  # fmt: skip
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
    summary_path = log_dir / f"{name}_b{batch}_memory_snapshot.json"
    summary_path.unlink(missing_ok=True)
    phases = 2 if "--ratplus.joint-train" in variant_args else 1  # optimizer steps a training step
    record = (summary_path, max(0, steps - SNAPSHOT_STEPS) * phases) if snapshot else None
    rows, output, returncode = launch(module, args, ngpu, log_dir / f"{name}_b{batch}.log", alloc_conf, record)
    result = {"variant": name, "batch": batch, "returncode": returncode, "steps": rows}
    if returncode != 0 or not rows:
        oom = "out of memory" in output.lower()
        result["error"] = "out of memory" if oom else output[-3000:]
        print(f"[{name}] failed ({'OOM' if oom else returncode})\n{output[-3000:] if not oom else ''}", flush=True)
    if snapshot and summary_path.exists():
        result["memory_snapshot"] = in_rows(json.loads(summary_path.read_text()), batch * seq_len * model_dim(flavor) * 2)
        result["snapshot_steps"] = SNAPSHOT_STEPS
    return result


def summarize(result: dict, skip: int) -> dict:
    last = max((r["step"] for r in result["steps"]), default=0) - result.get("snapshot_steps", 0)  # recorded steps: out
    rows = [r for r in result["steps"] if skip < r["step"] <= last]
    if not rows:
        return result
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    result["summary"] = {
        "tokens_per_s_per_gpu": mean("tps"), "tflops": mean("tflops"), "mfu": mean("mfu"),
        "peak_memory_gib": max(r["memory_gib"] for r in rows), "steps_averaged": len(rows),
        "first_loss": result["steps"][0]["loss"], "last_loss": result["steps"][-1]["loss"],
    }  # fmt: skip
    return result


# --------------------------------------------------------------------------------------
# memory snapshot (--memory-snapshot)
# --------------------------------------------------------------------------------------

SNAPSHOT_STEPS = 2  # recorded steps at the end of a run
SNAPSHOT_ENTRIES = 200_000  # allocator events kept (a 1B step has a few thousand)
_LIBRARY_PATHS = ("/torch/", "/triton/", "/site-packages/", "/lib/python", "<frozen")
_OUR_PATHS = ("ratplus_titan/", "kernels/", "torchtitan/", "bench/")


def _frame(frame: dict) -> str:
    return f"{'/'.join(frame['filename'].split('/')[-2:])}:{frame['line']}:{frame['name']}"


def allocation_site(frames: list[dict]) -> str:
    """``frames`` innermost first: the innermost frame outside torch/triton/the stdlib (under compile, a line of
    the generated code), then the innermost frame of this project or torchtitan that called it."""
    if not frames:
        return "allocated before recording"
    site = next((f for f in frames if not any(p in f["filename"] for p in _LIBRARY_PATHS)), frames[0])
    ours = next((f for f in frames if any(p in f["filename"] for p in _OUR_PATHS)), None)
    return _frame(site) + (f" <- {_frame(ours)}" if ours is not None and ours is not site else "")


def peak_summary(snapshot: dict, device: int = 0, top: int = 30) -> dict:
    """The allocations live at the allocated-memory peak of a ``torch.cuda.memory._snapshot()``.

    Replays the recorded events backwards from the live blocks at snapshot time (undo an ``alloc``:
    the block goes; undo a free: it comes back), so the peak is the highest total within the recorded
    window. Live blocks are grouped by (size, ``allocation_site``), largest total first.
    """
    live: dict[int, tuple[int, list]] = {}
    for segment in snapshot["segments"]:
        if segment.get("device", device) == device:
            for block in segment["blocks"]:
                if block["state"] in ("active_allocated", "active_pending_free"):
                    live[block["address"]] = (block["size"], block.get("frames", []))
    trace = snapshot["device_traces"][device] if device < len(snapshot["device_traces"]) else []
    free = "free_completed" if any(e["action"] == "free_completed" for e in trace) else "free_requested"

    def undo(event: dict, blocks: dict) -> int:
        """Undo one event on ``blocks``; the change of the live total."""
        if event["action"] == "alloc" and event["addr"] in blocks:
            return -blocks.pop(event["addr"])[0]
        if event["action"] == free and event["addr"] not in blocks:
            blocks[event["addr"]] = (event["size"], event.get("frames", []))
            return event["size"]
        return 0

    total = end_total = sum(size for size, _ in live.values())
    peak, peak_index, blocks = total, len(trace), dict(live)
    for index in range(len(trace) - 1, -1, -1):
        total += undo(trace[index], blocks)
        if total > peak:
            peak, peak_index = total, index
    at_peak = dict(live)
    for index in range(len(trace) - 1, peak_index - 1, -1):
        undo(trace[index], at_peak)
    groups: dict[tuple[int, str], int] = defaultdict(int)
    for size, frames in at_peak.values():
        groups[size, allocation_site(frames)] += 1
    ranked = sorted(groups.items(), key=lambda item: -item[0][0] * item[1])
    return {
        "peak_allocated_bytes": peak, "allocated_at_snapshot_bytes": end_total, "events": len(trace),
        "peak_event": peak_index, "live_blocks_at_peak": len(at_peak),
        "groups": [{"size_bytes": size, "count": count, "total_bytes": size * count, "site": site}
                   for (size, site), count in ranked[:top]],
        "other_bytes": sum(size * count for (size, _), count in ranked[top:]),
    }  # fmt: skip


def in_rows(summary: dict, row_bytes: int) -> dict:
    """Sizes also in bf16 rows ``[B, T, d]`` (``row_bytes``), the unit of the saved-tensor accounting."""
    summary["row_bytes"] = row_bytes
    for group in summary["groups"]:
        group["rows"] = round(group["size_bytes"] / row_bytes, 3)
    return summary


def model_dim(flavor: str) -> int:
    from ratplus_titan.model.flavors import ratplus_flavors

    return ratplus_flavors[flavor].dim


def child_main(argv: list[str]) -> None:
    """``--child MODULE SUMMARY_JSON START_AFTER ARGS...``: run torchtitan entry point ``MODULE`` with ``ARGS``
    in this process, record CUDA allocations from its ``START_AFTER``-th optimizer step on, and write
    ``peak_summary`` of the snapshot taken when it returns (rank 0)."""
    module, summary_path, start_after, *args = argv
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def record() -> None:
        if torch.cuda.is_available():
            torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=SNAPSHOT_ENTRIES)

    steps: dict[int, int] = defaultdict(int)  # per optimizer: torchtitan's container steps its optimizers inside
    recording = False

    def count_step(optimizer, *_) -> None:
        nonlocal recording
        steps[id(optimizer)] += 1
        if not recording and steps[id(optimizer)] >= int(start_after):
            recording = True
            record()

    hook = register_optimizer_step_post_hook(count_step)
    if int(start_after) == 0:
        recording = True
        record()
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        hook.remove()
        if torch.cuda.is_available() and os.environ.get("RANK", "0") == "0":
            summary = peak_summary(torch.cuda.memory._snapshot(), torch.cuda.current_device())
            summary["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
            summary["max_memory_reserved_bytes"] = torch.cuda.max_memory_reserved()
            Path(summary_path).write_text(json.dumps(summary, indent=2))


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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
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
    parser.add_argument("--alloc-conf", default="expandable_segments:True", help="PYTORCH_ALLOC_CONF of the runs ('' = none)")
    parser.add_argument("--memory-snapshot", default="", help="comma list of variants whose allocations at peak are recorded")
    parser.add_argument("extra", nargs="*", help="more torchtitan arguments for every variant (after --)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "env": common.environment(), "flavor": args.flavor, "seq_len": args.seq_len, "ngpu": args.ngpu,
        "alloc_conf": args.alloc_conf, "variants": {},
    }  # fmt: skip
    snapshots = set(filter(None, args.memory_snapshot.split(",")))
    for name in args.variants.split(","):
        for batch in [int(b) for b in args.batch.split(",")]:
            result = run_variant(
                name, args.flavor, args.steps, batch, args.seq_len, args.ngpu, args.extra, log_dir,
                args.alloc_conf, name in snapshots,
            )  # fmt: skip
            if result.get("error") != "out of memory":
                break
        results["variants"][name] = summarize(result, args.skip)
    stem = f"train_{args.flavor}_{common.device_slug()}{args.tag}"
    common.write_json(out / f"{stem}.json", results)
    common.plot_or_skip(plot, results, out / f"{stem}.png")
    base = results["variants"].get("llama3", {}).get("summary")
    print(f"\n{'variant':28s} {'batch':>5s} {'tok/s/GPU':>10s} {'vs llama3':>9s} {'MFU%':>6s} {'mem GiB':>8s} {'vs llama3':>9s}")
    for name, r in results["variants"].items():
        s = r.get("summary")
        if s:
            ratio = f"{s['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.3f}" if base else "-"
            mem = f"{s['peak_memory_gib'] / base['peak_memory_gib']:.3f}" if base else "-"
            print(f"{name:28s} {r['batch']:5d} {s['tokens_per_s_per_gpu']:10.0f} {ratio:>9s} {s['mfu']:6.1f} {s['peak_memory_gib']:8.1f} {mem:>9s}")
        else:
            print(f"{name:28s} failed: {str(r.get('error'))[:200]}")
    for name, r in results["variants"].items():
        snap = r.get("memory_snapshot")
        if snap:
            print(f"\n[{name}] allocated at peak {snap['peak_allocated_bytes'] / 2**30:.2f} GiB (max allocated "
                  f"{snap['max_memory_allocated_bytes'] / 2**30:.2f}, reserved {snap['max_memory_reserved_bytes'] / 2**30:.2f}); largest groups:")
            for group in snap["groups"][:12]:
                print(f"  {group['total_bytes'] / 2**30:7.2f} GiB = {group['count']:4d} x {group['rows']:7.3f} rows  {group['site']}")


if __name__ == "__main__":
    main()
