"""Long-context QA on LongBench-format files: ``ratplus-longbench MODEL_DIR data/*.jsonl --pattern d16w256s4``.

Reads the LongBench (v1 / LongBench-E) jsonl files you have locally, one task per file, named
``<task>.jsonl`` or ``<task>_e.jsonl`` (fields ``input``, ``context``, ``answers``,
``all_classes``, ``length``). Per task it builds LongBench's prompt, truncates it in the
middle to fit the model (``--max-length`` minus the task's answer budget; the start and the
end hold the instructions and the question), generates greedily, and scores with LongBench's
metric. Prints a table and writes ``<task>.jsonl`` predictions plus ``result.json``.

Supported: the English tasks. Metrics follow LongBench's ``metrics.py``: QA F1 (normalised
bag of words), ROUGE-L F (our implementation, ``rouge-score``-style tokenisation; LongBench
used the ``rouge`` package, whose numbers differ slightly), classification accuracy, passage
count / retrieval accuracy, code edit similarity (``difflib`` ratio, as fuzzywuzzy without
python-Levenshtein). A sample scores the best over its answers; a task the mean x 100.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import string
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ratplus_titan import cli

PROG = "ratplus-longbench"

# ---- metrics (LongBench metrics.py) ------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    common = Counter(prediction) & Counter(reference)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, reference: str, **kwargs: Any) -> float:
    """Bag-of-words F1 between the normalised prediction and reference."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def rouge_tokens(text: str) -> list[str]:
    """``rouge-score``'s default tokenisation: lower case, runs of non-alphanumerics split."""
    return [t for t in re.split(r"[^a-z0-9]+", text.lower()) if t]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence (dynamic programming, one row at a time)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_score(prediction: str, reference: str, **kwargs: Any) -> float:
    """ROUGE-L F1: LCS of the token sequences over their lengths."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def classification_score(prediction: str, reference: str, all_classes: Sequence[str] | None = None, **kwargs: Any) -> float:
    """1 / (classes named in the prediction) if the reference is among them, else 0.

    Class names that are substrings of the reference (but not the reference) do not count.
    """
    if not all_classes:
        raise ValueError("classification_score needs all_classes (the sample's 'all_classes' field)")
    named = [c for c in all_classes if c in prediction]
    named = [c for c in named if not (c in reference and c != reference)]
    return 1.0 / len(named) if reference in named else 0.0


def count_score(prediction: str, reference: str, **kwargs: Any) -> float:
    """Fraction of the numbers in the prediction that equal the reference count."""
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(reference) for n in numbers) / len(numbers) if numbers else 0.0


def retrieval_score(prediction: str, reference: str, **kwargs: Any) -> float:
    """Fraction of the numbers in the prediction that equal the reference's ``Paragraph N``."""
    match = re.search(r"Paragraph (\d+)", reference)
    if match is None:
        raise ValueError(f"retrieval reference {reference!r} does not name a 'Paragraph N'")
    numbers = re.findall(r"\d+", prediction)
    return sum(n == match[1] for n in numbers) / len(numbers) if numbers else 0.0


def code_sim_score(prediction: str, reference: str, **kwargs: Any) -> float:
    """Edit similarity (0..1, two decimals) of the first code line of the prediction and the reference.

    The first line that holds no backtick, ``#`` or ``//`` counts (skipping fences and comments).
    """
    line = next((ln for ln in prediction.lstrip("\n").split("\n") if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return round(100 * difflib.SequenceMatcher(None, line, reference).ratio()) / 100


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1_score,
    "rouge_l": rouge_l_score,
    "classification": classification_score,
    "count": count_score,
    "retrieval": retrieval_score,
    "code_sim": code_sim_score,
}


# ---- tasks (LongBench config/dataset2prompt.json, dataset2maxlen.json) ------------------------


@dataclass(frozen=True)
class LongBenchTask:
    prompt: str
    max_new_tokens: int
    metric: str
    first_line: bool = False  # score only the first line of the prediction (few-shot tasks)
    stop: tuple[str, ...] = ()


_QA_PASSAGES = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\n"
    "The following are given passages.\n{context}\n\n"
    "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\n"
    "Question: {input}\nAnswer:"
)

TASKS: dict[str, LongBenchTask] = {
    "narrativeqa": LongBenchTask(
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\n"
        "Story: {context}\n\nNow, answer the question based on the story as concisely as you can, using a single "
        "phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
        128,
        "qa_f1",
    ),
    "qasper": LongBenchTask(
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        "single phrase or sentence if possible. If the question cannot be answered based on the information in the "
        'article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". '
        "Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as "
        "concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered "
        'based on the information in the article, write "unanswerable". If the question is a yes/no question, answer '
        '"yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:',
        128,
        "qa_f1",
    ),
    "multifieldqa_en": LongBenchTask(
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the "
        "above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        64,
        "qa_f1",
    ),
    "hotpotqa": LongBenchTask(_QA_PASSAGES, 32, "qa_f1"),
    "2wikimqa": LongBenchTask(_QA_PASSAGES, 32, "qa_f1"),
    "musique": LongBenchTask(_QA_PASSAGES, 32, "qa_f1"),
    "gov_report": LongBenchTask(
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}"
        "\n\nNow, write a one-page summary of the report.\n\nSummary:",
        512,
        "rouge_l",
    ),
    "qmsum": LongBenchTask(
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one "
        "or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript "
        "in one or more sentences.\n\nQuery: {input}\nAnswer:",
        512,
        "rouge_l",
    ),
    "multi_news": LongBenchTask(
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:",
        512,
        "rouge_l",
    ),
    "trec": LongBenchTask(
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
        64,
        "classification",
        first_line=True,
    ),
    "triviaqa": LongBenchTask(
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{input}",
        32,
        "qa_f1",
        first_line=True,
    ),
    "samsum": LongBenchTask(
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
        128,
        "rouge_l",
        first_line=True,
        stop=("\n",),  # LongBench stops samsum at a newline (the model would repeat "Dialogue:")
    ),
    "passage_count": LongBenchTask(
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read "
        "these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other "
        "words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of "
        "unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, "
        "3, and so on.\n\nThe final answer is: ",
        32,
        "count",
    ),
    "passage_retrieval_en": LongBenchTask(
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract "
        "is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph "
        'that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: ',
        32,
        "retrieval",
    ),
    "lcc": LongBenchTask("Please complete the code given below. \n{context}Next line of code:\n", 64, "code_sim"),
    "repobench-p": LongBenchTask(
        "Please complete the code given below. \n{context}{input}Next line of code:\n", 64, "code_sim"
    ),
}

LENGTH_BUCKETS = (("0-4k", 0, 4000), ("4-8k", 4000, 8000), ("8k+", 8000, float("inf")))
"""LongBench-E buckets of the ``length`` field (words)."""


def task_of_file(path: str | Path) -> str:
    """``hotpotqa.jsonl`` / ``hotpotqa_e.jsonl`` -> ``hotpotqa``."""
    name = Path(path).name.split(".")[0]
    name = name[:-2] if name.endswith("_e") else name
    if name not in TASKS:
        raise ValueError(f"{path}: task {name!r} (from the file name) is not supported: supported are {', '.join(TASKS)}")
    return name


def read_jsonl(path: str | Path, fields: Sequence[str], what: str) -> list[dict[str, Any]]:
    """The JSON objects of a jsonl file, each holding ``fields``; errors name the file and line."""
    from ratplus_titan.data.jsonl import read_records

    return read_records(path, fields, what)


def load_samples(path: str | Path) -> list[dict[str, Any]]:
    """Read a LongBench jsonl file, checking the fields every sample needs."""
    samples = read_jsonl(path, ("input", "context", "answers"), "LongBench format")
    for line_no, sample in enumerate(samples, 1):
        if not isinstance(sample["answers"], list) or not sample["answers"]:
            raise ValueError(f"{path}: sample {line_no}: 'answers' must be a non-empty list, got {sample['answers']!r}")
    return samples


def build_prompt(task: str, sample: dict[str, Any]) -> str:
    return TASKS[task].prompt.format(context=sample["context"], input=sample["input"])


def truncate_middle(tokens: Sequence[int], max_tokens: int) -> list[int]:
    """Keep the first and last ``max_tokens // 2`` tokens (LongBench's middle truncation)."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens} is too small to keep a start and an end")
    tokens = list(tokens)
    if len(tokens) <= max_tokens:
        return tokens
    half = max_tokens // 2
    return tokens[:half] + tokens[-half:]


def score_sample(task: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None = None) -> float:
    """LongBench's scorer for one sample: the best metric value over the answers."""
    spec = TASKS[task]
    if spec.first_line:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRICS[spec.metric]
    return max(metric(prediction, answer, all_classes=all_classes) for answer in answers)


def score_task(task: str, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{"n", "score"}`` (mean x 100, 2 decimals) plus LongBench-E length buckets when lengths are known."""
    scores = [score_sample(task, r["pred"], r["answers"], r.get("all_classes")) for r in records]
    result: dict[str, Any] = {"n": len(scores), "metric": TASKS[task].metric, "score": round(100 * sum(scores) / len(scores), 2)}
    if all("length" in r for r in records):
        for name, low, high in LENGTH_BUCKETS:
            bucket = [s for s, r in zip(scores, records) if low <= r["length"] < high]
            result[name] = round(100 * sum(bucket) / len(bucket), 2) if bucket else None
    return result


def format_table(results: dict[str, dict[str, Any]]) -> str:
    buckets = any(name in r for r in results.values() for name, _, _ in LENGTH_BUCKETS)
    header = "| task | n | metric | score |" + (" 0-4k | 4-8k | 8k+ |" if buckets else "")
    lines = [header, "|---" * (7 if buckets else 4) + "|"]
    for task, r in results.items():
        row = f"| {task} | {r['n']} | {r['metric']} | {r['score']:.2f} |"
        if buckets:
            row += "".join(f" {r[b]:.2f} |" if r.get(b) is not None else " - |" for b, _, _ in LENGTH_BUCKETS)
        lines.append(row)
    if len(results) > 1:
        mean = sum(r["score"] for r in results.values()) / len(results)
        lines.append(f"| average | {sum(r['n'] for r in results.values())} | | {mean:.2f} |" + (" | | |" if buckets else ""))
    return "\n".join(lines)


# ---- running a model ---------------------------------------------------------------------------


def prompt_budget(task: str, max_length: int) -> int:
    """Prompt tokens that fit beside the task's answer in ``max_length``."""
    budget = max_length - TASKS[task].max_new_tokens
    if budget < 2:
        raise ValueError(
            f"--max-length {max_length} leaves no room for a prompt next to {TASKS[task].max_new_tokens} answer "
            f"tokens ({task}): give at least {TASKS[task].max_new_tokens + 2}"
        )
    return budget


def predict(
    lm: Any,
    task: str,
    samples: Sequence[dict[str, Any]],
    max_length: int,
    batch_size: int = 1,
    decode_mode: str = "auto",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Generate an answer per sample (prompts middle-truncated to ``max_length - max_new_tokens``)."""
    from tqdm import tqdm

    spec = TASKS[task]
    budget = prompt_budget(task, max_length)
    prompts = [truncate_middle(lm.tokenizer.encode(build_prompt(task, s), add_bos=True), budget) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: -len(prompts[i]))
    predictions: list[str] = [""] * len(samples)
    bar = tqdm(total=len(samples), desc=task, unit="sample", disable=not progress, file=sys.stderr)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        outputs = lm.generate(
            [prompts[i] for i in batch],
            max_new_tokens=spec.max_new_tokens,
            stop=list(spec.stop) or None,
            decode_mode=decode_mode,
        )
        for i, output in zip(batch, outputs):
            predictions[i] = output.text or ""
        bar.update(len(batch))
    bar.close()
    return [
        {
            "pred": predictions[i],
            "answers": s["answers"],
            "all_classes": s.get("all_classes"),
            **({"length": s["length"]} if "length" in s else {}),
            "prompt_tokens": len(prompts[i]),
        }
        for i, s in enumerate(samples)
    ]


def _data_files(paths: Sequence[str], tasks: Sequence[str] | None) -> list[tuple[str, Path]]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.glob("*.jsonl") if f.name.split(".")[0].removesuffix("_e") in TASKS)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p} is neither a jsonl file nor a folder of them")
    pairs = [(task_of_file(f), f) for f in files]
    if tasks:
        pairs = [(t, f) for t, f in pairs if t in tasks]
    if not pairs:
        raise FileNotFoundError(f"no LongBench files of a supported task among {list(paths)}")
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog=PROG,
        description="Run a RAT+ export on local LongBench-format jsonl files (one task per file, named <task>.jsonl or "
        "<task>_e.jsonl): LongBench prompts, middle truncation, greedy answers, LongBench metrics, a results table. "
        f"Supported tasks: {', '.join(TASKS)}.",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", nargs="?", help="folder written by ratplus-export")
    parser.add_argument("data", nargs="+", help="LongBench jsonl files, or folders holding them")
    parser.add_argument("--tasks", type=cli.comma_list(cli.one_of(tuple(TASKS))), default=None,
                        help="comma-separated subset of the tasks found (default: all)")
    cli.add_pattern_argument(parser)
    parser.add_argument("--max-length", type=cli.token_count, default=None,
                        help="prompt + answer tokens; prompts are truncated in the middle to fit (default: the model's max_seq_len)")
    parser.add_argument("--limit", type=cli.positive_int, default=None, help="first N samples of each file (default: all)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=1, help="samples generated together (default: %(default)s)")
    parser.add_argument("--dtype", choices=cli.DTYPES, default=None, help="default: the exported dtype")
    parser.add_argument("--device", type=cli.device, default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--decode-mode", choices=cli.DECODE_MODES, default="auto",
                        help="decode step implementation (default: %(default)s)")
    parser.add_argument("--output-dir", default=None, help="where predictions and result.json go (default: longbench_<pattern>)")
    parser.add_argument("--score-only", action="store_true",
                        help="DATA are prediction files written by this tool (field 'pred'): only score them; no MODEL_DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.score_only and args.model_dir is not None:
        args.data = [args.model_dir, *args.data]
        args.model_dir = None
    with cli.user_errors(PROG):
        files = _data_files(args.data, args.tasks)

    results: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    if args.score_only:
        with cli.user_errors(PROG):
            predictions = {task: read_jsonl(path, ("pred", "answers"), "--score-only reads the records this tool writes")
                           for task, path in files}  # fmt: skip
        for task, records in predictions.items():
            results[task] = score_task(task, records)
        print(format_table(results))
        return 0

    if args.model_dir is None or not (Path(args.model_dir) / "config.json").is_file():
        parser.error(f"MODEL_DIR {args.model_dir!r} has no config.json: give a folder written by ratplus-export")
    from ratplus_titan.inference.generate import check_decode_mode
    from ratplus_titan.inference.lm import RATPlusLM

    with cli.user_errors(PROG):
        data = [(task, path, load_samples(path)[: args.limit]) for task, path in files]
        lm = RATPlusLM.from_pretrained(
            args.model_dir, pattern=args.pattern, dtype=args.dtype, device=args.device,
            max_seq_len=args.max_length, max_batch_size=args.batch_size,
        )  # fmt: skip
        if lm.tokenizer is None:
            raise FileNotFoundError(f"{args.model_dir} holds no tokenizer: export the model with one")
        check_decode_mode(lm, args.decode_mode)
        max_length = args.max_length or lm.max_seq_len
        for task, _, _ in data:
            prompt_budget(task, max_length)
    cli.warn_beyond_model_length(PROG, "--max-length", max_length, lm.model_max_seq_len)
    label = str(lm.patterns[0]) if len(set(lm.patterns)) == 1 else "hybrid"
    out_dir = Path(args.output_dir or f"longbench_{label}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for task, path, samples in data:
        records = predict(lm, task, samples, max_length, args.batch_size, args.decode_mode, progress=not args.quiet)
        with (out_dir / f"{path.name.split('.')[0]}.jsonl").open("w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        results[task] = score_task(task, records)
    table = format_table(results)
    print(table)
    report = {
        "model_dir": args.model_dir,
        "patterns": [str(p) for p in lm.patterns],
        "max_length": max_length,
        "seconds": round(time.perf_counter() - started, 2),
        "results": results,
    }
    (out_dir / "result.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{PROG}: wrote {out_dir}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
