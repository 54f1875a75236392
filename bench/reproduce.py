"""Small-scale reproduction of "train dense, infer sparse", end to end through the package's entry points.

    python -m bench.reproduce --scale 125m --out bench/results     # one H200: ~9 minutes
    python -m bench.reproduce --scale tiny --out /tmp/repro        # CPU: the debug model, a few steps

1. data      the corpus (``data/README.md``; ``tiny``: the bundled one) -> ``.bin`` tokens with
             ``python -m ratplus_titan.data.pretokenize``; the training tokens are cut in two: pretraining
             windows, then adaptation windows the pretraining never saw;
2. pretrain  ``run_train.sh`` + ``train_configs/reproduce_125m.toml``: RAT+ and the attention baseline
             (``--ratplus.apply-re False``), both with joint training, same data, same steps (on a GPU the
             two runs share it, side by side);
3. adapt     each checkpoint to each sparse pattern (``reproduce_125m_adapt.toml``: joint training off,
             lr 8e-5, no warmup, cosine; DESIGN §3), on the held-back windows;
4. export    ``ratplus-export`` of every checkpoint;
5. evaluate  held-out loss (``ratplus-perplexity``'s ``evaluate``) of every (model, checkpoint, pattern):
             dense, sliding window + sinks, the sparse patterns, top-k block attention at the KV budget of
             the first sparse pattern (RAT+ score and Quest/MoBA); NIAH single-needle at the training
             length (``ratplus-niah``);
6. report    ``reproduce_<device>.json`` (every number above, the loss curves, timings), a PNG, and the
             README section (``--readme``, also rewritten from a JSON file alone with ``--readme-only``).

Runs are kept in ``--work`` (default ``outputs/reproduce_<scale>``); a stage whose output is already there
is reused, so a cut-off run continues where it stopped. Progress (step, loss, tokens/s, ETA) is printed
every ``--progress-s`` seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.common import REPO, device_slug, environment, figure, save_figure, write_json

MODELS = {"ratplus": [], "attention": ["--ratplus.apply-re", "False"]}
"""The two pretrained models and the torchtitan arguments that make them."""
STEP_LINE = re.compile(r"step:\s*(\d+)\s+loss:\s*([-\d.naninf]+)(?:.*?tps:\s*([\d,]+))?")
SPARSE_LINE = re.compile(r"step\s+(\d+)\s+loss_sparse\s+([-\d.naninf]+)")


@dataclass(frozen=True)
class Scale:
    """One size of the reproduction: model, data and the patterns it is measured at."""

    flavor: str
    seq_len: int
    batch: int
    pretrain_steps: int
    warmup_steps: int
    adapt_steps: int
    patterns: tuple[str, ...]  # the sparse patterns adapted to and evaluated
    corpus: tuple[str, str]  # (train, validation) text files, relative to the repository
    eval_windows: int
    eval_batch: int
    niah_samples: int
    log_freq: int
    joint_dilation: int = 64
    pretrain_lr: float = 1.5e-3
    adapt_lr: float = 8e-5
    compile: bool = True
    extra: tuple[str, ...] = field(default=())  # more torchtitan arguments for every run

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len


SCALES = {
    "125m": Scale(
        flavor="125M", seq_len=2048, batch=32, pretrain_steps=580, warmup_steps=29, adapt_steps=58,
        patterns=("d16w256s4", "d64w256s4", "d16w16s4", "d64w16s4"), corpus=("data/gutenberg/train.jsonl.xz", "data/gutenberg/validation.jsonl.xz"),
        eval_windows=256, eval_batch=16, niah_samples=20, log_freq=10,
    ),
    "tiny": Scale(
        flavor="debugmodel", seq_len=256, batch=4, pretrain_steps=4, warmup_steps=1, adapt_steps=2,
        patterns=("d4w16s2", "d16w16s2"),
        corpus=("ratplus_titan/assets/corpus/en_pd_ccby.train.jsonl.gz",
                "ratplus_titan/assets/corpus/en_pd_ccby.validation.jsonl.gz"),
        eval_windows=4, eval_batch=4, niah_samples=1, log_freq=1, joint_dilation=64, compile=False,
        extra=("--training.mixed_precision_param", "float32"),
    ),
}  # fmt: skip


# ---- helpers ---------------------------------------------------------------------------------------------
def log(message: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {message}", flush=True)


def families(patterns: tuple[str, ...] | list[str]) -> dict[str, list[str]]:
    """The sparse patterns grouped by their local part ``w<W>s<S>``, each group by increasing dilation."""
    from ratplus_titan.pattern import Pattern

    groups: dict[str, list[str]] = {}
    for spec in patterns:
        p = Pattern.parse(spec)
        groups.setdefault(f"w{p.local_window}s{p.sinks}", []).append(spec)
    return {k: sorted(v, key=lambda spec: Pattern.parse(spec).dilation) for k, v in groups.items()}


def sparse_specs(scale: Scale) -> dict[str, str]:
    """Every pattern evaluated, by label: dense; per local part, the sliding window alone and the sparse
    patterns; top-k block attention at the first sparse pattern's KV budget (three block scores)."""
    from ratplus_titan.pattern import Pattern

    specs = {"dense": "dense"}
    for local, members in families(scale.patterns).items():
        specs[local] = f"d-1{local}"  # no dilated keys: what the window and sinks alone give
        specs.update({m: m for m in members})
    first = Pattern.parse(scale.patterns[0])
    rows = first.cache_rows(scale.seq_len)  # S + W + ceil(T / D)
    block = first.dilation  # DESIGN §2: top-k blocks of size D
    top_k = max(1, (rows - first.sinks) // block - 1)  # sinks + (top_k + 1) blocks = the same rows
    for score in ("ratplus", "quest", "moba"):
        specs[f"topk-{score}"] = f"topk{block}k{top_k}s{first.sinks}-{score}"
    return specs


# ---- stages ----------------------------------------------------------------------------------------------
def prepare_data(work: Path, scale: Scale, workers: int) -> dict:
    """Tokenize the corpus; cut the training tokens into pretraining and (unseen) adaptation windows."""
    import numpy as np

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, text in zip(("train", "validation"), scale.corpus):
        source = REPO / text
        if not source.is_file():
            raise FileNotFoundError(
                f"corpus file {source} is missing: build it with scripts/build_gutenberg_corpus.py (data/README.md)"
            )
        out = data / f"{split}.bin"
        if not out.is_file():
            run([sys.executable, "-m", "ratplus_titan.data.pretokenize", str(source), str(out), "--workers", str(workers)])
        files[split] = out
    tokens = np.memmap(files["train"], dtype=np.uint16, mode="r")
    window = scale.seq_len + 1
    need = {"pretrain": scale.pretrain_steps * scale.batch * window, "adapt": scale.adapt_steps * scale.batch * window}
    if need["pretrain"] + need["adapt"] > len(tokens):
        raise ValueError(
            f"{files['train']} holds {len(tokens):,} tokens, fewer than the {need['pretrain'] + need['adapt']:,} that "
            f"{scale.pretrain_steps} + {scale.adapt_steps} steps of {scale.batch} x {window} take: fewer steps, or a larger corpus"
        )
    cuts = {"pretrain": (0, need["pretrain"]), "adapt": (need["pretrain"], need["pretrain"] + need["adapt"])}
    for name, (lo, hi) in cuts.items():
        path = data / f"{name}.bin"
        if not path.is_file() or path.stat().st_size != 2 * (hi - lo):
            tokens[lo:hi].tofile(path)
    validation = np.memmap(files["validation"], dtype=np.uint16, mode="r")
    return {
        "train_tokens": int(len(tokens)), "validation_tokens": int(len(validation)),
        "pretrain_tokens": need["pretrain"], "adapt_tokens": need["adapt"], "files": {k: str(v) for k, v in files.items()},
    }  # fmt: skip


def run(cmd: list[str], **kwargs) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, cwd=REPO, check=True, **kwargs)


@dataclass
class TrainRun:
    name: str
    config: str
    args: list[str]
    steps: int
    dump: Path

    @property
    def checkpoint(self) -> Path:
        return self.dump / "checkpoint" / f"step-{self.steps}"

    @property
    def log_path(self) -> Path:
        return self.dump.parent / f"{self.name}.log"


def train_args(scale: Scale, work: Path, data: str, steps: int, warmup: int, lr: float) -> list[str]:
    return [
        "--model.flavor", scale.flavor, "--training.seq_len", str(scale.seq_len),
        "--training.local_batch_size", str(scale.batch), "--training.steps", str(steps),
        "--training.dataset", "bin", "--training.dataset_path", str(work / "data" / data),
        "--lr_scheduler.warmup_steps", str(warmup), "--optimizer.lr", str(lr),
        "--checkpoint.interval", str(steps), "--metrics.log_freq", str(scale.log_freq),
        "--metrics.disable_color_printing", "--compile.enable" if scale.compile else "--compile.no-enable",
        *scale.extra,
    ]  # fmt: skip


def pretrain_runs(scale: Scale, work: Path) -> list[TrainRun]:
    common = train_args(scale, work, "pretrain.bin", scale.pretrain_steps, scale.warmup_steps, scale.pretrain_lr)
    return [
        TrainRun(
            f"pretrain_{model}", "train_configs/reproduce_125m.toml",
            [*common, "--ratplus.joint-train", "--ratplus.joint_dilation", str(scale.joint_dilation), *extra],
            scale.pretrain_steps, work / f"pretrain_{model}",
        )  # fmt: skip
        for model, extra in MODELS.items()
    ]


def adapt_runs(scale: Scale, work: Path) -> list[TrainRun]:
    from ratplus_titan.pattern import Pattern

    common = train_args(scale, work, "adapt.bin", scale.adapt_steps, 0, scale.adapt_lr)
    runs = []
    for model, extra in MODELS.items():
        for spec in scale.patterns:
            p = Pattern.parse(spec)
            source = work / f"pretrain_{model}" / "checkpoint" / f"step-{scale.pretrain_steps}"
            runs.append(TrainRun(
                f"adapt_{model}_{spec}", "train_configs/reproduce_125m_adapt.toml",
                [*common, "--ratplus.no-joint-train", "--ratplus.dilation", str(p.dilation),
                 "--ratplus.local_window", str(p.local_window), "--ratplus.sinks", str(p.sinks),
                 "--checkpoint.initial_load_path", str(source), "--checkpoint.initial_load_model_only", *extra],
                scale.adapt_steps, work / f"adapt_{model}_{spec}",
            ))  # fmt: skip
    return runs


def parse_log(text: str) -> dict:
    """Per-step dense loss, sparse-phase loss (joint training) and tokens/s from a torchtitan log."""
    rows = {int(m[1]): {"loss": float(m[2]), "tps": float(m[3].replace(",", "")) if m[3] else None}
            for m in STEP_LINE.finditer(text)}  # fmt: skip
    for m in SPARSE_LINE.finditer(text):
        rows.setdefault(int(m[1]), {})["loss_sparse"] = float(m[2])
    steps = sorted(s for s in rows if "loss" in rows[s])
    tps = [rows[s]["tps"] for s in steps if rows[s].get("tps")]
    return {
        "step": steps,
        "loss": [rows[s]["loss"] for s in steps],
        "loss_sparse": [rows[s].get("loss_sparse") for s in steps],
        # the first logged steps include compilation
        "tokens_per_s": sum(tps[1:]) / len(tps[1:]) if len(tps) > 1 else (tps[0] if tps else None),
    }


def train(runs: list[TrainRun], concurrent: int, progress_s: float) -> dict[str, dict]:
    """Launch ``run_train.sh`` for each run, ``concurrent`` side by side; reuse finished ones."""
    results, pending = {}, []
    for r in runs:
        if (r.checkpoint / ".metadata").is_file() and r.log_path.is_file():  # DCP writes .metadata last
            log(f"{r.name}: reusing {r.checkpoint}")
        else:
            pending.append(r)
    batches = [pending[i : i + concurrent] for i in range(0, len(pending), max(1, concurrent))]
    for batch in batches:
        procs = []
        for r in batch:
            r.dump.parent.mkdir(parents=True, exist_ok=True)
            cmd = ["./run_train.sh", "--job.dump_folder", str(r.dump), *r.args]
            env = {**os.environ, "CONFIG_FILE": r.config, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
            log(f"{r.name}: CONFIG_FILE={r.config} " + " ".join(cmd))
            handle = open(r.log_path, "w")  # noqa: SIM115 (closed below)
            procs.append((r, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT), handle, time.monotonic()))
        last_print = time.monotonic()
        while any(p.poll() is None for _, p, _, _ in procs):
            time.sleep(1.0)
            if time.monotonic() - last_print >= progress_s:
                last_print = time.monotonic()
                for r, p, _, started in procs:
                    if p.poll() is None:
                        print_progress(r, started)
        for r, p, handle, started in procs:
            handle.close()
            if p.returncode != 0 or not (r.checkpoint / ".metadata").is_file():
                tail = r.log_path.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"{r.name} failed (exit {p.returncode}); see {r.log_path}; its end:\n{tail}")
            log(f"{r.name}: done in {time.monotonic() - started:.0f} s")
    for r in runs:
        results[r.name] = parse_log(r.log_path.read_text(errors="replace"))
    return results


def print_progress(r: TrainRun, started: float) -> None:
    parsed = parse_log(r.log_path.read_text(errors="replace")) if r.log_path.is_file() else {"step": []}
    if not parsed["step"]:
        log(f"{r.name}: starting ({time.monotonic() - started:.0f} s)")
        return
    step, elapsed = parsed["step"][-1], time.monotonic() - started
    eta = elapsed / step * (r.steps - step)
    sparse = parsed["loss_sparse"][-1]
    log(f"{r.name}: step {step}/{r.steps}  loss {parsed['loss'][-1]:.4f}"
        + (f"  loss_sparse {sparse:.4f}" if sparse is not None else "")
        + f"  tok/s {parsed['tokens_per_s'] or 0:,.0f}  eta {eta:.0f} s")  # fmt: skip


def export_all(runs: list[tuple[str, TrainRun, str | None]], work: Path) -> dict[str, Path]:
    """``ratplus-export`` of every (name, run, pattern) to ``work/export/<run>``, side by side (CPU work)."""
    exports, procs = {}, []
    for name, run_, pattern in runs:
        out = work / "export" / run_.name
        exports[name] = out
        if not (out / "config.json").is_file():
            cmd = [sys.executable, "-m", "ratplus_titan.adapters.export", str(run_.checkpoint), str(out), "--dtype", "float32"]
            cmd += ["--pattern", pattern] if pattern else []
            log("$ " + " ".join(cmd))
            procs.append((cmd, subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
    for cmd, proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"export failed (exit {proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    return exports


def evaluate_all(scale: Scale, work: Path, exports: dict[str, Path]) -> list[dict]:
    """Held-out loss of every (model, checkpoint, pattern); a row that fails is recorded and the rest go on."""
    from ratplus_titan.eval.perplexity import evaluate_pattern, load, print_row, read_windows

    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    specs = sparse_specs(scale)
    windows = read_windows(work / "data" / "validation.bin", scale.seq_len, scale.eval_windows)
    rows = []
    for name, path in exports.items():
        model, checkpoint = name.split("/")
        # adapted to one pattern: evaluate it there, and dense (does dense quality survive?)
        labels = list(specs) if checkpoint == "pretrained" else [checkpoint.removeprefix("adapted_"), "dense"]
        caches = {label: work / "eval" / f"{model}_{checkpoint}_{label}.json" for label in labels}
        lm = None
        for label, cache in caches.items():
            if not cache.is_file():
                try:
                    lm = lm or load(path, scale.seq_len, dtype)
                    found = evaluate_pattern(lm, windows, specs[label], scale.eval_batch)
                    print_row(path, found)
                except Exception as e:  # one failed pattern must not cost the other rows
                    log(f"evaluation of {name} under {specs[label]} failed: {e!r}")
                    found = {"pattern": specs[label], "error": repr(e)[:2000]}
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(found))
            row = json.loads(cache.read_text())
            rows.append({"model": model, "checkpoint": checkpoint, **row, "pattern": label, "spec": row["pattern"]})
        del lm
    return rows


def niah_all(scale: Scale, work: Path, exports: dict[str, Path]) -> list[dict]:
    """NIAH single-needle at the training length: dense pretrained models, and adapted ones under their pattern."""
    rows = []
    first = scale.patterns[0]
    plan = [(f"{m}/pretrained", "dense") for m in MODELS] + [(f"{m}/adapted_{first}", first) for m in MODELS]
    for name, pattern in plan:
        out = work / "eval" / f"niah_{name.replace('/', '_')}_{pattern}.json"
        model, checkpoint = name.split("/")
        row = {"model": model, "checkpoint": checkpoint, "pattern": pattern, "length": scale.seq_len,
               "samples": scale.niah_samples}  # fmt: skip
        try:
            if not out.is_file():
                run([sys.executable, "-m", "ratplus_titan.eval.niah", str(exports[name]), "--lengths", str(scale.seq_len),
                     "--tasks", "single", "--samples", str(scale.niah_samples), "--pattern", pattern,
                     "--batch-size", str(min(scale.niah_samples, 8)), "--output", str(out), "--quiet"])  # fmt: skip
            report = json.loads(out.read_text())
            row["score"] = report["summary"]["single"][str(scale.seq_len)]
            row["answers"] = [s.get("prediction") for s in report["samples"][:3]]
        except Exception as e:  # record it and go on with the other runs
            log(f"NIAH of {name} failed: {e!r}")
            row["error"] = repr(e)[:2000]
        rows.append(row)
    return rows


def model_counts(scale: Scale) -> dict:
    """Parameters and training FLOPs per token of both models (dense pass; joint training adds the D=64 pass)."""
    import dataclasses

    from ratplus_titan.model import RATPlusModel, ratplus_flavors
    from ratplus_titan.pattern import DENSE, Pattern

    counts = {}
    for model in MODELS:
        args = dataclasses.replace(ratplus_flavors[scale.flavor], max_seq_len=scale.seq_len, apply_re=model == "ratplus")
        with torch.device("meta"):
            module = RATPlusModel(args)
        params, dense = args.get_nparams_and_flops(module, scale.seq_len, [DENSE] * args.n_layers)
        _, sparse = args.get_nparams_and_flops(module, scale.seq_len, [Pattern(scale.joint_dilation)] * args.n_layers)
        counts[model] = {"params": params, "flops_per_token_dense": dense, "flops_per_token_joint": dense + sparse,
                         "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads}  # fmt: skip
    counts["flops_ratio"] = counts["ratplus"]["flops_per_token_joint"] / counts["attention"]["flops_per_token_joint"]
    return counts


# ---- summary, plot, README --------------------------------------------------------------------------------
def summarize(result: dict) -> dict:
    """Each model's held-out loss under each pattern relative to its own dense loss, and, per local part,
    whether the paper's ordering holds: RAT+ at the smallest D within 3% of dense, attention at that D worse
    than RAT+, RAT+ at the largest D between the two."""
    loss = {(r["model"], r["checkpoint"], r["pattern"]): r.get("loss", math.nan) for r in result["heldout"]}
    patterns = result["config"]["patterns"]
    summary: dict = {}
    for model in MODELS:
        dense = loss[(model, "pretrained", "dense")]
        row: dict = {"dense": dense}
        for p in patterns:
            adapted = loss[(model, f"adapted_{p}", p)]
            row[p] = {"not_adapted": loss[(model, "pretrained", p)], "adapted": adapted,
                      "adapted_gap_pct": 100 * (adapted - dense) / dense}  # fmt: skip
        summary[model] = row
    rat, att = summary["ratplus"], summary["attention"]
    summary["expected_ordering"] = {
        local: {
            f"ratplus_{first}_within_3pct": rat[first]["adapted_gap_pct"] <= 3.0,
            f"attention_{first}_worse_than_ratplus": att[first]["adapted_gap_pct"] > rat[first]["adapted_gap_pct"],
            f"ratplus_{last}_between": rat[first]["adapted_gap_pct"] <= rat[last]["adapted_gap_pct"] <= att[last]["adapted_gap_pct"],
        }
        for local, (first, *_, last) in ((k, v if len(v) > 1 else v * 2) for k, v in families(patterns).items())
    }  # fmt: skip
    return summary


def plot(result: dict, path: Path) -> None:
    fig, axes = figure(1, 3, figsize=(17, 4.6))
    colors = {"ratplus": "tab:blue", "attention": "tab:red"}
    for model, color in colors.items():
        curve = result["training"][f"pretrain_{model}"]
        tokens = [s * result["config"]["tokens_per_step"] / 1e6 for s in curve["step"]]
        axes[0].plot(tokens, curve["loss"], color=color, label=f"{model} dense phase")
        if any(v is not None for v in curve["loss_sparse"]):
            axes[0].plot(tokens, curve["loss_sparse"], color=color, ls=":", label=f"{model} D={result['config']['joint_dilation']} phase")
        for p, ls in zip(result["config"]["patterns"], ("-", "--", "-.", ":")):
            curve = result["training"][f"adapt_{model}_{p}"]
            tokens = [s * result["config"]["tokens_per_step"] / 1e6 for s in curve["step"]]
            axes[1].plot(tokens, curve["loss"], color=color, ls=ls, label=f"{model} -> {p}")
    axes[0].set(title="pretraining (joint training)", xlabel="tokens (M)", ylabel="training loss")
    axes[1].set(title="resolution adaptation", xlabel="tokens (M)", ylabel="training loss")
    # each model against its own dense loss: the two models' absolute losses differ more than any pattern does
    rows = [r for r in result["heldout"] if "loss" in r and r["pattern"] != "dense"]
    dense = {r["model"]: r["loss"] for r in result["heldout"] if r["checkpoint"] == "pretrained" and r["pattern"] == "dense"}
    labels = list(dict.fromkeys(r["pattern"] for r in rows))
    width = 0.2
    for i, (model, kind) in enumerate([(m, k) for m in colors for k in ("pretrained", "adapted")]):
        values = []
        for label in labels:
            match = [r["loss"] for r in rows if r["model"] == model and r["pattern"] == label
                     and (r["checkpoint"] == "pretrained") == (kind == "pretrained")]  # fmt: skip
            values.append(100 * (match[0] - dense[model]) / dense[model] if match else float("nan"))
        axes[2].bar([x + (i - 1.5) * width for x in range(len(labels))], values, width, color=colors[model],
                    alpha=1.0 if kind == "adapted" else 0.45, label=f"{model} {kind}")  # fmt: skip
    axes[2].set_xticks(range(len(labels)), labels, rotation=25, ha="right")
    axes[2].axhline(0, color="black", lw=0.8)
    axes[2].set(title="held-out loss vs the model's own dense loss", ylabel="loss change (%)")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    env = result["env"]
    fig.suptitle(f"RAT+ vs attention, {result['config']['flavor']} flavor, {env['device']}, torch {env['torch']}, {env['date'][:10]}")
    save_figure(fig, path, dpi=110)


README_BEGIN, README_END = "<!-- reproduce:begin (python -m bench.reproduce --readme-only JSON) -->", "<!-- reproduce:end -->"


def readme_section(result: dict, json_name: str) -> str:
    cfg, env, counts = result["config"], result["env"], result["models"]
    loss = {(r["model"], r["checkpoint"], r["pattern"]): r for r in result["heldout"]}
    specs = cfg["specs"]
    lines = [
        f"{env['device']}, torch {env['torch']}, {env['date'][:10]} (`{json_name}`): {cfg['flavor']} flavor "
        f"({counts['ratplus']['params'] / 1e6:.0f}M parameters; the attention baseline {counts['attention']['params'] / 1e6:.0f}M), "
        f"T={cfg['seq_len']}, pretraining {cfg['pretrain_tokens'] / 1e6:.1f}M tokens with joint training (D={cfg['joint_dilation']}) "
        f"in {cfg['pretrain_steps']} steps, adaptation {cfg['adapt_tokens'] / 1e6:.1f}M unseen tokens ({cfg['adapt_steps']} steps, "
        f"lr {cfg['adapt_lr']:g}); held-out loss over {result['heldout'][0]['tokens']:,} tokens"
        + (f" of {cfg['validation_books']} held-out books" if cfg.get("validation_books") else "")
        + f". Wall time: {result['timing']['total_s'] / 60:.1f} min.",
        "",
        "| pattern | KV rows at T | RAT+ not adapted | RAT+ adapted | attention not adapted | attention adapted |",
        "|---|---|---|---|---|---|",
    ]

    def cell(model: str, checkpoint: str, label: str) -> str:
        row = loss.get((model, checkpoint, label))
        if row is None:
            return "-"
        if "loss" not in row:
            return "failed"
        dense = loss[(model, "pretrained", "dense")]["loss"]
        gap = 100 * (row["loss"] - dense) / dense
        return f"{row['loss']:.4f}" + ("" if label == "dense" and checkpoint == "pretrained" else f" ({gap:+.2f}%)")

    for label in specs:
        adapted = f"adapted_{label}" if label in cfg["patterns"] else None
        kv = loss[("ratplus", "pretrained", label)]["kv_rows"]
        lines.append(
            f"| `{specs[label]}` | {kv} | {cell('ratplus', 'pretrained', label)} | "
            f"{cell('ratplus', adapted, label) if adapted else '-'} | {cell('attention', 'pretrained', label)} | "
            f"{cell('attention', adapted, label) if adapted else '-'} |"
        )
    lines += ["", "Loss on the last positions only (where a sparse pattern sees least of the context):", "",
              "| pattern | bucket | RAT+ adapted | attention adapted |", "|---|---|---|---|"]  # fmt: skip
    for p in cfg["patterns"]:
        for bucket in list(loss[("ratplus", f"adapted_{p}", p)]["by_position"])[-1:]:
            r = loss[("ratplus", f"adapted_{p}", p)]["by_position"][bucket]
            a = loss[("attention", f"adapted_{p}", p)]["by_position"][bucket]
            rd = loss[("ratplus", "pretrained", "dense")]["by_position"][bucket]
            ad = loss[("attention", "pretrained", "dense")]["by_position"][bucket]
            lines.append(f"| `{p}` | positions {bucket} | {r:.4f} (dense {rd:.4f}, {100 * (r - rd) / rd:+.2f}%) | "
                         f"{a:.4f} (dense {ad:.4f}, {100 * (a - ad) / ad:+.2f}%) |")  # fmt: skip
    if result.get("niah"):
        lines += ["", f"NIAH single needle at {cfg['seq_len']} tokens ({result['niah'][0]['samples']} samples): "
                  + ", ".join(f"{r['model']} {r['checkpoint']} `{r['pattern']}` {r['score']:.0f}" for r in result["niah"]) + "."]  # fmt: skip
    return "\n".join(lines)


def write_readme(result: dict, json_name: str, readme: Path = REPO / "README.md") -> None:
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_BEGIN} ... {README_END} markers")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + README_BEGIN + "\n" + readme_section(result, json_name) + "\n" + README_END + tail)


# ---- main -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--scale", choices=sorted(SCALES), default="125m", help="model and data size (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="folder for the JSON and PNG")
    parser.add_argument("--work", type=Path, help="folder for data, checkpoints, logs (default: outputs/reproduce_<scale>)")
    parser.add_argument("--pretrain-steps", type=int, help="override the scale's pretraining steps")
    parser.add_argument("--adapt-steps", type=int, help="override the scale's adaptation steps")
    parser.add_argument("--adapt-lr", type=float, help="override the adaptation learning rate (default 8e-5)")
    parser.add_argument("--eval-windows", type=int, help="override the number of held-out windows evaluated")
    parser.add_argument("--niah-samples", type=int, help="override the number of NIAH samples")
    parser.add_argument("--concurrent", type=int, default=None,
                        help="training runs side by side on the device (default: 2 on a GPU, 1 on a CPU)")  # fmt: skip
    parser.add_argument("--batch", type=int, help="override the local batch size (windows a step)")
    parser.add_argument("--no-niah", action="store_true", help="skip the needle-in-a-haystack runs")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="tokenizer processes")
    parser.add_argument("--progress-s", type=float, default=20.0, help="seconds between progress lines (default: %(default)s)")
    parser.add_argument("--readme", action="store_true", help="also rewrite the README section from the result")
    parser.add_argument("--readme-only", type=Path, metavar="JSON", help="only rewrite the README section from this JSON")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    args = parser.parse_args(argv)
    if args.readme_only:
        write_readme(json.loads(args.readme_only.read_text()), args.readme_only.name)
        log(f"README section rewritten from {args.readme_only}")
        return 0
    for name in ("pretrain_steps", "adapt_steps", "eval_windows", "niah_samples", "batch", "concurrent"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.adapt_lr is not None and not args.adapt_lr > 0:
        parser.error(f"--adapt-lr must be > 0, got {args.adapt_lr}")
    scale = SCALES[args.scale]
    names = ("pretrain_steps", "adapt_steps", "adapt_lr", "eval_windows", "niah_samples", "batch")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if "pretrain_steps" in overrides:
        overrides["warmup_steps"] = max(1, overrides["pretrain_steps"] // 20)
    scale = Scale(**{**asdict(scale), **overrides})
    work = (args.work or REPO / "outputs" / f"reproduce_{args.scale}{args.tag}").resolve()
    concurrent = (2 if torch.cuda.is_available() else 1) if args.concurrent is None else args.concurrent
    started, timing = time.monotonic(), {}
    env = environment()
    result: dict = {"env": env, "scale": args.scale}
    out_json = args.out / f"reproduce_{device_slug()}{args.tag}.json"
    args.out.mkdir(parents=True, exist_ok=True)

    def save(stage: str, t0: float) -> None:
        timing[f"{stage}_s"] = round(time.monotonic() - t0, 1)
        timing["total_s"] = round(time.monotonic() - started, 1)
        result["timing"] = timing
        write_json(out_json, result)  # every stage leaves a readable file
        log(f"{stage} done ({timing[f'{stage}_s']:.0f} s, {timing['total_s']:.0f} s in all); wrote {out_json}")

    t0 = time.monotonic()
    data = prepare_data(work, scale, args.workers)
    manifest = REPO / Path(scale.corpus[0]).parent / "manifest.json"
    books = len(json.loads(manifest.read_text())["books"]["validation"]) if manifest.is_file() else None
    result["config"] = {**asdict(scale), "tokens_per_step": scale.tokens_per_step, "specs": sparse_specs(scale),
                        "validation_books": books, **data}  # fmt: skip
    result["models"] = model_counts(scale)
    save("data", t0)

    t0 = time.monotonic()
    pretrain = pretrain_runs(scale, work)
    result["training"] = train(pretrain, concurrent, args.progress_s)
    save("pretrain", t0)

    t0 = time.monotonic()
    adapt = adapt_runs(scale, work)
    result["training"].update(train(adapt, concurrent, args.progress_s))
    save("adapt", t0)

    t0 = time.monotonic()
    plan = [(f"{r.name.removeprefix('pretrain_')}/pretrained", r, None) for r in pretrain]
    for r in adapt:
        model, pattern = r.name.removeprefix("adapt_").split("_", 1)
        plan.append((f"{model}/adapted_{pattern}", r, pattern))
    exports = export_all(plan, work)
    result["heldout"] = evaluate_all(scale, work, exports)
    result["summary"] = summarize(result)
    save("evaluate", t0)

    if not args.no_niah:
        t0 = time.monotonic()
        result["niah"] = niah_all(scale, work, exports)
        save("niah", t0)

    plot(result, out_json.with_suffix(".png"))
    if args.readme:
        write_readme(result, out_json.name)
    print(readme_section(result, out_json.name))
    log(f"expected ordering (per local part): {result['summary']['expected_ordering']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
