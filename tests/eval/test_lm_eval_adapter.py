"""The lm-eval model ``ratplus`` against an independent computation with the plain ``RATPlusModel``.

Expectations are computed here from scratch: SentencePiece directly, the model built from the
safetensors file, one unpadded sequence at a time, fp32.
"""

from __future__ import annotations

import ast
import json
import math
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ratplus_titan.data.tokenizer import DEFAULT_TOKENIZER
from ratplus_titan.model.args import RATPlusModelArgs
from ratplus_titan.model.model import RATPlusModel
from ratplus_titan.pattern import Pattern

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from ratplus_titan.eval.lm_eval_adapter import TASKS_DIR, RATPlusEvalLM  # noqa: E402
from tests.cli_errors import cli_error  # noqa: E402
from tests.eval.conftest import PATTERN, TINY  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SP = spm.SentencePieceProcessor(model_file=str(DEFAULT_TOKENIZER))
BOS, EOS = SP.bos_id(), SP.eos_id()

PASSAGE = (
    "The committee met on Tuesday to discuss the budget for the coming year. After a long debate, the members "
    "agreed to raise funding for schools and roads, while cutting spending on administration. The chairman said "
    "the plan was a fair compromise, and that it would be reviewed again in the spring. Several members asked "
    "for more detail on the costs of the new bridge, which had been delayed twice because of the weather."
)


@pytest.fixture(scope="module")
def reference(tiny_export) -> RATPlusModel:
    args = RATPlusModelArgs(**TINY, **PATTERN)
    model = RATPlusModel(args)
    model.load_state_dict(load_file(str(tiny_export / "model.safetensors")))
    model.set_patterns([Pattern(**PATTERN)] * TINY["n_layers"])
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def adapter(tiny_export) -> RATPlusEvalLM:
    return RATPlusEvalLM(path=str(tiny_export), pattern="d4w8s2", dtype="float32", device="cpu", batch_size=3, max_length=64)


def logprobs(model: RATPlusModel, tokens: list[int]) -> torch.Tensor:
    """``[len(tokens), V]``: row ``i`` is the distribution of the token after ``tokens[i]``."""
    return F.log_softmax(model(torch.tensor([tokens]))[0].float(), dim=-1)


def expected_loglikelihood(model, context: str, continuation: str, max_length: int) -> tuple[float, bool]:
    context_ids = [BOS] + SP.encode(context) if context else [BOS]
    whole = [BOS] + SP.encode(context + continuation) if context else [BOS] + SP.encode(continuation)
    n_cont = len(whole) - len(context_ids)
    whole = whole[-(max_length + 1) :]
    lp = logprobs(model, whole[:-1])
    rows = range(len(whole) - 1 - n_cont, len(whole) - 1)
    total = sum(float(lp[r, whole[r + 1]]) for r in rows)
    greedy = all(int(lp[r].argmax()) == whole[r + 1] for r in rows)
    return total, greedy


def expected_rolling(model, text: str, max_length: int) -> float:
    """Disjoint windows of ``max_length`` predicted tokens; a window sees up to ``max_length`` tokens."""
    seq = [BOS] + SP.encode(text)
    n, total = len(seq) - 1, 0.0
    for start in range(0, n, max_length):
        end = min(start + max_length, n)
        first = max(0, end - max_length)
        lp = logprobs(model, seq[first:end])  # row r predicts seq[first + r + 1]
        total += sum(float(lp[j - first - 1, seq[j]]) for j in range(start + 1, end + 1))
    return total


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_equals_a_direct_forward(adapter, reference):
    pairs = [
        ("The capital of France is", " Paris"),
        ("Once upon a time, there was a little girl who lived in a village near the forest.", " She was kind."),
        ("Hello", " world, how are you today?"),
        ("", "An empty context is scored after BOS."),
        (PASSAGE, " The meeting ended at noon."),  # longer than max_length=64: the oldest context is dropped
        ("Question: What color is the sky?\nAnswer:", " blue"),
    ]
    got = adapter.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    assert len(got) == len(pairs)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        want, want_greedy = expected_loglikelihood(reference, context, continuation, max_length=64)
        assert logprob == pytest.approx(want, abs=1e-5), (context[:30], continuation)
        assert greedy == want_greedy
    # a continuation the random model would pick greedily: its first argmax token
    context_ids = [BOS] + SP.encode("The capital of France is")
    best = int(logprobs(reference, context_ids)[-1].argmax())
    continuation = SP.decode(SP.encode("The capital of France is") + [best])[len("The capital of France is") :]
    [(_, greedy)] = adapter.loglikelihood(requests("loglikelihood", [("The capital of France is", continuation)]), True)
    want_greedy = expected_loglikelihood(reference, "The capital of France is", continuation, 64)[1]
    assert greedy == want_greedy


def test_loglikelihood_rolling_equals_the_full_sequence_nll(adapter, reference):
    short = "The quick brown fox jumps over the lazy dog."
    [got] = adapter.loglikelihood_rolling(requests("loglikelihood_rolling", [(short,)]), disable_tqdm=True)
    seq = [BOS] + SP.encode(short)
    lp = logprobs(reference, seq[:-1])
    nll = -sum(float(lp[i, seq[i + 1]]) for i in range(len(seq) - 1))
    assert got == pytest.approx(-nll, abs=1e-5)
    # longer than max_length: disjoint windows, each with as much context as fits
    assert len(SP.encode(PASSAGE)) > 64
    got = adapter.loglikelihood_rolling(requests("loglikelihood_rolling", [(PASSAGE,), (short,)]), disable_tqdm=True)
    assert got[0] == pytest.approx(expected_rolling(reference, PASSAGE, 64), abs=1e-4)
    assert got[1] == pytest.approx(-nll, abs=1e-5)


def greedy_reference(model, context: str, max_new: int) -> str:
    tokens = [BOS] + SP.encode(context)
    new: list[int] = []
    for _ in range(max_new):
        token = int(logprobs(model, tokens)[-1].argmax())
        if token == EOS:
            break
        tokens.append(token)
        new.append(token)
    return SP.decode(new)


def test_generate_until_is_greedy_and_stops_at_stop_strings(adapter, reference):
    contexts = ["Once upon a time", "The president said that the budget", "Hi"]
    free = adapter.generate_until(
        requests("generate_until", [(c, {"until": [], "max_gen_toks": 12}) for c in contexts]), disable_tqdm=True
    )
    for context, text in zip(contexts, free):
        assert text == greedy_reference(reference, context, 12)
    stops = []
    for text in free:
        assert len(text) > 6, text
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        stops.append(stop)
    cut = adapter.generate_until(
        requests(
            "generate_until",
            [(c, {"until": [s, "never-appears"], "max_gen_toks": 12, "do_sample": False}) for c, s in zip(contexts, stops)],
        ),
        disable_tqdm=True,
    )
    for text, stop, short in zip(free, stops, cut):
        assert stop not in short
        assert short == text[: text.find(stop)]


def test_bad_model_args_name_the_field(tiny_export):
    with pytest.raises(ValueError, match="batch_size"):
        RATPlusEvalLM(path=str(tiny_export), batch_size="auto", device="cpu")
    with pytest.raises(ValueError, match="unknown fields"):
        RATPlusEvalLM(path=str(tiny_export), device="cpu", temprature=1)
    with pytest.raises(FileNotFoundError, match="config.json"):
        RATPlusEvalLM(path=str(tiny_export / "missing"), device="cpu")
    with pytest.raises(ValueError, match="pattern"):
        RATPlusEvalLM(path=str(tiny_export), pattern="d4x", device="cpu")


def test_simple_evaluate_on_local_tasks(tiny_export, reference):
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="ratplus",
        model_args=f"path={tiny_export},pattern=d4w8s2,dtype=float32,batch_size=8",
        tasks=["ratplus_tiny_mc", "ratplus_tiny_ppl"],
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        device="cpu",
    )
    results = out["results"]
    assert 0.0 <= results["ratplus_tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["ratplus_tiny_mc"]["acc_norm,none"] <= 1.0
    # bits per byte, recomputed: rolling windows of the model's 128 positions over each passage
    texts = [json.loads(line)["text"] for line in (TASKS_DIR / "data" / "tiny_ppl.jsonl").open()]
    assert any(len(SP.encode(t)) > TINY["max_seq_len"] for t in texts)  # the windows are exercised
    loglik = sum(expected_rolling(reference, t, TINY["max_seq_len"]) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert results["ratplus_tiny_ppl"]["bits_per_byte,none"] == pytest.approx(-loglik / n_bytes / math.log(2), rel=1e-5)
    assert math.isfinite(results["ratplus_tiny_ppl"]["word_perplexity,none"])


def test_only_the_adapter_imports_lm_eval():
    """``ratplus_titan`` never needs lm-eval: no other module of the package imports it."""
    import ratplus_titan

    roots = [Path(ratplus_titan.__file__).parent, REPO / "kernels", REPO / "adapters", REPO / "eval"]
    offenders = []
    for path in sorted({p.resolve() for root in roots for p in root.rglob("*.py")}):
        if path.name in ("lm_eval_adapter.py", "lm_eval_cli.py") or path.parent.name == "tasks":
            continue  # the adapter and its command line, and the lm-eval task helpers (loaded by lm-eval only)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "lm_eval" or n.startswith("lm_eval.") or n.endswith("lm_eval_adapter") for n in names):
                offenders.append(str(path))
    assert not offenders, offenders


def test_cli_reports_bad_model_args_in_one_line(tiny_export, tmp_path, capsys):
    """``ratplus-lm-eval``: lm-eval's task lookup and the model's construction report bad input as
    one error line (after lm-eval's log lines), exit status 2; argv and lm-eval's TaskManager are restored."""
    import sys

    import lm_eval.tasks

    from ratplus_titan.eval.lm_eval_cli import main

    argv, task_manager = list(sys.argv), lm_eval.tasks.TaskManager
    bad = tmp_path / "bad"
    shutil.copytree(tiny_export, bad)
    (bad / "model.safetensors").write_bytes((tiny_export / "model.safetensors").read_bytes()[:2048])
    cases = [
        (f"path={tmp_path / 'missing'}", "no config.json there; give a folder written by ratplus-export"),
        (f"path={tiny_export},pattern=dwx", "model_args pattern: pattern 'dwx' is invalid: use 'dense'"),
        (f"path={tiny_export},pattern=dense/d4w8s2/dense", "3 patterns given for a model of 2 layers"),
        (f"path={tiny_export},batch_size=0", "batch_size=0 is invalid: allowed values are integers >= 1"),
        (f"path={tiny_export},dtype=int8", "dtype='int8' is invalid: allowed values are float32, bfloat16, float16"),
        (f"path={tiny_export},temprature=1", "unknown fields ['temprature']: allowed are path, pattern"),
        (f"path={bad}", f"{bad / 'model.safetensors'} cannot be read"),
    ]
    for model_args, fragment in cases:
        line = cli_error(capsys, main, ["--model", "ratplus", "--model_args", model_args, "--tasks", "ratplus_tiny_mc",
                                        "--device", "cpu"], only_line=False)  # fmt: skip
        assert line.startswith("ratplus-lm-eval: error: ") and fragment in line, line
    line = cli_error(capsys, main, ["--model", "ratplus", "--model_args", f"path={tiny_export}"])
    assert "--tasks is missing" in line and "ratplus_tiny_mc" in line
    assert sys.argv == argv and lm_eval.tasks.TaskManager is task_manager


def test_cli_reports_an_unknown_task_in_one_line(tiny_export, capsys):
    """A task that is not ours: lm-eval indexes its own task YAMLs first (~7 s), then refuses it."""
    from ratplus_titan.eval.lm_eval_cli import main

    line = cli_error(capsys, main, ["--model", "ratplus", "--model_args", f"path={tiny_export}", "--tasks",
                                    "ratplus_tiny_mc,no_such_task", "--device", "cpu"], only_line=False)  # fmt: skip
    assert line == "ratplus-lm-eval: error: Tasks not found: no_such_task"
