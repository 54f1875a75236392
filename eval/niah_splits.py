"""NIAH train/eval splits: fine-tune on needles in training books, evaluate on held-out books.

    python -m ratplus_titan.eval.niah_splits --train-haystack data/gutenberg/train.jsonl.xz \
        --eval-haystack data/gutenberg/validation.jsonl.xz --length 2048 --train-samples 1000 \
        --eval-samples 100 --out outputs/niah

writes ``OUT/niah_train.jsonl`` (fine-tuning records for ``[training] dataset = "sft"``: ``prompt``,
``answer`` and metadata) and ``OUT/niah_eval.jsonl`` (samples for ``ratplus-niah MODEL_DIR
--samples-file OUT/niah_eval.jsonl --scorer teacher-forced``). As the paper fine-tunes on RULER's NIAH
train split before evaluating (the official ``tokenize/needle.py``: the prompt masked, the answer
values and EOS trained), and like it:

- the two splits share no text: train haystacks are cut from ``--train-haystack``, eval haystacks
  from ``--eval-haystack`` (give held-out books);
- nor keys or values: keys are built from disjoint halves of the word lists and values from
  disjoint halves of the 7-digit numbers (``niah.split_of``);
- every needle's depth is drawn uniformly from 0-100 % and recorded, with its token distance from
  the end of the prompt (``distance``), so accuracy can be read by depth and by distance.

The train record's ``prompt`` + ``answer`` is the eval sample's ``prompt_text`` + ``answer``: the
format the teacher-forced scorer checks.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ratplus_titan import cli
from ratplus_titan.eval import niah

PROG = "python -m ratplus_titan.eval.niah_splits"
DEFAULT_TASKS = ("single", "multikey")
TRAIN_FILE, EVAL_FILE = "niah_train.jsonl", "niah_eval.jsonl"


def sft_record(sample: dict[str, Any]) -> dict[str, Any]:
    """A sample as a fine-tuning record: ``prompt``, ``answer``, and where its needles are."""
    return {
        "prompt": niah.prompt_text(sample),
        "answer": niah.expected_answer(sample),
        "task": sample["task"],
        "length": sample["length"],
        "depths": [n["depth"] for n in sample["needles"]],
        "distances": [n["distance"] for n in sample["needles"]],
        "answer_depth": sample["answer_depth"],
        "answer_distance": sample["answer_distance"],
    }


def make_splits(
    tokenizer: Any,
    train_haystack: str | Path | niah.Haystack,
    eval_haystack: str | Path | niah.Haystack,
    length: int,
    tasks: Sequence[str] = DEFAULT_TASKS,
    n_train: int = 1000,
    n_eval: int = 100,
    seed: int = 0,
    out_dir: str | Path = ".",
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``out_dir/niah_train.jsonl`` (``n_train`` fine-tuning records per task) and
    ``out_dir/niah_eval.jsonl`` (``n_eval`` samples per task) of ``length`` tokens each.

    Returns ``{"train": path, "eval": path, "train_records": n, "eval_samples": n, "eval_distance": {bucket: n}}``.
    """
    out_dir = Path(out_dir)

    def split(name: str, haystack, n: int) -> list[dict[str, Any]]:
        return niah.generate_samples(
            tokenizer, tasks, [length], n, "uniform", haystack, seed, split=name, progress=progress
        )

    train = split("train", train_haystack, n_train)
    evaluation = split("eval", eval_haystack, n_eval)
    train_path = niah.write_samples(out_dir / TRAIN_FILE, [sft_record(s) for s in train])
    eval_path = niah.write_samples(out_dir / EVAL_FILE, evaluation)
    buckets: dict[str, int] = {}
    for s in evaluation:
        bucket = niah.distance_bucket(s["answer_distance"])
        buckets[bucket] = buckets.get(bucket, 0) + 1
    return {"train": train_path, "eval": eval_path, "train_records": len(train), "eval_samples": len(evaluation),
            "eval_distance": buckets}  # fmt: skip


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(
        prog=PROG,
        description="Write NIAH fine-tuning records (train split, haystacks from training text) and evaluation "
        "samples (eval split, haystacks from held-out text), with disjoint keys and values and needle depths "
        "uniform over 0-100 %.",
        epilog="Fine-tune: [training] dataset = 'sft', dataset_path = OUT/niah_train.jsonl. Evaluate: "
        "ratplus-niah MODEL_DIR --samples-file OUT/niah_eval.jsonl --scorer teacher-forced.",
    )
    parser.add_argument("--train-haystack", required=True,
                        help="training text: a .jsonl/.jsonl.gz/.jsonl.xz file of {'text'} documents, a .txt file, a folder "
                        "of .txt files, or 'essays' / 'noise'")  # fmt: skip
    parser.add_argument("--eval-haystack", required=True, help="held-out text (the same kinds)")
    parser.add_argument("--length", type=cli.token_count, required=True,
                        help="sample length in tokens (prompt + answer budget), e.g. 2048 or 4k; fine-tune with "
                        "training.seq_len >= this")  # fmt: skip
    parser.add_argument(
        "--tasks",
        type=cli.comma_list(cli.one_of(tuple(niah.TASKS))),
        default=list(DEFAULT_TASKS),
        help=f"comma-separated subset of {', '.join(niah.TASKS)} (default: single,multikey)",
    )
    parser.add_argument(
        "--train-samples",
        type=cli.positive_int,
        default=1000,
        help="fine-tuning records per task (default: %(default)s)",
    )
    parser.add_argument(
        "--eval-samples", type=cli.positive_int, default=100, help="evaluation samples per task (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of both splits (default: %(default)s)")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer file/folder of the model to fine-tune (default: the shipped LLaMA-2 tokenizer)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ratplus_titan.data.tokenizer import load_tokenizer

    with cli.user_errors(PROG):
        tokenizer = load_tokenizer(args.tokenizer)
        train = niah.Haystack.load(args.train_haystack, tokenizer)
        held_out = niah.Haystack.load(args.eval_haystack, tokenizer)
        if train.name == held_out.name and train.name not in ("essays", "noise"):
            print(f"{PROG}: warning: train and eval haystacks are the same text ({train.name})", file=sys.stderr)
        result = make_splits(tokenizer, train, held_out, args.length, args.tasks, args.train_samples,
                             args.eval_samples, args.seed, args.out, progress=not args.quiet)  # fmt: skip
    print(f"{PROG}: wrote {result['train_records']} fine-tuning records to {result['train']} and "
          f"{result['eval_samples']} evaluation samples to {result['eval']} (answer needle distance: "
          + ", ".join(f"{b} {n}" for b, n in result["eval_distance"].items()) + ")")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
