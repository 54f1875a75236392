"""``python -m bench.reproduce``: the command line, and the stages run in order (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from bench.common import REPO, device_slug, environment, plot_or_skip, write_json
from bench.reproduce import pipeline, report
from bench.reproduce.scales import MODELS, SCALES, Scale
from bench.reproduce.stages import OutOfTime, StageClock, export_all, log, train
from ratplus_titan import cli

OVERRIDABLE = ("flavor", "pretrain_steps", "adapt_steps", "adapt_holdout_steps", "sft_steps", "pretrain_lr", "adapt_lr", "sft_lr", "batch",
               "micro_batch", "short_micro_batch", "eval_windows", "niah_train_samples", "niah_eval_samples", "recall_windows",
               "repeat_share", "seed", "joint_dilation", "patterns")  # fmt: skip
"""Scale fields a flag may change (``--pretrain-steps`` etc.); every one of them is part of the stage keys."""


STAGES = ("data", "pretrain", "adapt", "sft", "export", "niah", "heldout", "recall", "recall_text")
"""The stages in the order they run (the package docstring)."""

POSITIVE = cli.number_in(0, low_open=True)
"""The type of every float flag (learning rates, minutes, seconds)."""
class StopAfter(Exception):
    """The stage named by ``--stop-after`` is done."""


DILATED_FORM = "d<D>w<W>s<S> with dilation D >= 2, e.g. d16w256s4"
"""The form of each ``--patterns`` item: a sparse pattern with dilated rows, as the first one's dilation is the
top-k block size (``pipeline.topk_specs``) and its window the local window of the report."""


def dilated_pattern(text: str) -> str:
    """One ``--patterns`` item: a spec ``Pattern.parse`` reads, with dilation >= 2, spelt as ``str(Pattern)``
    spells it (stage keys and labels name it, so one pattern has one name)."""
    from ratplus_titan.pattern import Pattern

    try:
        pattern = Pattern.parse(text)
    except (TypeError, ValueError):
        pattern = None
    if pattern is None or pattern.dilation < 2:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed values are patterns {DILATED_FORM}")
    return str(pattern)


def pattern_specs(text: str) -> tuple[str, ...]:
    """``--patterns``: comma-separated ``dilated_pattern`` items, each named once (a tuple, as ``Scale.patterns``)."""
    specs = tuple(cli.comma_list(dilated_pattern)(text))
    if len(set(specs)) < len(specs):
        raise argparse.ArgumentTypeError(f"{text!r} names a pattern twice: give each pattern once")
    return specs


FLAG_TYPES = {
    "repeat_share": cli.number_in(0, 1),
    "joint_dilation": cli.int_at_least(2),  # 1 would be a second dense step
    "patterns": pattern_specs,
    "adapt_holdout_steps": cli.int_at_least(0),  # 0: hold out adapt_steps' windows
}
"""The argparse types of the ``OVERRIDABLE`` fields that allow less than their Python type (the rest: ``FIELD_TYPES``)."""
FIELD_TYPES = {"int": cli.positive_int, "float": POSITIVE, "str": str}
FLAG_HELP = {
    "patterns": f"override the scale's sparse patterns: comma-separated, each {DILATED_FORM}",
    "adapt_holdout_steps": "hold this many adaptation steps' windows out of pretraining (default: --adapt-steps'); "
    "runs whose --adapt-steps differ but stay within it share one pretraining",
}


def build_parser() -> argparse.ArgumentParser:
    from bench import reproduce

    doc = reproduce.__doc__ or ""
    parser = cli.ArgumentParser(prog="python -m bench.reproduce", description=doc.split("\n\n")[0],
                                epilog=doc.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "--scale", choices=sorted(SCALES), default="50m", help="model and data size (default: %(default)s)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="folder for the JSON and PNG")
    parser.add_argument(
        "--work", type=Path, help="folder for data, checkpoints, logs (default: outputs/reproduce_<scale>)"
    )
    types = {f.name: f.type for f in fields(Scale)}
    for name in OVERRIDABLE:
        kind = FLAG_TYPES.get(name) or FIELD_TYPES[str(types[name])]
        description = FLAG_HELP.get(name, f"override the scale's {name}")
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, help=description)
    parser.add_argument(
        "--models",
        type=cli.comma_list(cli.one_of(tuple(MODELS))),
        help=f"comma-separated subset of {', '.join(MODELS)} (default: all)",
    )
    parser.add_argument("--dense-only", action="store_true",
                        help="no adaptation and fine-tuning under the sparse patterns: fine-tune dense only and evaluate "
                        "the sparse patterns on the dense-fine-tuned models (a quicker run)")  # fmt: skip
    parser.add_argument("--no-niah", action="store_true",
                        help="no NIAH fine-tuning and evaluation: pretraining, adaptation, held-out loss and recall "
                        "alone (a quicker run)")  # fmt: skip
    parser.add_argument("--concurrent", type=cli.positive_int, default=None,
                        help="pretraining runs side by side (default: 3 on a GPU, 1 on a CPU); adaptation and "
                        "fine-tuning runs take up to 3x as many, as GPU memory allows")  # fmt: skip
    parser.add_argument(
        "--deadline-min",
        type=POSITIVE,
        default=None,
        help="start no training run after this many minutes; exit 3 (rerun to continue)",
    )
    parser.add_argument(
        "--workers", type=cli.positive_int, default=min(16, os.cpu_count() or 1), help="tokenizer processes"
    )
    parser.add_argument(
        "--progress-s", type=POSITIVE, default=20.0, help="seconds between progress lines (default: %(default)s)"
    )
    parser.add_argument(
        "--stop-after", choices=STAGES[:-1], default=None,
        help="stop once this stage is done (exit 0); a later run with the same settings reuses it, e.g. to "
        "fine-tune one pretrained model several ways in copies of the work folder (to vary --adapt-steps there, "
        "give every copy one --adapt-holdout-steps at least the largest)",
    )  # fmt: skip
    parser.add_argument("--readme", action="store_true", help="also rewrite the README section from the result")
    parser.add_argument(
        "--readme-only", type=Path, metavar="JSON", help="only rewrite the README section (and the PNG) from this JSON"
    )
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    return parser


def chosen_scale(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Scale:
    """The ``--scale`` with the flags' overrides; a scale they make unusable is ``parser.error`` (exit 2)."""
    overrides = {name: getattr(args, name) for name in OVERRIDABLE if getattr(args, name) is not None}
    if "pretrain_steps" in overrides:
        overrides["warmup_steps"] = max(1, overrides["pretrain_steps"] // 20)
    if args.models:
        overrides["models"] = tuple(args.models)
    if args.dense_only:
        overrides["sparse_runs"] = False
    if args.no_niah:
        overrides["niah"] = False
    scale = replace(SCALES[args.scale], **overrides)
    problem = scale_problem(scale)
    if problem:
        parser.error(problem)
    return scale


def scale_problem(scale: Scale) -> str | None:
    """What makes ``scale`` (after the overrides) unusable, naming the flags to change; None when nothing does."""
    from ratplus_titan.pattern import Pattern

    for name in ("micro_batch", "short_micro_batch"):
        if scale.batch % getattr(scale, name):
            return f"--batch {scale.batch} must be a multiple of --{name.replace('_', '-')} {getattr(scale, name)}"
    distance = pipeline.recall_distance(scale)
    for spec in scale.patterns:  # recall, NIAH's far needles and the repeats in training lie beyond the window
        if Pattern.parse(spec).local_window >= distance:
            return (f"--patterns {spec}: the local window must be below the recall distance {distance} "
                    f"(seq_len {scale.seq_len} / 2)")  # fmt: skip
    return None


def concurrency(requested: int | None, scale: Scale) -> tuple[int, int]:
    """(pretraining runs, short runs) side by side: on a GPU, 3 and as many short runs as its free memory holds
    at ``scale.short_run_gib`` each (<= 9); on a CPU, 1 and 2 (a short run spends most of its time starting up)."""
    if not torch.cuda.is_available():
        return requested or 1, requested or 2
    free_gib = torch.cuda.mem_get_info()[0] / 2**30
    long = requested or 3
    return long, max(1, min(3 * long, int(free_gib // scale.short_run_gib)))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.readme_only:
        result = json.loads(args.readme_only.read_text())
        result["summary"] = report.summarize(result)  # the JSON's numbers, judged by today's rules
        plot_or_skip(report.plot, result, args.readme_only.with_suffix(".png"))
        report.write_readme(result, args.readme_only.name)
        log(f"README section and figure rewritten from {args.readme_only}")
        return 0
    scale = chosen_scale(parser, args)
    work = (args.work or REPO / "outputs" / f"reproduce_{args.scale}{args.tag}").resolve()
    long, short = concurrency(args.concurrent, scale)
    result: dict = {"env": environment(), "scale": args.scale}
    clock = StageClock(work, result["env"]["date"])
    deadline = clock.started + 60 * args.deadline_min if args.deadline_min else None
    out_json = args.out / f"reproduce_{device_slug()}{args.tag}.json"
    args.out.mkdir(parents=True, exist_ok=True)

    def save(stage: str) -> None:
        timing = clock.stop()
        result["timing"], result["timing_calls"], result["timing_all_calls"] = timing, clock.calls, clock.all_calls()
        write_json(out_json, result)  # every stage leaves a readable file
        log(f"{stage} done ({timing[f'{stage}_s']:.0f} s, {timing['total_s']:.0f} s in all); wrote {out_json}")
        if stage == args.stop_after:
            raise StopAfter(stage)

    log(f"scale {args.scale}: {scale}; work {work}; runs side by side: {long} long, {short} short")
    try:
        clock.start("data")
        data = pipeline.prepare_data(work, scale, args.workers)
        manifest = REPO / Path(scale.corpus[0]).parent / "manifest.json"
        books = len(json.loads(manifest.read_text())["books"]["validation"]) if manifest.is_file() else None
        result["config"] = {**asdict(scale), "tokens_per_step": scale.tokens_per_step, "specs": pipeline.sparse_specs(scale),
                            "local_window": pipeline.local_window(scale), "recall_distance": pipeline.recall_distance(scale), "validation_books": books, **data}  # fmt: skip
        result["models"] = pipeline.model_counts(scale)
        save("data")

        clock.start("pretrain")
        with ProcessPoolExecutor(1) as pool:  # the NIAH samples are written while the models pretrain
            niah_data = pool.submit(pipeline.niah_splits, work, scale) if scale.niah else None
            pretrained = pipeline.pretrain_runs(work, scale, data)
            result["training"] = train(list(pretrained.values()), long, args.progress_s, deadline)
            data["files"].update(niah_data.result() if niah_data else {})
            result["config"]["files"] = data["files"]
        save("pretrain")

        clock.start("adapt")
        adapted = pipeline.adapt_runs(work, scale, data, pretrained)
        result["training"].update(train(list(adapted.values()), short, args.progress_s, deadline))
        save("adapt")

        clock.start("sft")
        tuned = pipeline.sft_runs(work, scale, data, pretrained, adapted)
        result["training"].update(train(list(tuned.values()), short, args.progress_s, deadline))
        save("sft")

        clock.start("export")
        plan = {(m, "pretrained"): (r, "dense") for m, r in pretrained.items()}
        plan |= {(m, f"adapted_{p}"): (r, p) for (m, p), r in adapted.items()}
        plan |= {(m, f"sft_{p}"): (r, p) for (m, p), r in tuned.items()}
        exports = export_all(plan, work)
        save("export")

        clock.start("niah")
        result["niah"] = pipeline.niah_all(
            work, scale, data, {k: v for k, v in exports.items() if k[1].startswith("sft_")}
        )
        save("niah")

        clock.start("heldout")
        lm_exports = {k: v for k, v in exports.items() if not k[1].startswith("sft_")}
        result["heldout"] = pipeline.heldout_all(work, scale, data, lm_exports)
        save("heldout")

        clock.start("recall")
        result["recall"] = pipeline.recall_all(work, scale, lm_exports)
        save("recall")

        clock.start("recall_text")
        result["recall_text"] = pipeline.recall_text_all(work, scale, data, lm_exports)
        save("recall_text")
    except StopAfter as e:
        log(f"stopped after the {e} stage (--stop-after); rerun without it to continue")
        return 0
    except OutOfTime as e:
        clock.stop(cut=True)
        log(f"stopped: {e}. Rerun the same command to continue from the finished stages.")
        return 3
    except KeyboardInterrupt:
        clock.stop(cut=True)  # the seconds spent stay in work/calls.json
        log(f"interrupted in the {clock.stage} stage; rerun the same command to continue from the finished stages")
        raise

    result["summary"] = report.summarize(result)
    write_json(out_json, result)
    plot_or_skip(report.plot, result, out_json.with_suffix(".png"))
    if args.readme:
        report.write_readme(result, out_json.name)
    print(report.readme_section(result, out_json.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
