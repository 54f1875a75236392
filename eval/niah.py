"""Needle-in-a-haystack, RULER style: ``ratplus-niah MODEL_DIR --lengths 4096,16384 --pattern d16w256s4``.

Needles are sentences ``One of the special magic numbers for {key} is: {value}.`` hidden in
real text (Paul Graham's essays, shipped with the package) at stated depths; the model is
asked for the value(s) of one or more keys. Four tasks (RULER's NIAH variants):

| task | needles in the haystack | asked for |
|---|---|---|
| ``single`` | 1 key, 1 value | its value |
| ``multikey`` | 4 keys (3 distractors), 1 value each | the value of one key |
| ``multivalue`` | 1 key, 4 values | all 4 values |
| ``multiquery`` | 4 keys, 1 value each | the values of all 4 keys |

A sample of length ``L`` has at most ``L - max_new_tokens`` prompt tokens (BOS, instruction,
haystack, needles, question and answer prefix), so prompt + answer fit in ``L``.
Scoring is exact string matching (RULER's ``string_match_all``): a sample scores the fraction
of its expected values that appear verbatim (case-insensitive) in the generated answer; the
table reports the mean x 100.

Depth: needle ``i`` sits at ``depth`` percent of the haystack, measured in tokens, at the
sentence boundary nearest to it (``needles[i]["depth"]`` is the requested percent,
``needles[i]["token_offset"]`` the haystack tokens before it). Single-needle tasks cycle
through ``--depths``; multi-needle tasks draw distinct depths from a 0..100 grid.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ratplus_titan import cli

PROG = "ratplus-niah"
HAYSTACK_FILE = Path(__file__).resolve().parent / "assets" / "paul_graham_essays.jsonl.gz"
NOISE_SENTENCES = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
TEMPLATE = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n{context}\n"
    "What are all the special magic {kind} for {query} mentioned in the provided text?"
)
ANSWER_PREFIX = "The special magic {kind} for {query} mentioned in the provided text are"
DEPTH_GRID = [round(100 * i / 39) for i in range(40)]  # RULER's 40 depths, 0..100
DEFAULT_DEPTHS = (0, 25, 50, 75, 100)
DEFAULT_LENGTHS = (4096,)

_ADJECTIVES = (
    "abundant adorable agreeable ancient bashful brave bright calm charming cheerful clever colossal crooked "
    "curious delightful eager elegant enchanting fancy fierce fragile gentle gigantic glamorous graceful grumpy "
    "handsome helpful hollow humble icy jolly kind lively lonely lucky magnificent mellow misty modern mysterious "
    "narrow nervous nimble obedient odd old-fashioned peaceful plain polite proud quaint quick quiet rapid rare "
    "rustic shiny silent silly sleepy smooth sparkling spicy splendid steady sturdy swift tame tender thoughtful "
    "tiny vast vivid wandering wary whimsical wise witty wooden young zealous"
).split()
_NOUNS = (
    "anchor apple arch badge balloon basket beacon bicycle blanket bottle bridge bucket butterfly cabin camera "
    "candle canyon castle cathedral cellar cherry chimney clock cloud comet compass cottage crayon crystal dolphin "
    "drum eagle engine falcon feather fiddle forest fountain garden giraffe glacier guitar hammer harbor helmet "
    "island jacket jungle kettle kingdom ladder lantern lemon lighthouse magnet maple meadow mirror mountain "
    "needle ocean orchard otter paddle parrot pebble pepper piano pillow planet pocket pumpkin quilt rabbit "
    "ribbon river rocket saddle sandal scarf ship snowflake spider statue teapot thunder tiger tower trumpet "
    "tulip umbrella valley violin volcano wagon walnut whistle window wizard"
).split()


@dataclass(frozen=True)
class NeedleTask:
    """``num_keys`` keys with ``num_values`` values each are hidden; ``num_queries`` keys are asked for."""

    name: str
    num_keys: int
    num_values: int
    num_queries: int
    max_new_tokens: int

    @property
    def num_needles(self) -> int:
        return self.num_keys * self.num_values

    @property
    def num_answers(self) -> int:
        return self.num_queries * self.num_values


TASKS: dict[str, NeedleTask] = {
    "single": NeedleTask("single", num_keys=1, num_values=1, num_queries=1, max_new_tokens=32),
    "multikey": NeedleTask("multikey", num_keys=4, num_values=1, num_queries=1, max_new_tokens=32),
    "multivalue": NeedleTask("multivalue", num_keys=1, num_values=4, num_queries=1, max_new_tokens=96),
    "multiquery": NeedleTask("multiquery", num_keys=4, num_values=1, num_queries=4, max_new_tokens=96),
}


# ---- the haystack ------------------------------------------------------------------------------


def split_sentences(text: str) -> list[str]:
    """Whitespace-normalised text -> sentences (split after ``.``, ``!``, ``?`` followed by a space)."""
    text = re.sub(r"\s+", " ", text).strip()
    return [s for s in re.split(r"(?<=[.!?]) ", text) if s]


class Haystack:
    """Sentences of real text, each with its token count under the model's tokenizer."""

    def __init__(self, sentences: Sequence[str], tokenizer: Any, name: str = "custom"):
        if not sentences:
            raise ValueError(f"haystack {name!r} holds no text")
        self.name = name
        self.sentences = list(sentences)
        self.tokenizer = tokenizer
        self.lengths = [len(tokenizer.encode(s)) for s in self.sentences]

    @classmethod
    def load(cls, source: str | Path, tokenizer: Any) -> Haystack:
        """``essays`` (the shipped essays), ``noise`` (RULER's repeated sentences), or a folder/file of text.

        A folder contributes its ``*.txt`` files (sorted); a file may be ``.txt``, ``.jsonl`` or
        ``.jsonl.gz`` (``"text"`` field).
        """
        source = str(source)
        if source == "noise":
            return cls(NOISE_SENTENCES, tokenizer, name="noise")
        if source == "essays":
            return cls(_sentences_of(_read_texts(HAYSTACK_FILE)), tokenizer, name="essays")
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"haystack {source!r}: not 'essays', 'noise', or an existing folder/file of text")
        return cls(_sentences_of(_read_texts(path)), tokenizer, name=str(path))

    def take(self, start: int, budget: int) -> list[int]:
        """Sentence indices from ``start`` onward (wrapping around) whose tokens add up to at most ``budget``.

        Every sentence has at least one token, so this ends.
        """
        taken, used = [], 0
        n = len(self.sentences)
        i = start
        while used + self.lengths[i % n] <= budget:
            taken.append(i % n)
            used += self.lengths[i % n]
            i += 1
        return taken


def _read_texts(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"haystack folder {path} holds no *.txt files")
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    name = path.name
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f if line.strip()]
    return [path.read_text(encoding="utf-8", errors="replace")]


def _sentences_of(texts: Iterable[str]) -> list[str]:
    return [s for text in texts for s in split_sentences(text)]


# ---- samples -----------------------------------------------------------------------------------


def _random_keys(rng: random.Random, n: int) -> list[str]:
    keys: set[str] = set()
    while len(keys) < n:
        keys.add(f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}")
    return sorted(keys, key=lambda _: rng.random())


def _random_values(rng: random.Random, n: int) -> list[str]:
    values: set[str] = set()
    while len(values) < n:
        values.add(str(rng.randint(1_000_000, 9_999_999)))
    return sorted(values, key=lambda _: rng.random())


def _wording(task: NeedleTask, queries: list[str]) -> dict[str, str]:
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    if task.num_answers == 1:  # RULER's singular wording
        template = TEMPLATE.replace("Some", "A").replace("are all", "is").replace(" are ", " is ")
        prefix = ANSWER_PREFIX.replace(" are", " is")
        kind = "number"
    else:
        template, prefix, kind = TEMPLATE, ANSWER_PREFIX, "numbers"
    return {"template": template, "prefix": prefix.format(kind=kind, query=query), "kind": kind, "query": query}


def make_sample(
    task: NeedleTask,
    haystack: Haystack,
    length: int,
    rng: random.Random,
    depths: Sequence[float],
    max_new_tokens: int | None = None,
    index: int = 0,
) -> dict[str, Any]:
    """One sample of ``length`` tokens (prompt + answer budget); needle ``i`` at ``depths[i]`` percent."""
    if len(depths) != task.num_needles:
        raise ValueError(f"task {task.name} hides {task.num_needles} needles but {len(depths)} depths were given")
    for d in depths:
        if not 0 <= d <= 100:
            raise ValueError(f"depth {d} is invalid: allowed values are 0..100 (percent)")
    tokenizer = haystack.tokenizer
    max_new_tokens = task.max_new_tokens if max_new_tokens is None else max_new_tokens
    keys = _random_keys(rng, task.num_keys)
    values = {key: _random_values(rng, task.num_values) for key in keys}
    needles = [{"key": k, "value": v, "text": NEEDLE.format(kind="numbers", key=k, value=v)} for k in keys for v in values[k]]
    rng.shuffle(needles)
    for needle, depth in zip(needles, sorted(depths)):
        needle["depth"] = float(depth)
    queries = rng.sample(keys, task.num_queries)
    answers = [v for k in queries for v in values[k]]
    wording = _wording(task, queries)

    def prompt_of(context: str) -> tuple[str, int]:
        text = wording["template"].format(kind=wording["kind"], context=context, query=wording["query"])
        return text, len(tokenizer.encode(text + " " + wording["prefix"], add_bos=True))

    limit = length - max_new_tokens
    _, overhead = prompt_of(" ".join(n["text"] for n in needles))
    if overhead > limit:
        raise ValueError(
            f"length {length} is too short for task {task.name}: the instruction and needles alone take "
            f"{overhead} tokens, plus {max_new_tokens} for the answer"
        )
    chosen = haystack.take(rng.randrange(len(haystack.sentences)), limit - overhead)
    while True:
        sentences = [haystack.sentences[i] for i in chosen]
        offsets = [0]
        for i in chosen:
            offsets.append(offsets[-1] + haystack.lengths[i])
        total = offsets[-1]
        # needle i goes before sentence `slot` (the boundary nearest to its depth); ties keep depth order
        slots = [min(range(len(offsets)), key=lambda b: abs(offsets[b] - n["depth"] / 100 * total)) for n in needles]
        pieces: list[str] = []
        for b in range(len(sentences) + 1):
            pieces += [n["text"] for n, slot in zip(needles, slots) if slot == b]
            if b < len(sentences):
                pieces.append(sentences[b])
        context = " ".join(pieces)
        text, n_tokens = prompt_of(context)
        if n_tokens <= limit or not chosen:
            break
        chosen = chosen[:-1]  # the joined text came out a few tokens longer than the sum of its sentences
    for needle, slot in zip(needles, slots):
        needle["token_offset"] = offsets[slot]
    return {
        "task": task.name,
        "index": index,
        "length": length,
        "prompt_tokens": n_tokens,
        "haystack_tokens": total,
        "max_new_tokens": max_new_tokens,
        "depth": needles[0]["depth"] if task.num_needles == 1 else None,
        "input": text,
        "gen_prefix": wording["prefix"],
        "outputs": answers,
        "queries": queries,
        "needles": needles,
    }


def generate_samples(
    tokenizer: Any,
    tasks: Sequence[str] = tuple(TASKS),
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    num_samples: int = 10,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    haystack: str | Path | Haystack = "essays",
    seed: int = 0,
    max_new_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """``num_samples`` samples per (task, length); single-needle tasks cycle through ``depths``."""
    for name in tasks:
        if name not in TASKS:
            raise ValueError(f"task {name!r} is unknown: allowed values are {', '.join(TASKS)}")
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} is invalid: allowed values are >= 1")
    if not depths:
        raise ValueError("depths is empty: give at least one depth in 0..100")
    hay = haystack if isinstance(haystack, Haystack) else Haystack.load(haystack, tokenizer)
    samples = []
    for name in tasks:
        task = TASKS[name]
        for length in lengths:
            rng = random.Random(f"{seed}-{name}-{length}")
            for i in range(num_samples):
                if task.num_needles == 1:
                    needle_depths: list[float] = [depths[i % len(depths)]]
                else:
                    needle_depths = rng.sample(DEPTH_GRID, task.num_needles)
                samples.append(make_sample(task, hay, length, rng, needle_depths, max_new_tokens, index=i))
    return samples


# ---- scoring -----------------------------------------------------------------------------------


def match_fraction(prediction: str, expected: Sequence[str]) -> float:
    """RULER ``string_match_all``: the fraction of expected values found verbatim in the prediction."""
    if not expected:
        raise ValueError("a sample needs at least one expected value")
    found = prediction.lower()
    return sum(value.lower() in found for value in expected) / len(expected)


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """``{task: {length: mean score x 100}}``."""
    scores: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        scores[r["task"]][int(r["length"])].append(r["score"])
    return {t: {n: 100 * sum(v) / len(v) for n, v in sorted(by_len.items())} for t, by_len in scores.items()}


def summarize_by_depth(results: Sequence[dict[str, Any]]) -> dict[str, dict[int, dict[float, float]]]:
    """Single-needle tasks: ``{task: {length: {depth: mean score x 100}}}``."""
    scores: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in results:
        if r.get("depth") is not None:
            scores[r["task"]][int(r["length"])][r["depth"]].append(r["score"])
    return {
        t: {n: {d: 100 * sum(v) / len(v) for d, v in sorted(by_d.items())} for n, by_d in sorted(by_len.items())}
        for t, by_len in scores.items()
    }


def format_table(summary: dict[str, dict[int, float]]) -> str:
    """Markdown table: one row per task, one column per length, plus the row mean."""
    lengths = sorted({n for by_len in summary.values() for n in by_len})
    header = "| task | " + " | ".join(_length_label(n) for n in lengths) + " | mean |"
    lines = [header, "|---" * (len(lengths) + 2) + "|"]
    for task, by_len in summary.items():
        cells = [f"{by_len[n]:.1f}" if n in by_len else "-" for n in lengths]
        mean = sum(by_len.values()) / len(by_len)
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {mean:.1f} |")
    return "\n".join(lines)


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


# ---- running a model ---------------------------------------------------------------------------


def prompt_text(sample: dict[str, Any]) -> str:
    """What the model reads: the input, a space, then the answer prefix (as lm-eval joins them)."""
    return sample["input"] + " " + sample["gen_prefix"]


def evaluate(
    lm: Any,
    samples: Sequence[dict[str, Any]],
    batch_size: int = 1,
    decode_mode: str = "auto",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Generate greedily for every sample (batched by length, longest first) and score it.

    Returns one record per sample (no input text): task, length, depth, outputs, prediction, score.
    """
    from tqdm import tqdm

    if lm.tokenizer is None:
        raise ValueError("the model has no tokenizer: export it with one")
    order = sorted(range(len(samples)), key=lambda i: (-samples[i]["length"], samples[i]["max_new_tokens"]))
    results: list[dict[str, Any] | None] = [None] * len(samples)
    bar = tqdm(total=len(samples), desc="niah", unit="sample", disable=not progress, file=sys.stderr)
    done_scores: list[float] = []
    i = 0
    while i < len(order):
        first = samples[order[i]]
        batch = [order[i]]
        i += 1
        while (
            i < len(order)
            and len(batch) < batch_size
            and samples[order[i]]["length"] == first["length"]
            and samples[order[i]]["max_new_tokens"] == first["max_new_tokens"]
        ):
            batch.append(order[i])
            i += 1
        prompts = [lm.tokenizer.encode(prompt_text(samples[j]), add_bos=True) for j in batch]
        outputs = lm.generate(prompts, max_new_tokens=first["max_new_tokens"], decode_mode=decode_mode, stop_on_eos=True)
        for j, output in zip(batch, outputs):
            sample = samples[j]
            score = match_fraction(output.text or "", sample["outputs"])
            results[j] = {
                "task": sample["task"],
                "index": sample["index"],
                "length": sample["length"],
                "prompt_tokens": sample["prompt_tokens"],
                "depth": sample["depth"],
                "needle_depths": [n["depth"] for n in sample["needles"]],
                "outputs": sample["outputs"],
                "prediction": output.text,
                "score": score,
            }
            done_scores.append(score)
        bar.set_postfix_str(f"{first['task']} {_length_label(first['length'])} mean={100 * sum(done_scores) / len(done_scores):.1f}")
        bar.update(len(batch))
    bar.close()
    return [r for r in results if r is not None]


# ---- CLI ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog=PROG,
        description="Needle-in-a-haystack (RULER style: single, multi-key, multi-value, multi-query needles in "
        "Paul Graham's essays) for a model exported by ratplus-export. Prints a score table (exact-match "
        "recall of the needle values, x100) and writes the per-sample results as JSON.",
    )
    parser.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help="folder written by ratplus-export")
    parser.add_argument("--lengths", type=cli.comma_list(cli.token_count), default=list(DEFAULT_LENGTHS),
                        help="sample lengths in tokens (prompt + answer), e.g. 4096,16384 or 4k,16k (default: 4096)")
    parser.add_argument("--tasks", type=cli.comma_list(cli.one_of(tuple(TASKS))), default=list(TASKS),
                        help=f"comma-separated subset of {', '.join(TASKS)} (default: all)")
    parser.add_argument("--samples", type=cli.positive_int, default=10, help="samples per task and length (default: %(default)s)")
    parser.add_argument("--depths", type=cli.comma_list(cli.number_in(0, 100)), default=list(DEFAULT_DEPTHS),
                        help="needle depths in percent (0..100) for single-needle tasks, cycled over samples "
                        "(default: 0,25,50,75,100)")
    parser.add_argument("--haystack", default="essays",
                        help="'essays' (shipped Paul Graham essays), 'noise' (RULER's repeated sentences), or a folder of "
                        ".txt files / a .txt or .jsonl(.gz) file (default: essays)")
    cli.add_pattern_argument(parser)
    parser.add_argument("--max-new-tokens", type=cli.positive_int, default=None,
                        help="answer tokens (default: 32 single/multikey, 96 otherwise)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=1, help="samples generated together (default: %(default)s)")
    parser.add_argument("--dtype", choices=cli.DTYPES, default=None, help="default: the exported dtype")
    parser.add_argument("--device", type=cli.device, default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--decode-mode", choices=cli.DECODE_MODES, default="auto",
                        help="decode step implementation (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sample generation seed (default: %(default)s)")
    parser.add_argument("--output", default=None, help="results JSON (default: niah_<pattern>.json in the current folder)")
    parser.add_argument("--write-data", metavar="FILE",
                        help="only write the samples (with input text) as JSON lines, e.g. for the lm-eval task's data_file; "
                        "needs MODEL_DIR or --tokenizer")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file/folder (default: MODEL_DIR's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tasks = args.tasks
    if args.model_dir is None and not (args.write_data and args.tokenizer):
        parser.error("give MODEL_DIR (or --write-data FILE with --tokenizer to only write samples)")
    if args.model_dir is not None and not (Path(args.model_dir) / "config.json").is_file():
        parser.error(f"MODEL_DIR {args.model_dir!r} has no config.json: give a folder written by ratplus-export")

    from ratplus_titan.data.tokenizer import load_tokenizer
    from ratplus_titan.inference.generate import check_decode_mode
    from ratplus_titan.inference.lm import RATPlusLM

    started = time.perf_counter()
    with cli.user_errors(PROG):
        tokenizer = load_tokenizer(args.tokenizer or args.model_dir)
        samples = generate_samples(
            tokenizer, tasks, args.lengths, args.samples, args.depths, args.haystack, args.seed, args.max_new_tokens
        )
    if args.write_data:
        out = Path(args.write_data)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s) + "\n")
        print(f"{PROG}: wrote {len(samples)} samples to {out}")
        if args.model_dir is None:
            return 0

    with cli.user_errors(PROG):
        lm = RATPlusLM.from_pretrained(
            args.model_dir,
            pattern=args.pattern,
            dtype=args.dtype,
            device=args.device,
            max_seq_len=max(args.lengths),
            max_batch_size=args.batch_size,
        )
        check_decode_mode(lm, args.decode_mode)
    cli.warn_beyond_model_length(PROG, "--lengths", max(args.lengths), lm.model_max_seq_len)
    if args.tokenizer:
        lm.tokenizer = tokenizer
    label = str(lm.patterns[0]) if len(set(lm.patterns)) == 1 else "hybrid"
    print(
        f"{PROG}: {len(samples)} samples ({', '.join(tasks)} x {', '.join(map(_length_label, args.lengths))}), "
        f"pattern {label}, {lm.dtype}, {lm.device}",
        file=sys.stderr,
    )
    results = evaluate(lm, samples, args.batch_size, args.decode_mode, progress=not args.quiet)
    summary = summarize(results)
    table = format_table(summary)
    print(table)
    output = Path(args.output or f"niah_{label}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model_dir": str(args.model_dir),
        "patterns": [str(p) for p in lm.patterns],
        "dtype": str(lm.dtype).replace("torch.", ""),
        "device": str(lm.device),
        "haystack": args.haystack,
        "lengths": args.lengths,
        "tasks": tasks,
        "seed": args.seed,
        "seconds": round(time.perf_counter() - started, 2),
        "summary": {t: {str(n): s for n, s in by_len.items()} for t, by_len in summary.items()},
        "by_depth": {
            t: {str(n): {str(d): s for d, s in by_d.items()} for n, by_d in by_len.items()}
            for t, by_len in summarize_by_depth(results).items()
        },
        "samples": results,
    }
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{PROG}: wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
