"""The reproduction's stages, in order: data, pretraining, adaptation, NIAH fine-tuning, export, evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from bench.common import REPO
from bench.reproduce import repeats as repeats_module
from bench.reproduce.scales import MODELS, Model, Scale
from bench.reproduce.stages import TrainRun, file_digest, log, stage_dir, train_run
from ratplus_titan.data.pretokenize import pretokenize

DENSE = "dense"
TOKENIZER = REPO / "ratplus_titan" / "assets" / "llama2" / "tokenizer.model"


# ---- data ------------------------------------------------------------------------------------------------
def corpus_files(scale: Scale) -> dict[str, Path]:
    """The scale's (train, validation) text files, checked to exist."""
    corpus = {split: REPO / text for split, text in zip(("train", "validation"), scale.corpus)}
    for path in corpus.values():
        if not path.is_file():
            raise FileNotFoundError(
                f"corpus file {path} is missing: build it with scripts/build_gutenberg_corpus.py (data/README.md)"
            )
    return corpus


def prepare_data(work: Path, scale: Scale, workers: int) -> dict:
    """Tokens of the corpus: pretraining windows, then adaptation windows pretraining never sees, and the
    held-out windows. Pretraining that needs more windows than the corpus holds past the adaptation ones
    takes several epochs over them (each in its own seeded order). Returns the files and their sizes (the NIAH splits come from ``niah_splits``)."""
    import numpy as np

    corpus = corpus_files(scale)
    digests = {split: file_digest(path) for split, path in corpus.items()}
    tokens_dir = stage_dir(work, "data", "tokens", {"corpus": digests, "tokenizer": file_digest(TOKENIZER)})
    files = {}
    for split, source in corpus.items():
        files[split] = tokens_dir / f"{split}.bin"
        if not files[split].is_file():  # pretokenize writes under a temporary name and renames when complete
            log(f"tokenizing {source} into {files[split]}")
            pretokenize([source], files[split], workers=workers)
    tokens = np.memmap(files["train"], dtype=np.uint16, mode="r")
    window = scale.seq_len + 1
    need = {"pretrain": scale.pretrain_steps * scale.batch * window, "adapt": scale.adapt_steps * scale.batch * window}
    # adaptation takes unseen windows; pretraining the rest, in several epochs when it needs more than the rest.
    # The windows held out are sized by the larger of adapt_steps and adapt_holdout_steps, so runs that differ
    # only in adapt_steps (up to the hold-out) pretrain on the same cut and share the pretraining stage.
    holdout_steps = max(scale.adapt_steps, scale.adapt_holdout_steps)
    holdout = holdout_steps * scale.batch * window
    pretrain_cut = min(need["pretrain"], (len(tokens) - holdout) // window * window)
    if pretrain_cut < scale.batch * window:
        raise ValueError(
            f"{files['train']} holds {len(tokens):,} tokens: after the {holdout:,} held out for adaptation "
            f"({holdout_steps} steps of {scale.batch} x {window}), less than one "
            f"pretraining batch is left: fewer adapt_steps / adapt_holdout_steps, or a larger corpus"
        )
    cuts = {"pretrain": (0, pretrain_cut), "adapt": (pretrain_cut, pretrain_cut + need["adapt"])}
    repeats = {"share": scale.repeat_share, "min_distance": local_window(scale) + 1, "seed": scale.seed,
               "source": file_digest(Path(repeats_module.__file__))}  # fmt: skip
    for i, (name, (lo, hi)) in enumerate(cuts.items()):
        # each cut its own stage: the pretraining file's key (and so the pretraining runs') names only its own cut
        cut_dir = stage_dir(work, "data", name, {"tokens": tokens_dir.name, "cut": (lo, hi), "index": i, "repeats": repeats})
        path = cut_dir / f"{name}.bin"
        if not path.is_file() or path.stat().st_size != 2 * (hi - lo):
            partial = path.with_suffix(".partial")
            windows = np.asarray(tokens[lo:hi]).reshape(-1, window)
            if scale.repeat_share > 0:  # the same share of each cut, drawn apart
                windows = repeats_module.add_repeats(
                    windows, scale.repeat_share, repeats["min_distance"], scale.seed + i
                )
            windows.tofile(partial)
            partial.rename(path)
        files[name] = path
    validation = np.memmap(files["validation"], dtype=np.uint16, mode="r")
    return {
        "train_tokens": int(len(tokens)), "validation_tokens": int(len(validation)),
        "pretrain_tokens": need["pretrain"], "pretrain_epochs": need["pretrain"] / pretrain_cut, "adapt_tokens": need["adapt"],
        "files": {k: str(v) for k, v in files.items()},
    }  # fmt: skip


def niah_splits(work: Path, scale: Scale) -> dict[str, str]:
    """NIAH fine-tuning samples (training books) and evaluation samples (held-out books), disjoint keys
    and values; keyed by the corpus, the generator's source and every sample setting. Only fine-tuning
    needs them: ``main`` writes them in a second process while the models pretrain."""
    from ratplus_titan.data.tokenizer import load_tokenizer
    from ratplus_titan.eval import niah
    from ratplus_titan.eval import niah_splits as splits

    corpus = corpus_files(scale)
    digests = {split: file_digest(path) for split, path in corpus.items()}

    per_task = {"train": scale.niah_train_samples // len(scale.niah_tasks), "eval": scale.niah_eval_samples}
    settings = {
        "corpus": digests, "length": scale.seq_len, "tasks": scale.niah_tasks, "per_task": per_task, "seed": scale.seed,
        "source": [file_digest(Path(m.__file__)) for m in (niah, splits)],
    }  # fmt: skip
    folder = stage_dir(work, "data", "niah", settings)
    out = {"niah_train": folder / splits.TRAIN_FILE, "niah_eval": folder / splits.EVAL_FILE}
    if not all(p.is_file() for p in out.values()):
        log(f"NIAH splits: {per_task['train']} fine-tuning and {per_task['eval']} evaluation samples per task")
        splits.make_splits(
            load_tokenizer(TOKENIZER), train_haystack=corpus["train"], eval_haystack=corpus["validation"],
            length=scale.seq_len, tasks=scale.niah_tasks, n_train=per_task["train"], n_eval=per_task["eval"],
            seed=scale.seed, out_dir=folder, progress=True,
        )  # fmt: skip
    return {k: str(v) for k, v in out.items()}


# ---- training runs ---------------------------------------------------------------------------------------
def pattern_args(spec: str) -> list[str]:
    from ratplus_titan.pattern import Pattern

    p = Pattern.parse(spec)
    return [
        "--ratplus.dilation",
        str(p.dilation),
        "--ratplus.local_window",
        str(p.local_window),
        "--ratplus.sinks",
        str(p.sinks),
    ]


def model_args(model: Model) -> list[str]:
    return ["--ratplus.apply-re", str(model.apply_re)]


def common_args(scale: Scale, steps: int, micro_batch: int, compile_: bool) -> list[str]:
    return [
        "--model.flavor", scale.flavor, "--training.seq_len", str(scale.seq_len),
        "--training.local_batch_size", str(micro_batch), "--training.global_batch_size", str(scale.batch),
        "--training.steps", str(steps), "--checkpoint.interval", str(scale.checkpoint_interval),
        "--metrics.log_freq", str(scale.log_freq), "--metrics.disable_color_printing",
        "--ratplus.data_seed", str(scale.seed), "--compile.enable" if compile_ else "--compile.no-enable", *scale.extra,
    ]  # fmt: skip


def schedule(warmup: int, lr: float) -> list[str]:
    return ["--lr_scheduler.warmup_steps", str(warmup), "--optimizer.lr", str(lr)]


def pretrain_runs(work: Path, scale: Scale, data: dict) -> dict[str, TrainRun]:
    runs = {}
    for name in scale.models:
        model = MODELS[name]
        args = [
            *common_args(scale, scale.pretrain_steps, scale.micro_batch, scale.compile_pretrain),
            *schedule(scale.warmup_steps, scale.pretrain_lr),
            "--training.dataset", "bin", "--training.dataset_path", data["files"]["pretrain"], *model_args(model),
            *(["--ratplus.joint-train", "--ratplus.joint_dilation", str(scale.joint_dilation)] if model.joint_train
              else ["--ratplus.no-joint-train"]),
        ]  # fmt: skip
        runs[name] = train_run(
            work, f"pretrain_{name}", "train_configs/reproduce_pretrain.toml", args, scale.pretrain_steps
        )
    return runs


def start_from(checkpoint: Path) -> list[str]:
    return [
        "--checkpoint.initial_load_path",
        str(checkpoint),
        "--checkpoint.initial_load_model_only",
        "--ratplus.no-joint-train",
    ]


def adapt_runs(
    work: Path, scale: Scale, data: dict, pretrained: dict[str, TrainRun]
) -> dict[tuple[str, str], TrainRun]:
    runs = {}
    for name in scale.models:
        model = MODELS[name]
        for spec in scale.patterns if scale.sparse_runs else ():
            args = [
                *common_args(scale, scale.adapt_steps, scale.short_micro_batch, scale.compile_short),
                *schedule(0, scale.adapt_lr), "--training.dataset", "bin",
                "--training.dataset_path", data["files"]["adapt"], *model_args(model), *pattern_args(spec),
                *start_from(pretrained[name].checkpoint),
            ]  # fmt: skip
            runs[(name, spec)] = train_run(
                work, f"adapt_{name}_{spec}", "train_configs/reproduce_adapt.toml", args, scale.adapt_steps
            )
    return runs


def tuned_patterns(scale: Scale) -> tuple[str, ...]:
    """The patterns each model is fine-tuned (and adapted) under: dense, and each sparse one unless
    ``sparse_runs`` is off (then the sparse patterns are only evaluated on the dense-fine-tuned models)."""
    return (DENSE, *scale.patterns) if scale.sparse_runs else (DENSE,)


def sft_runs(
    work: Path, scale: Scale, data: dict, pretrained: dict[str, TrainRun], adapted: dict[tuple[str, str], TrainRun]
) -> dict[tuple[str, str], TrainRun]:
    """Each model fine-tuned on the NIAH training split under each pattern: dense from the pretrained
    checkpoint, a sparse pattern from the checkpoint adapted to it (the paper's protocol). None without
    ``scale.niah``."""
    runs = {}
    for name in scale.models if scale.niah else ():
        model = MODELS[name]
        for spec in tuned_patterns(scale):
            source = pretrained[name] if spec == DENSE else adapted[(name, spec)]
            args = [
                *common_args(scale, scale.sft_steps, scale.short_micro_batch, scale.compile_short),
                *schedule(scale.sft_warmup_steps, scale.sft_lr), "--training.dataset", "sft",
                "--training.dataset_path", data["files"]["niah_train"], *model_args(model),
                *pattern_args("d1w0s0" if spec == DENSE else spec), *start_from(source.checkpoint),
            ]  # fmt: skip
            runs[(name, spec)] = train_run(
                work, f"sft_{name}_{spec}", "train_configs/reproduce_sft.toml", args, scale.sft_steps
            )
    return runs


# ---- evaluation ------------------------------------------------------------------------------------------
def sparse_specs(scale: Scale) -> dict[str, str]:
    """Every pattern evaluated, by label: dense; the sliding window + sinks alone (the first pattern's);
    each sparse pattern; top-k block attention at the first sparse pattern's KV budget, by block score."""
    from ratplus_titan.pattern import Pattern

    first = Pattern.parse(scale.patterns[0])
    specs = {DENSE: DENSE, "window": f"d-1w{first.local_window}s{first.sinks}"}
    specs.update({p: p for p in scale.patterns})
    specs.update(topk_specs(scale))
    return specs


def topk_specs(scale: Scale) -> dict[str, str]:
    """Top-k block attention reading as many KV rows as the first sparse pattern (DESIGN §2: blocks of D)."""
    from ratplus_titan.pattern import Pattern

    first = Pattern.parse(scale.patterns[0])
    rows = first.cache_rows(scale.seq_len)  # S + W + ceil(T / D)
    block = first.dilation
    top_k = max(1, (rows - first.sinks) // block - 1)  # sinks + (top_k + 1) blocks = the same rows
    return {f"topk-{score}": f"topk{block}k{top_k}s{first.sinks}-{score}" for score in ("ratplus", "quest", "moba")}


def heldout_all(work: Path, scale: Scale, data: dict, exports: dict[tuple[str, str], Path]) -> list[dict]:
    """Held-out LM loss by position (held-out books' windows)."""
    from ratplus_titan.eval.perplexity import DEFAULT_BUCKETS, read_windows

    windows = read_windows(data["files"]["validation"], scale.seq_len, scale.eval_windows)
    source = {"validation": file_digest(Path(data["files"]["validation"])), "windows": scale.eval_windows}
    return loss_all(work, scale, exports, windows, "loss", source, edges=DEFAULT_BUCKETS)


def recall_distance(scale: Scale) -> int:
    """The period of the repeated-token windows: half the sequence, 4x the local window at the 50m scale."""
    return scale.seq_len // 2


def recall_all(work: Path, scale: Scale, exports: dict[tuple[str, str], Path]) -> list[dict]:
    """Exact recall beyond the local window: loss on random-token windows repeating with period
    ``recall_distance`` (``eval/repeated_tokens.py``); bucket ``distance-seq_len`` is the repeats."""
    from ratplus_titan.eval.repeated_tokens import repeated_windows
    from ratplus_titan.model import ratplus_flavors

    distance, vocab = recall_distance(scale), ratplus_flavors[scale.flavor].vocab_size
    windows = repeated_windows(scale.recall_windows, scale.seq_len, distance, vocab, scale.seed)
    source = {"repeated": [scale.recall_windows, distance, vocab, scale.seed]}
    return loss_all(work, scale, exports, windows, "recall", source, edges=(distance,))


def recall_text_windows(scale: Scale, validation: Path) -> torch.Tensor:
    """``recall_windows`` windows of held-out text (drawn by ``scale.seed`` from the validation tokens), each
    its beginning repeated with period ``recall_distance`` (``eval/repeated_tokens.py``)."""
    from ratplus_titan.eval.perplexity import read_windows
    from ratplus_titan.eval.repeated_tokens import repeated_text

    text = read_windows(validation, scale.seq_len, scale.recall_windows, seed=scale.seed)
    return repeated_text(text, recall_distance(scale))


def recall_text_all(work: Path, scale: Scale, data: dict, exports: dict[tuple[str, str], Path]) -> list[dict]:
    """Recall of natural text beyond the local window: loss on ``recall_text_windows``, whose repeats a model
    predicts by copying the text ``recall_distance`` back; the first period is ordinary LM loss, the
    reference. Rows as ``recall_all``'s."""
    validation = Path(data["files"]["validation"])
    distance = recall_distance(scale)
    windows = recall_text_windows(scale, validation)
    source = {"validation": file_digest(validation), "repeated_text": [scale.recall_windows, distance, scale.seed]}
    return loss_all(work, scale, exports, windows, "recall_text", source, edges=(distance,))


def loss_all(
    work: Path, scale: Scale, exports: dict[tuple[str, str], Path], windows: torch.Tensor, name: str,
    source: dict, edges: tuple[int, ...],
) -> list[dict]:  # fmt: skip
    """Loss by position on ``windows [N, T + 1]`` (keyed by ``source``): each pretrained model under every
    pattern, each adapted one under its pattern and dense. A failed row is recorded and the rest go on."""
    from ratplus_titan.eval.perplexity import evaluate_pattern, load, print_row

    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    specs = sparse_specs(scale)
    rows = []
    for (model, checkpoint), path in exports.items():
        labels = list(specs) if checkpoint == "pretrained" else [checkpoint.removeprefix("adapted_"), DENSE]
        lm = None
        for label in labels:
            settings = {"export": path.name, "spec": specs[label], "dtype": dtype, "edges": edges, **source}
            cache = stage_dir(work, "eval", f"{name}_{model}_{checkpoint}_{label}", settings) / "row.json"
            if not cache.is_file():
                try:
                    lm = lm or load(path, scale.seq_len, dtype)
                    found = evaluate_pattern(lm, windows, specs[label], scale.eval_batch, edges)
                    print_row(path.name, found)
                except Exception as e:  # one failed pattern must not cost the other rows
                    log(f"{name} of {model} {checkpoint} under {specs[label]} failed: {e!r}")
                    found = {"pattern": specs[label], "error": repr(e)[:2000]}
                cache.write_text(json.dumps(found))
            row = json.loads(cache.read_text())
            rows.append({"model": model, "checkpoint": checkpoint, **row, "pattern": label, "spec": row["pattern"]})
        del lm
    return rows


def niah_plan(scale: Scale) -> list[tuple[str, str, str]]:
    """(model, fine-tuned under, evaluated under): each model fine-tuned and evaluated under each pattern;
    the dense-fine-tuned models also under each sparse pattern and top-k block attention, not fine-tuned for it;
    and the models fine-tuned under the first sparse pattern under top-k block attention too, whose blocks are
    that pattern's dilation (the RAT+ score reads the very keys that model learned to retrieve through)."""
    plan = []
    for model in scale.models:
        plan += [(model, spec, spec) for spec in tuned_patterns(scale)]
        plan += [(model, DENSE, label) for label in ("window", *scale.patterns, *topk_specs(scale))]
        if scale.sparse_runs:
            plan += [(model, scale.patterns[0], label) for label in topk_specs(scale)]
    return plan


def niah_all(work: Path, scale: Scale, data: dict, exports: dict[tuple[str, str], Path]) -> list[dict]:
    """NIAH accuracy on the held-out split, by task, depth and needle distance, for every row of ``niah_plan``;
    ``far_accuracy``: on the samples whose answer needle lies beyond the local window from the question."""
    from ratplus_titan.cli import parse_patterns
    from ratplus_titan.eval.niah import accuracy_by, evaluate_file
    from ratplus_titan.eval.perplexity import pattern_rows

    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    specs = sparse_specs(scale)
    window = local_window(scale)
    rows = []
    for model, tuned, label in niah_plan(scale) if scale.niah else ():
        path = exports[(model, f"sft_{tuned}")]
        settings = {"export": path.name, "spec": specs[label], "samples": file_digest(Path(data["files"]["niah_eval"])),
                    "dtype": dtype, "window": window}  # fmt: skip
        cache = stage_dir(work, "eval", f"niah_{model}_{tuned}_{label}", settings) / "report.json"
        row = {"model": model, "tuned": tuned, "pattern": label, "spec": specs[label],
               "kv_rows": pattern_rows(parse_patterns(specs[label])[0], scale.seq_len)}  # fmt: skip
        if not cache.is_file():
            try:
                report = evaluate_file(path, data["files"]["niah_eval"], pattern=specs[label], batch_size=scale.eval_batch,
                                       dtype=dtype, distance_edges=(window, 4 * window))  # fmt: skip
            except Exception as e:  # one failed evaluation must not cost the others
                log(f"NIAH of {model} (fine-tuned {tuned}) under {specs[label]} failed: {e!r}")
                rows.append({**row, "error": repr(e)[:2000]})
                continue
            cache.write_text(json.dumps(report))
        report = json.loads(cache.read_text())
        samples = report["samples"]
        by_far = accuracy_by(samples, lambda s: "far" if s["answer_distance"] > window else None, ("far",))
        far = by_far.get("all", {"far": {"accuracy": None, "n": 0}})["far"]  # no "all" row when no needle is far
        row.update(
            samples=len(samples), accuracy=report["by_task"]["all"]["accuracy"], far_samples=far["n"],
            far_accuracy=math.nan if far["accuracy"] is None else far["accuracy"], by_task={t: v["accuracy"] for t, v in report["by_task"].items()},
            by_depth={b: v["accuracy"] for b, v in report["by_depth"]["all"].items()},
            by_distance={b: v["accuracy"] for b, v in report["by_distance"]["all"].items()},
            seconds=report.get("seconds"), examples=[(s.get("prediction"), s.get("outputs")) for s in samples[:2]],
        )  # fmt: skip
        rows.append(row)
        log(f"NIAH {model:16s} fine-tuned {tuned:10s} under {specs[label]:26s}: {row['accuracy']:5.1f}  "
            f"beyond the window {row['far_accuracy']:5.1f} ({far['n']} samples)")  # fmt: skip
    return rows


def local_window(scale: Scale) -> int:
    """The local window W of the first sparse pattern: needles farther than W are reached only through
    the dilated (or selected) rows."""
    from ratplus_titan.pattern import Pattern

    return Pattern.parse(scale.patterns[0]).local_window


def model_counts(scale: Scale) -> dict:
    """Parameters and training FLOPs per token of each model (joint training adds the D=64 pass)."""
    import dataclasses

    from ratplus_titan.model import RATPlusModel, ratplus_flavors
    from ratplus_titan.pattern import DENSE as DENSE_PATTERN
    from ratplus_titan.pattern import Pattern

    counts: dict = {}
    for name in scale.models:
        model = MODELS[name]
        args = dataclasses.replace(ratplus_flavors[scale.flavor], max_seq_len=scale.seq_len, apply_re=model.apply_re)
        with torch.device("meta"):
            module = RATPlusModel(args)
        params, dense = args.get_nparams_and_flops(module, scale.seq_len, [DENSE_PATTERN] * args.n_layers)
        _, sparse = args.get_nparams_and_flops(module, scale.seq_len, [Pattern(scale.joint_dilation)] * args.n_layers)
        counts[name] = {"params": params, "flops_per_token": dense + (sparse if model.joint_train else 0),
                        "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads}  # fmt: skip
    for name in scale.models:
        reference = counts.get("ratplus", counts[scale.models[0]])
        counts[name]["flops_vs_ratplus"] = counts[name]["flops_per_token"] / reference["flops_per_token"]
    return counts
