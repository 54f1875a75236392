"""Needle-in-a-haystack, RULER style: ``ratplus-niah MODEL_DIR --lengths 4096,16384 --pattern d16w256s4``.

Needles are sentences ``One of the special magic numbers for {key} is: {value}.`` hidden in
real text (Paul Graham's essays, shipped with the package, or any corpus: ``--haystack``) at stated
depths; the model is asked for the value(s) of one or more keys. Four tasks (RULER's NIAH variants):

| task | needles in the haystack | asked for |
|---|---|---|
| ``single`` | 1 key, 1 value | its value |
| ``multikey`` | 4 keys (3 distractors), 1 value each | the value of one key |
| ``multivalue`` | 1 key, 4 values | all 4 values |
| ``multiquery`` | 4 keys, 1 value each | the values of all 4 keys |

A sample of length ``L`` has at most ``L - max_new_tokens`` prompt tokens (BOS, instruction,
haystack, needles, question and answer prefix), so prompt + answer fit in ``L``. The prompt is
``prompt_text(sample)`` (the input, a space, the answer prefix); the expected continuation is
``sample["answer"]``, the values joined by ", " after a space, then a period (``" 1234567."``; several
values of one key in the order they appear): what a model fine-tuned on
``python -m ratplus_titan.eval.niah_splits`` train records learns to answer.

Two scorers (``--scorer``):

- ``generate`` (default): greedy generation, scored by exact string matching (RULER's
  ``string_match_all``): the fraction of the expected values that appear verbatim (case-insensitive)
  in the generated text. Works for any model, fine-tuned or not.
- ``teacher-forced``: one batched forward over prompt + answer tokens; a sample scores 1 when the
  argmax at every answer position is the answer's token, else 0. That is exactly "greedy decoding
  reproduces ``sample["answer"]``" (stricter than string matching, and one forward instead of a decode
  loop): the scorer for models fine-tuned on the answer format.

Depth: needle ``i`` sits at ``depth`` percent of the haystack, measured in tokens, at the
sentence boundary nearest to it (``needles[i]["depth"]`` is the requested percent,
``needles[i]["token_offset"]`` the haystack tokens before it). Single-needle tasks cycle
through ``--depths``; multi-needle tasks draw distinct depths from a 0..100 grid; ``depths="uniform"``
draws every needle's depth uniformly from [0, 100]. Distance: ``needles[i]["distance"]`` is how far
back from the last prompt token the needle's value starts, in tokens (a pattern with local window
``W`` sees it from there when ``distance <= W``). A sample's ``answer_depth`` / ``answer_distance``
are those of its farthest needle holding an expected value; results are reported by task, by depth
bucket and by distance bucket.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ratplus_titan import cli
from ratplus_titan.eval.haystack import Haystack, split_sentences

__all__ = ["Haystack", "split_sentences"]  # and the functions below

PROG = "ratplus-niah"
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
SCORERS = ("generate", "teacher-forced")
DEPTH_EDGES = (20, 40, 60, 80)
"""Depth buckets (percent): [0, 20), [20, 40), ..., [80, 100]."""
DISTANCE_EDGES = (256, 1024)
"""Distance buckets (tokens): <= 256 (inside a local window of 256), 257-1024, > 1024."""
SPLITS = ("train", "eval")
"""Disjoint halves of the key words and of the values (``split_of``): a model fine-tuned on samples of
the train split is evaluated on keys and values it never saw."""

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


# ---- samples -----------------------------------------------------------------------------------


def split_of(text: str) -> str:
    """The split a key word or a value belongs to: a fixed pseudo-random half (a hash of the text), so
    neither split has a surface pattern (a first digit, a word's first letter) the other lacks."""
    return SPLITS[hashlib.blake2b(text.encode(), digest_size=1).digest()[0] & 1]


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown: allowed values are {', '.join(SPLITS)} or None (all)")


def _words(words: list[str], split: str | None) -> list[str]:
    return words if split is None else [w for w in words if split_of(w) == split]


def _random_keys(rng: random.Random, n: int, split: str | None = None) -> list[str]:
    adjectives, nouns = _words(_ADJECTIVES, split), _words(_NOUNS, split)
    keys: set[str] = set()
    while len(keys) < n:
        keys.add(f"{rng.choice(adjectives)}-{rng.choice(nouns)}")
    return sorted(keys, key=lambda _: rng.random())


def _random_values(rng: random.Random, n: int, split: str | None = None) -> list[str]:
    values: set[str] = set()
    while len(values) < n:
        value = str(rng.randint(1_000_000, 9_999_999))
        if split is None or split_of(value) == split:
            values.add(value)
    return sorted(values, key=lambda _: rng.random())


def answer_text(values: Sequence[str]) -> str:
    """What follows the answer prefix: ``" 1234567."``, or ``" 1234567, 7654321."`` for several values."""
    return " " + ", ".join(values) + "."


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
    split: str | None = None,
) -> dict[str, Any]:
    """One sample of ``length`` tokens (prompt + answer budget); needle ``i`` at ``depths[i]`` percent.

    ``split`` (``"train"`` / ``"eval"``) draws keys and values from that split's half only (``split_of``).
    """
    _check_split(split)
    if len(depths) != task.num_needles:
        raise ValueError(f"task {task.name} hides {task.num_needles} needles but {len(depths)} depths were given")
    for d in depths:
        if not 0 <= d <= 100:
            raise ValueError(f"depth {d} is invalid: allowed values are 0..100 (percent)")
    tokenizer = haystack.tokenizer
    max_new_tokens = task.max_new_tokens if max_new_tokens is None else max_new_tokens
    keys = _random_keys(rng, task.num_keys, split)
    values = {key: _random_values(rng, task.num_values, split) for key in keys}
    needles = [{"key": k, "value": v, "text": NEEDLE.format(kind="numbers", key=k, value=v)} for k in keys for v in values[k]]
    rng.shuffle(needles)
    for needle, depth in zip(needles, sorted(depths)):
        needle["depth"] = float(depth)
    queries = rng.sample(keys, task.num_queries)
    # the values of each queried key in the order they appear (needles are in depth order): the answer's order
    answers = [n["value"] for k in queries for n in needles if n["key"] == k]
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
    sentences, lengths = haystack.stretch(rng, limit - overhead)
    while True:
        offsets = [0]  # haystack tokens before each sentence (and after the last)
        for count in lengths:
            offsets.append(offsets[-1] + count)
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
        if n_tokens <= limit or not sentences:
            break
        # the joined text came out a few tokens longer than the sum of its sentences
        sentences, lengths = sentences[:-1], lengths[:-1]
    for needle, slot in zip(needles, slots):
        needle["token_offset"] = offsets[slot]
        # tokens (with BOS) before the value, and how far the last prompt position looks back to it
        value_at = text.index(needle["text"]) + needle["text"].rindex(needle["value"])
        needle["value_offset"] = len(tokenizer.encode(text[:value_at].rstrip(), add_bos=True))
        needle["distance"] = n_tokens - 1 - needle["value_offset"]
    farthest = max((n for n in needles if n["key"] in queries), key=lambda n: n["distance"])
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
        "answer": answer_text(answers),
        "answer_depth": farthest["depth"],
        "answer_distance": farthest["distance"],
        "queries": queries,
        "needles": needles,
    }


def generate_samples(
    tokenizer: Any,
    tasks: Sequence[str] = tuple(TASKS),
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    num_samples: int = 10,
    depths: Sequence[float] | str = DEFAULT_DEPTHS,
    haystack: str | Path | Haystack = "essays",
    seed: int = 0,
    max_new_tokens: int | None = None,
    split: str | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """``num_samples`` samples per (task, length).

    ``depths``: a list that single-needle tasks cycle through (multi-needle tasks then draw distinct
    depths from a 0..100 grid), or ``"uniform"``: every needle's depth drawn uniformly from [0, 100].
    ``split``: keys and values from that split only (see ``make_sample``); it also seeds differently.
    """
    from tqdm import tqdm

    for name in tasks:
        if name not in TASKS:
            raise ValueError(f"task {name!r} is unknown: allowed values are {', '.join(TASKS)}")
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} is invalid: allowed values are >= 1")
    if isinstance(depths, str) and depths != "uniform":
        raise ValueError(f"depths={depths!r} is invalid: give a list of depths in 0..100, or 'uniform'")
    if not depths:
        raise ValueError("depths is empty: give at least one depth in 0..100")
    _check_split(split)
    hay = haystack if isinstance(haystack, Haystack) else Haystack.load(haystack, tokenizer)
    samples = []
    with tqdm(total=len(tasks) * len(lengths) * num_samples, desc=f"niah samples{f' ({split})' if split else ''}",
              unit="sample", disable=not progress, file=sys.stderr) as bar:  # fmt: skip
        for name in tasks:
            task = TASKS[name]
            for length in lengths:
                rng = random.Random(f"{seed}-{name}-{length}" + (f"-{split}" if split else ""))
                for i in range(num_samples):
                    if depths == "uniform":
                        needle_depths = [round(rng.uniform(0, 100), 1) for _ in range(task.num_needles)]
                    elif task.num_needles == 1:
                        needle_depths = [depths[i % len(depths)]]
                    else:
                        needle_depths = rng.sample(DEPTH_GRID, task.num_needles)
                    samples.append(make_sample(task, hay, length, rng, needle_depths, max_new_tokens, index=i, split=split))
                    bar.update()
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


def depth_bucket(depth: float, edges: Sequence[float] = DEPTH_EDGES) -> str:
    """The label ``"a-b"`` of the depth bucket ``[a, b)`` holding ``depth`` (percent; the last bucket is ``[a, 100]``)."""
    cuts = [0, *edges, 100]
    for a, b in zip(cuts[:-1], cuts[1:]):
        if depth < b or b == 100:
            return f"{a:g}-{b:g}"
    raise AssertionError("unreachable")


def distance_bucket(distance: int, edges: Sequence[int] = DISTANCE_EDGES) -> str:
    """The label of the distance bucket holding ``distance`` (tokens): ``"<=e0"``, ``"e0+1-e1"``, ..., ``">ek"``."""
    if distance <= edges[0]:
        return f"<={edges[0]}"
    for a, b in zip(edges[:-1], edges[1:]):
        if distance <= b:
            return f"{a + 1}-{b}"
    return f">{edges[-1]}"


def check_edges(edges: Sequence[float], name: str, low: float, high: float = float("inf")) -> list:
    """``edges`` strictly increasing inside ``(low, high)``, or a ``ValueError`` naming ``name``."""
    edges = list(edges)
    if not edges or any(not low < e < high for e in edges) or any(a >= b for a, b in zip(edges[:-1], edges[1:])):
        where = f"in ({low:g}, {high:g})" if high != float("inf") else f"> {low:g}"
        raise ValueError(f"{name}={edges} is invalid: give increasing bucket edges {where}, e.g. "
                         f"{','.join(map(str, DEPTH_EDGES if name.startswith('depth') else DISTANCE_EDGES))}")  # fmt: skip
    return edges


def accuracy_by(results: Sequence[dict[str, Any]], bucket_of=None, buckets: Sequence[str] = ("all",)) -> dict:
    """``{task or "all": {bucket: {"accuracy": mean score x 100 or None, "n": samples}}}``.

    ``bucket_of(result)`` names a result's bucket (None: not counted); ``buckets`` lists them all, in
    order, so every task reports every bucket (``n`` 0 and accuracy None where none fell).
    """
    bucket_of = bucket_of or (lambda r: "all")
    scores: dict = defaultdict(lambda: {b: [] for b in buckets})
    for r in results:
        bucket = bucket_of(r)
        if bucket is not None:
            scores[r["task"]][bucket].append(r["score"])
            scores["all"][bucket].append(r["score"])
    return {
        task: {b: {"accuracy": 100 * sum(v) / len(v) if v else None, "n": len(v)} for b, v in by_bucket.items()}
        for task, by_bucket in sorted(scores.items(), key=lambda kv: (kv[0] == "all", kv[0]))
    }


def accuracy_tables(
    results: Sequence[dict[str, Any]], depth_edges: Sequence[float] = DEPTH_EDGES, distance_edges: Sequence[int] = DISTANCE_EDGES
) -> dict[str, dict]:
    """``by_task``, ``by_depth`` (of ``answer_depth``) and ``by_distance`` (of ``answer_distance``), each
    ``{task or "all": {bucket: {"accuracy", "n"}}}`` (``by_task``: ``{task: {"accuracy", "n"}}``)."""
    depth_edges = check_edges(depth_edges, "depth_edges", 0, 100)
    distance_edges = check_edges(distance_edges, "distance_edges", 0)
    depth_buckets = [depth_bucket(d, depth_edges) for d in [0, *depth_edges]]
    distance_buckets = [distance_bucket(d, distance_edges) for d in [1, *(e + 1 for e in distance_edges)]]
    by_task = {task: rows["all"] for task, rows in accuracy_by(results).items()}

    def bucket(field: str, label):
        return lambda r: None if r.get(field) is None else label(r[field])

    return {
        "by_task": by_task,
        "by_depth": accuracy_by(results, bucket("answer_depth", lambda d: depth_bucket(d, depth_edges)), depth_buckets),
        "by_distance": accuracy_by(
            results, bucket("answer_distance", lambda d: distance_bucket(d, distance_edges)), distance_buckets
        ),
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


def expected_answer(sample: dict[str, Any]) -> str:
    """The continuation a sample expects (``answer_text`` of its values for samples written without one)."""
    return sample.get("answer") or answer_text(sample["outputs"])


def evaluate(
    lm: Any,
    samples: Sequence[dict[str, Any]],
    batch_size: int = 1,
    decode_mode: str = "auto",
    progress: bool = True,
    scorer: str = "generate",
) -> list[dict[str, Any]]:
    """Score every sample with ``scorer`` (see the module docstring), batched by length, longest first.

    Returns one record per sample, in order (no input text): task, index, length, depths, distance,
    outputs, answer, ``prediction`` (the generated text; None when teacher-forced), ``exact`` (greedy
    decoding reproduces the answer's tokens) and ``score`` (generate: the string-match fraction;
    teacher-forced: ``exact`` as 0/1).
    """
    from tqdm import tqdm

    from ratplus_titan.data.sft import encode_pair
    from ratplus_titan.eval.greedy_match import greedy_matches

    if scorer not in SCORERS:
        raise ValueError(f"scorer {scorer!r} is unknown: allowed values are {', '.join(SCORERS)}")
    if lm.tokenizer is None:
        raise ValueError("the model has no tokenizer: export it with one")
    order = sorted(range(len(samples)), key=lambda i: (-samples[i]["length"], samples[i]["max_new_tokens"]))
    results: list[dict[str, Any] | None] = [None] * len(samples)
    bar = tqdm(total=len(samples), desc=f"niah ({scorer})", unit="sample", disable=not progress, file=sys.stderr)
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
        pairs = [encode_pair(lm.tokenizer, prompt_text(samples[j]), expected_answer(samples[j])) for j in batch]
        prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
        if scorer == "generate":
            outputs = lm.generate(prompts, max_new_tokens=first["max_new_tokens"], decode_mode=decode_mode, stop_on_eos=True)
            predictions = [o.text for o in outputs]
            exact = [o.tokens[: len(a)] == a for o, a in zip(outputs, answers)]
            scores = [match_fraction(o.text or "", samples[j]["outputs"]) for o, j in zip(outputs, batch)]
        else:
            predictions = [None] * len(batch)
            exact = greedy_matches(lm, prompts, answers)
            scores = [float(e) for e in exact]
        for j, prediction, hit, score in zip(batch, predictions, exact, scores):
            sample = samples[j]
            results[j] = {
                "task": sample["task"],
                "index": sample["index"],
                "length": sample["length"],
                "prompt_tokens": sample["prompt_tokens"],
                "depth": sample.get("depth"),
                "needle_depths": [n["depth"] for n in sample["needles"]],
                "answer_depth": sample.get("answer_depth"),
                "answer_distance": sample.get("answer_distance"),
                "outputs": sample["outputs"],
                "answer": expected_answer(sample),
                "prediction": prediction,
                "exact": hit,
                "score": score,
            }
            done_scores.append(score)
        bar.set_postfix_str(f"{first['task']} {_length_label(first['length'])} mean={100 * sum(done_scores) / len(done_scores):.1f}")
        bar.update(len(batch))
    bar.close()
    return [r for r in results if r is not None]


SAMPLE_FIELDS = ("task", "index", "length", "prompt_tokens", "max_new_tokens", "input", "gen_prefix", "outputs", "needles")


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    """Sample records from a ``.jsonl[.gz|.xz]`` file (``--write-data``, ``niah_splits`` eval files)."""
    from ratplus_titan.data.jsonl import read_records

    if not Path(path).is_file():
        raise FileNotFoundError(f"samples file {str(path)!r} does not exist")
    return read_records(path, SAMPLE_FIELDS, "NIAH samples, as ratplus-niah --write-data writes them")


def write_samples(path: str | Path, samples: Sequence[dict[str, Any]]) -> Path:
    """Samples as JSON lines (``.gz``: compressed), written under a temporary name and renamed."""
    import gzip
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with (gzip.open if path.name.endswith(".gz") else open)(tmp, "wt", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    os.replace(tmp, path)
    return path


def load_model(model_dir: str | Path, pattern: Any, samples: Sequence[dict[str, Any]], batch_size: int,
               dtype: str | None = None, device: str | None = None):  # fmt: skip
    """A ``RATPlusLM`` under ``pattern`` (None or ``"config"``: the one in config.json; a spec string; or
    layer patterns) sized for the longest sample."""
    from ratplus_titan.inference.lm import RATPlusLM

    if isinstance(pattern, str):
        pattern = None if pattern.strip() == "config" else cli.parse_patterns(pattern)
    return RATPlusLM.from_pretrained(
        model_dir,
        pattern=pattern,
        dtype=dtype,
        device=device,
        max_seq_len=max(int(s["length"]) for s in samples),
        max_batch_size=batch_size,
    )


def report(
    lm: Any,
    results: Sequence[dict[str, Any]],
    scorer: str,
    depth_edges: Sequence[float] = DEPTH_EDGES,
    distance_edges: Sequence[int] = DISTANCE_EDGES,
    **fields: Any,
) -> dict[str, Any]:
    """The JSON report: the model's patterns, dtype, device, ``fields``, ``summary`` (``{task: {length: mean
    score x 100}}``), ``by_task`` / ``by_depth`` / ``by_distance`` (``accuracy_tables``) and the samples."""
    return {
        "patterns": [str(p) for p in lm.patterns],
        "dtype": str(lm.dtype).replace("torch.", ""),
        "device": str(lm.device),
        "scorer": scorer,
        **fields,
        "summary": {t: {str(n): s for n, s in by_len.items()} for t, by_len in summarize(results).items()},
        "depth_edges": list(depth_edges),
        "distance_edges": list(distance_edges),
        **accuracy_tables(results, depth_edges, distance_edges),
        "samples": list(results),
    }


def evaluate_file(
    model_dir: str | Path,
    samples_file: str | Path,
    pattern: Any = "config",
    batch_size: int = 8,
    dtype: str | None = None,
    device: str | None = None,
    scorer: str = "teacher-forced",
    depth_edges: Sequence[float] = DEPTH_EDGES,
    distance_edges: Sequence[int] = DISTANCE_EDGES,
    decode_mode: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate an exported model on the samples of ``samples_file`` under ``pattern``; returns the
    report of :func:`report` (``ratplus-niah MODEL_DIR --samples-file FILE`` writes the same)."""
    from ratplus_titan.inference.generate import check_decode_mode

    started = time.perf_counter()
    check_edges(depth_edges, "depth_edges", 0, 100)
    check_edges(distance_edges, "distance_edges", 0)
    samples = read_samples(samples_file)
    lm = load_model(model_dir, pattern, samples, batch_size, dtype, device)
    check_decode_mode(lm, decode_mode)
    results = evaluate(lm, samples, batch_size, decode_mode, progress, scorer)
    return report(lm, results, scorer, depth_edges, distance_edges, model_dir=str(model_dir),
                  samples_file=str(samples_file), seconds=round(time.perf_counter() - started, 2))  # fmt: skip


# ---- CLI ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog=PROG,
        description="Needle-in-a-haystack (RULER style: single, multi-key, multi-value, multi-query needles in "
        "Paul Graham's essays or another corpus) for a model exported by ratplus-export. Prints a score table "
        "(x100) and writes a JSON report: the summary by task and length, accuracy by task, by needle depth "
        "bucket and by needle distance bucket, and the per-sample results.",
        epilog="Scorers: 'generate' greedily generates and scores RULER's string match (the fraction of expected "
        "values found in the text); 'teacher-forced' runs one forward over prompt + expected answer and counts "
        "a sample correct when greedy decoding would reproduce the answer exactly (for models fine-tuned on "
        "the answer format, e.g. on python -m ratplus_titan.eval.niah_splits train records).",
    )
    parser.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help="folder written by ratplus-export")
    parser.add_argument("--samples-file", metavar="FILE", default=None,
                        help="evaluate the samples of this .jsonl(.gz) file (--write-data, or the eval split of "
                        "python -m ratplus_titan.eval.niah_splits) instead of generating them; --lengths, --tasks, "
                        "--samples, --depths, --haystack, --seed and --max-new-tokens are then not used")
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
                        ".txt files / a .txt or .jsonl(.gz|.xz) file (default: essays)")
    cli.add_pattern_argument(parser)
    parser.add_argument("--scorer", choices=SCORERS, default="generate",
                        help="generate (string match of the generated text) or teacher-forced (exact greedy match of "
                        "the expected answer, one forward; see below) (default: %(default)s)")
    parser.add_argument("--depth-buckets", type=cli.comma_list(cli.number_in(0, 100)), default=list(DEPTH_EDGES),
                        help="depth bucket edges in percent (default: 20,40,60,80: 0-20, ..., 80-100)")
    parser.add_argument("--distance-buckets", type=cli.comma_list(cli.positive_int), default=list(DISTANCE_EDGES),
                        help="needle distance bucket edges in tokens from the end of the prompt "
                        "(default: 256,1024: <=256, 257-1024, >1024)")
    parser.add_argument("--max-new-tokens", type=cli.positive_int, default=None,
                        help="answer tokens (default: 32 single/multikey, 96 otherwise)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=1, help="samples run together (default: %(default)s)")
    parser.add_argument("--dtype", choices=cli.DTYPES, default=None, help="default: the exported dtype")
    parser.add_argument("--device", type=cli.device, default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--decode-mode", choices=cli.DECODE_MODES, default="auto",
                        help="decode step implementation of the generate scorer (default: %(default)s)")
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
    if args.model_dir is None and not (args.write_data and args.tokenizer):
        parser.error("give MODEL_DIR (or --write-data FILE with --tokenizer to only write samples)")
    if args.model_dir is not None and not (Path(args.model_dir) / "config.json").is_file():
        parser.error(f"MODEL_DIR {args.model_dir!r} has no config.json: give a folder written by ratplus-export")
    if args.samples_file and args.write_data:
        parser.error("--samples-file and --write-data exclude each other: the samples already are in a file")
    with cli.user_errors(PROG):
        check_edges(args.depth_buckets, "--depth-buckets", 0, 100)
        check_edges(args.distance_buckets, "--distance-buckets", 0)

    from ratplus_titan.data.tokenizer import load_tokenizer
    from ratplus_titan.inference.generate import check_decode_mode

    started = time.perf_counter()
    with cli.user_errors(PROG):
        if args.samples_file:
            samples = read_samples(args.samples_file)
        else:
            tokenizer = load_tokenizer(args.tokenizer or args.model_dir)
            samples = generate_samples(tokenizer, args.tasks, args.lengths, args.samples, args.depths, args.haystack,
                                       args.seed, args.max_new_tokens)  # fmt: skip
    if args.write_data:
        write_samples(args.write_data, samples)
        print(f"{PROG}: wrote {len(samples)} samples to {args.write_data}")
        if args.model_dir is None:
            return 0

    with cli.user_errors(PROG):
        lm = load_model(args.model_dir, args.pattern, samples, args.batch_size, args.dtype, args.device)
        check_decode_mode(lm, args.decode_mode)
        if args.tokenizer:
            lm.tokenizer = load_tokenizer(args.tokenizer)
    cli.warn_beyond_model_length(PROG, "--lengths", max(int(s["length"]) for s in samples), lm.model_max_seq_len)
    label = str(lm.patterns[0]) if len(set(lm.patterns)) == 1 else "hybrid"
    tasks = sorted({s["task"] for s in samples}, key=list(TASKS).index)
    lengths = sorted({int(s["length"]) for s in samples})
    print(
        f"{PROG}: {len(samples)} samples ({', '.join(tasks)} x {', '.join(map(_length_label, lengths))}), "
        f"pattern {label}, {lm.dtype}, {lm.device}, scorer {args.scorer}",
        file=sys.stderr,
    )
    results = evaluate(lm, samples, args.batch_size, args.decode_mode, progress=not args.quiet, scorer=args.scorer)
    print(format_table(summarize(results)))
    output = Path(args.output or f"niah_{label}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    source = {"samples_file": args.samples_file} if args.samples_file else {"haystack": args.haystack, "seed": args.seed}
    result = report(lm, results, args.scorer, args.depth_buckets, args.distance_buckets, model_dir=str(args.model_dir),
                    **source, lengths=lengths, tasks=tasks, seconds=round(time.perf_counter() - started, 2))  # fmt: skip
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{PROG}: wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
