"""Data loaders and scoring for the local lm-eval tasks of ratplus_titan (``--include_path eval/tasks``).

lm-eval calls ``custom_dataset`` functions with the task metadata: the YAML ``metadata``, the
``--metadata`` JSON and the ``--model_args`` (so ``path``, the exported model folder, gives the
needle tasks their tokenizer). Data files are read relative to this file, whatever the
working directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

DATA = Path(__file__).resolve().parent / "data"
NIAH_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
"""Lengths the needle YAMLs report as metrics (one column each, like lm-eval's RULER tasks)."""


def _read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data_file {str(path)!r} does not exist")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _test_split(rows: list[dict[str, Any]]) -> dict[str, datasets.Dataset]:
    return {"test": datasets.Dataset.from_list(rows)}


# ---- tiny multiple-choice and perplexity tasks ------------------------------------------------


def tiny_mc(**kwargs: Any) -> dict[str, datasets.Dataset]:
    """20 hand-written questions with four choices each (``question``, ``choices``, ``answer``)."""
    return _test_split(_read_jsonl(DATA / "tiny_mc.jsonl"))


def tiny_ppl(**kwargs: Any) -> dict[str, datasets.Dataset]:
    """Six passages of the bundled corpus' validation split (``text``)."""
    return _test_split(_read_jsonl(DATA / "tiny_ppl.jsonl"))


# ---- needle in a haystack -------------------------------------------------------------------------


def _niah(task: str, kwargs: dict[str, Any]) -> dict[str, datasets.Dataset]:
    """Samples of one needle task: from ``data_file`` (written by ``ratplus-niah --write-data``) or generated.

    Generation reads ``max_seq_lengths`` (default [4096]), ``num_samples`` (default 20), ``seed``,
    ``haystack`` and the tokenizer of ``tokenizer`` or ``path`` (the model folder).
    """
    from ratplus_titan.eval.niah import generate_samples

    if kwargs.get("data_file"):
        rows = [r for r in _read_jsonl(kwargs["data_file"]) if r["task"] == task]
        if not rows:
            raise ValueError(f"data_file {kwargs['data_file']!r} holds no samples of task {task!r}")
    else:
        from ratplus_titan.data.tokenizer import load_tokenizer

        source = kwargs.get("tokenizer") or kwargs.get("path")
        if not source:
            raise ValueError(
                "the ratplus_niah tasks need a tokenizer to size their samples: run them with "
                "--model_args path=MODEL_DIR, or --metadata '{\"tokenizer\": FILE}' or '{\"data_file\": FILE}'"
            )
        lengths = kwargs.get("max_seq_lengths", [4096])
        if isinstance(lengths, (int, str)):
            lengths = [int(v) for v in str(lengths).split(",")]
        rows = generate_samples(
            load_tokenizer(source),
            tasks=[task],
            lengths=[int(n) for n in lengths],
            num_samples=int(kwargs.get("num_samples", 20)),
            haystack=kwargs.get("haystack", "essays"),
            seed=int(kwargs.get("seed", 0)),
        )
    fields = ("task", "index", "length", "input", "gen_prefix", "outputs", "max_new_tokens")
    return _test_split([{k: r[k] for k in fields} for r in rows])


def niah_single(**kwargs: Any) -> dict[str, datasets.Dataset]:
    return _niah("single", kwargs)


def niah_multikey(**kwargs: Any) -> dict[str, datasets.Dataset]:
    return _niah("multikey", kwargs)


def niah_multivalue(**kwargs: Any) -> dict[str, datasets.Dataset]:
    return _niah("multivalue", kwargs)


def niah_multiquery(**kwargs: Any) -> dict[str, datasets.Dataset]:
    return _niah("multiquery", kwargs)


def niah_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """``score`` for every sample; the length columns get -1 (skipped) except the sample's own."""
    from ratplus_titan.eval.niah import match_fraction

    score = match_fraction(results[0], doc["outputs"])
    metrics = {str(n): -1.0 for n in NIAH_LENGTHS}
    if int(doc["length"]) in NIAH_LENGTHS:
        metrics[str(doc["length"])] = score
    metrics["score"] = score
    return metrics


def niah_aggregate(scores: list[float]) -> float:
    """Mean over the samples of one length (-1 when there were none)."""
    kept = [s for s in scores if s != -1]
    return sum(kept) / len(kept) if kept else -1.0
