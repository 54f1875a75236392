"""lm-eval throughput of the ``ratplus`` model: 512-token multiple-choice items on a 1B-shape RAT+.

    python -m bench.eval_throughput --items 400 --batch-sizes 16,32 --patterns dense,d16w256s4

Random weights (the 1B flavor's shape, bf16) and real text: each item is a ~490-token passage of
the bundled corpus plus a question, with four short choices, so every loglikelihood request
is ~512 tokens. Two measurements per (pattern, batch size):

- ``loglikelihood``: the adapter's ``loglikelihood`` on all requests (tokenisation, lm-eval's
  Collator, batched forward, scoring) -- what lm-eval spends in the model;
- ``simple_evaluate``: a whole ``lm_eval.simple_evaluate`` run of the same items as a local
  multiple-choice task (task building, requests, metrics).

Writes ``eval_throughput_<device>.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from bench import common
from bench.common import REPO

CORPUS = REPO / "ratplus_titan" / "assets" / "corpus" / "en_pd_ccby.validation.jsonl.gz"

TASK_YAML = """task: bench_mc512
dataset_path: ""
custom_dataset: !function bench_utils.load
output_type: multiple_choice
test_split: test
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

TASK_UTILS = """import json
from pathlib import Path

import datasets


def load(**kwargs):
    rows = [json.loads(line) for line in (Path(__file__).parent / "items.jsonl").open()]
    return {"test": datasets.Dataset.from_list(rows)}
"""


def make_items(tokenizer, n_items: int, context_tokens: int, seed: int = 0) -> list[dict]:
    """``n_items`` multiple-choice items: a ``context_tokens``-token passage, a question, four choices."""
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        ids = [t for line in f for t in tokenizer.encode(json.loads(line)["text"])]
    rng = random.Random(seed)
    words = tokenizer.decode(ids[:20000]).split()
    items = []
    for i in range(n_items):
        start = rng.randrange(0, len(ids) - context_tokens)
        passage = tokenizer.decode(ids[start : start + context_tokens])
        choices = [" ".join(rng.choices(words, k=rng.randint(3, 6))) for _ in range(4)]
        items.append({"question": f"{passage}\nQuestion: Which words come next?\nAnswer:", "choices": choices, "answer": i % 4})
    return items


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.eval_throughput", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flavor", default="1B", help="model shape (random weights) (default: %(default)s)")
    parser.add_argument("--items", type=int, default=400, help="multiple-choice items (4 requests each) (default: %(default)s)")
    parser.add_argument("--context-tokens", type=int, default=490, help="passage tokens per item (default: %(default)s)")
    parser.add_argument("--batch-sizes", default="16,32", help="comma-separated (default: %(default)s)")
    parser.add_argument("--patterns", default="dense,d16w256s4", help="comma-separated (default: %(default)s)")
    parser.add_argument("--out", default=common.out_dir(), help="output folder (default: $OUT or bench/results)")
    args = parser.parse_args(argv)

    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from ratplus_titan.data.tokenizer import load_tokenizer
    from ratplus_titan.eval.lm_eval_adapter import RATPlusEvalLM
    from ratplus_titan.inference.lm import RATPlusLM, resolve_inference_patterns
    from ratplus_titan.model.flavors import ratplus_flavors

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(None)
    items = make_items(tokenizer, args.items, args.context_tokens)
    requests = [
        Instance("loglikelihood", doc={}, arguments=(item["question"], " " + choice), idx=j)
        for item in items
        for j, choice in enumerate(item["choices"])
    ]
    lengths = [len(tokenizer.encode(r.args[0] + r.args[1], add_bos=True)) for r in requests]
    print(f"{len(items)} items, {len(requests)} requests, tokens per request: mean {sum(lengths) / len(lengths):.0f}, "
          f"max {max(lengths)}", flush=True)  # fmt: skip

    model_args = ratplus_flavors[args.flavor]
    torch.manual_seed(0)
    lm = RATPlusLM(model_args, None, "dense", dtype=torch.bfloat16, device=device, max_seq_len=1024,
                   max_batch_size=64, tokenizer=tokenizer)  # fmt: skip
    n_params = sum(p.numel() for p in lm.model.parameters())
    task_dir = Path(tempfile.mkdtemp(prefix="bench_mc512_"))
    (task_dir / "bench_mc512.yaml").write_text(TASK_YAML)
    (task_dir / "bench_utils.py").write_text(TASK_UTILS)
    with (task_dir / "items.jsonl").open("w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    task_manager = TaskManager(include_path=str(task_dir), include_defaults=False)

    runs = []
    for spec in args.patterns.split(","):
        lm.patterns = resolve_inference_patterns(spec, model_args.n_layers)
        lm.model.set_patterns(lm.patterns)
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            adapter = RATPlusEvalLM(lm=lm, batch_size=batch_size)
            adapter.loglikelihood(requests[: 2 * batch_size], disable_tqdm=True)  # warm-up (kernels, autotuning)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            adapter.loglikelihood(requests, disable_tqdm=True)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = lm_eval.simple_evaluate(model=adapter, tasks=["bench_mc512"], task_manager=task_manager, batch_size=batch_size)
            if device == "cuda":
                torch.cuda.synchronize()
            eval_seconds = time.perf_counter() - t0
            run = {
                "pattern": spec,
                "batch_size": batch_size,
                "requests": len(requests),
                "loglikelihood_s": round(seconds, 3),
                "requests_per_min": round(60 * len(requests) / seconds),
                "tokens_per_s": round(sum(lengths) / seconds),
                "simple_evaluate_s": round(eval_seconds, 3),
                "simple_evaluate_requests_per_min": round(60 * len(requests) / eval_seconds),
                "acc": out["results"]["bench_mc512"]["acc,none"],
                "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
            }
            runs.append(run)
            print(json.dumps(run), flush=True)

    result = {
        "what": "lm-eval loglikelihood throughput, ratplus model, 512-token multiple-choice requests (4 per item)",
        "env": common.environment(device),
        "lm_eval": lm_eval.__version__,
        "flavor": args.flavor,
        "parameters": n_params,
        "dtype": "bfloat16",
        "weights": "random (normal 0.02)",
        "items": len(items),
        "mean_request_tokens": round(sum(lengths) / len(lengths), 1),
        "runs": runs,
    }
    out_path = common.write_json(Path(args.out) / f"eval_throughput_{common.device_slug(device)}.json", result)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
