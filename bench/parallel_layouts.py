"""FSDP2-only vs tensor parallel (TP=2) on 2 GPUs, and DCP resume across the two layouts.

    python -m bench.parallel_layouts --out bench/results      (on a 2-GPU machine)

A reduced-depth 7B-width RAT+ model (``bench/reduced_flavors.py``), joint training on,
bf16, pre-tokenized windows (rank r reads positions r, r+2, ... of one shuffled stream, so the 2-rank FSDP global
batch equals the TP batch), one seed checkpoint for both runs. Each run saves at step 5;
then step 5 of the FSDP run is resumed under TP and vice versa. Losses must agree within
bf16 noise. Writes ``parallel_layouts_<device>.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from bench import common
from bench.common import REPO
from bench.train_throughput import launch

LAYOUTS = {"fsdp": ["--parallelism.data_parallel_shard_degree", "2"], "tp": ["--parallelism.tensor_parallel_degree", "2"]}
BATCH = {"fsdp": 1, "tp": 2}  # the same global batch of 2 windows


def token_bin(path: Path, tokens: int = 2_000_000) -> Path:
    """Tokenize the bundled corpus into a uint16 .bin (our tokenizer, bos/eos per document)."""
    import gzip

    from ratplus_titan.data.dataset import BUNDLED_CORPUS
    from ratplus_titan.data.tokenizer import load_tokenizer

    tokenizer, ids = load_tokenizer(None), []
    with gzip.open(BUNDLED_CORPUS["train"], "rt") as f:
        for line in f:
            ids.extend(tokenizer.encode(json.loads(line)["text"], add_bos=True, add_eos=True))
            if len(ids) >= tokens:
                break
    np.asarray(ids, dtype=np.uint16).tofile(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.parallel_layouts", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=common.out_dir(), help="output folder (default: $OUT or bench/results)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--flavor", default="7B_depth4")
    args = parser.parse_args(argv)
    out = Path(args.out)
    work = Path("/tmp/parallel_layouts")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = token_bin(work / "corpus.bin")
    train_args = [
        "--job.config_file", str(REPO / "train_configs" / "ratplus_7b.toml"),
        "--experimental.custom_import", "bench.reduced_flavors", "--model.flavor", args.flavor,
        "--training.seq_len", str(args.seq_len), "--training.global_batch_size", "-1",
        "--training.dataset", "bin", "--training.dataset_path", str(data),
        "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1", "--metrics.no-enable-tensorboard",
        "--metrics.disable_color_printing", "--compile.no-enable", "--activation_checkpoint.mode", "none",
        "--checkpoint.async_mode", "disabled", "--checkpoint.no-last-save-model-only", "--debug.seed", "0",
    ]  # fmt: skip
    seed = work / "seed"
    launch("ratplus_titan.train", [*train_args, "--job.dump_folder", str(seed), "--training.local_batch_size", "1",
           "--checkpoint.enable", "--checkpoint.create_seed_checkpoint", "--parallelism.data_parallel_shard_degree", "1"],
           1, work / "seed.log")  # fmt: skip
    load = ["--checkpoint.enable", "--checkpoint.initial_load_path", str(seed / "checkpoint" / "step-0"), "--checkpoint.interval", "5"]
    results: dict = {"env": common.environment(), "flavor": args.flavor, "seq_len": args.seq_len, "runs": {}}
    for layout, flags in LAYOUTS.items():
        rows, output, rc = launch("ratplus_titan.train", [*train_args, *load, *flags, "--job.dump_folder", str(work / layout),
                                  "--training.steps", str(args.steps), "--training.local_batch_size", str(BATCH[layout])],
                                  2, work / f"{layout}.log")  # fmt: skip
        results["runs"][layout] = {"rc": rc, "steps": rows, **({"error": output[-2000:]} if rc else {})}
    for source, target in (("fsdp", "tp"), ("tp", "fsdp")):
        name = f"{source}_step5_resumed_as_{target}"
        folder = work / name / "checkpoint"
        folder.mkdir(parents=True)
        shutil.copytree(work / source / "checkpoint" / "step-5", folder / "step-5")
        rows, output, rc = launch("ratplus_titan.train", [*train_args, *LAYOUTS[target], "--checkpoint.enable", "--checkpoint.interval", "1000",
                                  "--job.dump_folder", str(work / name), "--training.steps", str(args.steps),
                                  "--training.local_batch_size", str(BATCH[target])], 2, work / f"{name}.log")  # fmt: skip
        results["runs"][name] = {"rc": rc, "steps": rows, **({"error": output[-2000:]} if rc else {})}
    fsdp = {r["step"]: r for r in results["runs"]["fsdp"]["steps"]}
    print(f"\n{'run':32s} " + " ".join(f"{s:>8d}" for s in range(1, args.steps + 1)))
    for name, run in results["runs"].items():
        by_step = {r["step"]: r["loss"] for r in run["steps"]}
        print(f"{name:32s} " + " ".join(f"{by_step[s]:8.4f}" if s in by_step else " " * 8 for s in range(1, args.steps + 1)))
        diffs = [abs(by_step[s] - fsdp[s]["loss"]) for s in by_step if s in fsdp]
        run["max_abs_loss_diff_vs_fsdp"] = max(diffs) if diffs else None
    common.write_json(out / f"parallel_layouts_{common.device_slug()}.json", results)
    for name, run in results["runs"].items():
        print(f"{name:32s} rc={run['rc']} max |loss - fsdp loss| = {run['max_abs_loss_diff_vs_fsdp']}")


if __name__ == "__main__":
    main()
