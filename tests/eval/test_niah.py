"""Needle-in-a-haystack: samples hold their needles at the stated depths; the scorer; the CLI."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass

import pytest
import sentencepiece as spm

from ratplus_titan.data.tokenizer import DEFAULT_TOKENIZER, load_tokenizer
from ratplus_titan.eval import niah
from tests.cli_errors import cli_error

SP = spm.SentencePieceProcessor(model_file=str(DEFAULT_TOKENIZER))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_TOKENIZER)


@pytest.fixture(scope="module")
def essays(tokenizer):
    return niah.Haystack.load("essays", tokenizer)


@pytest.fixture(scope="module")
def samples(tokenizer, essays):
    return niah.generate_samples(tokenizer, lengths=[1024, 4096], num_samples=5, haystack=essays, seed=3)


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?]) ", text) if s]


def _without(text: str, needles: list[str]) -> str:
    for n in needles:
        text = text.replace(n + " ", "").replace(" " + n, "").replace(n, "")
    return text


def test_every_sample_holds_its_needles_at_the_stated_depth(samples):
    assert {s["task"] for s in samples} == set(niah.TASKS)
    assert {s["length"] for s in samples} == {1024, 4096}
    for s in samples:
        task = niah.TASKS[s["task"]]
        texts = [n["text"] for n in s["needles"]]
        assert len(texts) == task.num_keys * task.num_values
        assert len({n["key"] for n in s["needles"]}) == task.num_keys
        assert len(s["outputs"]) == task.num_queries * task.num_values
        for value in s["outputs"]:  # every answer is hidden under a queried key
            assert any(n["value"] == value and n["key"] in s["queries"] for n in s["needles"])
        for key in s["queries"]:
            assert key in s["input"].rsplit("\n", 1)[1] and key in s["gen_prefix"]
        # the prompt fits the length with the answer budget, and fills most of it
        n_prompt = len(SP.encode(s["input"] + " " + s["gen_prefix"])) + 1  # + BOS
        assert n_prompt <= s["length"] - s["max_new_tokens"]
        assert n_prompt >= 0.9 * (s["length"] - s["max_new_tokens"]), (s["task"], s["length"], n_prompt)

        context = s["input"].split("\n", 1)[1].rsplit("\n", 1)[0]
        haystack = _without(context, texts)
        total = len(SP.encode(haystack))
        for needle in s["needles"]:
            assert context.count(needle["text"]) == 1
            at = context.index(needle["text"])
            before = _without(context[:at], texts).strip()
            after = _without(context[at + len(needle["text"]) :], texts).strip()
            assert before == "" or before[-1] in ".!?)]\"'" or re.search(r"[.!?][^ ]*$", before), before[-40:]
            position = len(SP.encode(before)) if before else 0
            # the nearest sentence boundary: off by at most half the sentence the exact depth falls in
            neighbours = [len(SP.encode(x)) for x in (_sentences(before)[-1:] + _sentences(after)[:1])]
            tolerance = max(neighbours, default=0) / 2 + 0.01 * total + 3
            assert abs(position - needle["depth"] / 100 * total) <= tolerance, (s["task"], needle["depth"], position, total)


def test_single_needle_tasks_cycle_through_the_depths(samples):
    singles = [s for s in samples if s["task"] == "single" and s["length"] == 4096]
    assert [s["depth"] for s in singles] == [float(d) for d in niah.DEFAULT_DEPTHS]
    first, last = singles[0], singles[-1]
    body = first["input"].split("\n", 1)[1]
    assert body.startswith(first["needles"][0]["text"])  # depth 0: the very start
    body = last["input"].split("\n", 1)[1].rsplit("\n", 1)[0]
    assert body.endswith(last["needles"][0]["text"])  # depth 100: the very end


def test_samples_are_reproducible_and_differ_by_seed(tokenizer, essays):
    a = niah.generate_samples(tokenizer, ["multiquery"], [1024], 2, haystack=essays, seed=1)
    b = niah.generate_samples(tokenizer, ["multiquery"], [1024], 2, haystack=essays, seed=1)
    c = niah.generate_samples(tokenizer, ["multiquery"], [1024], 2, haystack=essays, seed=2)
    assert a == b and a[0]["input"] != c[0]["input"]


def test_noise_haystack_and_bad_arguments(tokenizer):
    [s] = niah.generate_samples(tokenizer, ["single"], [512], 1, depths=[50], haystack="noise")
    assert "The grass is green." in s["input"] and s["outputs"][0] in s["input"]
    with pytest.raises(ValueError, match="length 128 is too short for task multivalue"):
        niah.generate_samples(tokenizer, ["multivalue"], [128], 1)
    with pytest.raises(ValueError, match="task 'needle' is unknown"):
        niah.generate_samples(tokenizer, ["needle"], [512], 1)
    with pytest.raises(FileNotFoundError, match="haystack"):
        niah.generate_samples(tokenizer, ["single"], [512], 1, haystack="/no/such/folder")


def test_scorer_on_hand_made_answers():
    assert niah.match_fraction("The special magic number is 1234567.", ["1234567"]) == 1.0
    assert niah.match_fraction("is 1234576", ["1234567"]) == 0.0
    assert niah.match_fraction("1111111, 2222222 and 4444444", ["1111111", "2222222", "3333333"]) == pytest.approx(2 / 3)
    assert niah.match_fraction("ABC-def", ["abc-DEF"]) == 1.0  # case-insensitive
    assert niah.match_fraction("", ["1"]) == 0.0
    with pytest.raises(ValueError):
        niah.match_fraction("x", [])
    results = [
        {"task": "single", "length": 4096, "score": 1.0, "depth": 0.0},
        {"task": "single", "length": 4096, "score": 0.0, "depth": 50.0},
        {"task": "single", "length": 16384, "score": 1.0, "depth": 0.0},
        {"task": "multivalue", "length": 4096, "score": 0.75, "depth": None},
    ]
    summary = niah.summarize(results)
    assert summary == {"single": {4096: 50.0, 16384: 100.0}, "multivalue": {4096: 75.0}}
    assert niah.summarize_by_depth(results) == {"single": {4096: {0.0: 100.0, 50.0: 0.0}, 16384: {0.0: 100.0}}}
    table = niah.format_table(summary)
    assert "| task | 4K | 16K | mean |" in table
    assert "| single | 50.0 | 100.0 | 75.0 |" in table and "| multivalue | 75.0 | - | 75.0 |" in table


@dataclass
class _Output:
    text: str


class OracleLM:
    """Reads the needles off the prompt and answers with the values of the asked keys (or only the first)."""

    def __init__(self, tokenizer, only_first: bool = False):
        self.tokenizer, self.only_first, self.calls = tokenizer, only_first, []

    def generate(self, prompts, max_new_tokens, **kwargs):
        self.calls.append((len(prompts), max_new_tokens))
        outputs = []
        for p in prompts:
            text = self.tokenizer.decode(p)
            keys = re.search(r"The special magic numbers? for (.*) mentioned in the provided text (?:is|are)$", text)[1]
            keys = re.split(r", and |, ", keys)
            values = [v for k in keys for v in re.findall(rf"for {re.escape(k)} is: (\d+)\.", text)]
            outputs.append(_Output(", ".join(values[:1] if self.only_first else values)))
        return outputs


def test_evaluate_scores_a_perfect_and_a_partial_model(tokenizer, essays):
    samples = niah.generate_samples(tokenizer, lengths=[512, 1024], num_samples=3, haystack=essays)
    oracle = OracleLM(tokenizer)
    results = niah.evaluate(oracle, samples, batch_size=2, progress=False)
    assert [r["index"] for r in results] == [s["index"] for s in samples]  # original order
    assert all(r["score"] == 1.0 for r in results)
    assert all(n <= 2 for n, _ in oracle.calls)
    partial = niah.summarize(niah.evaluate(OracleLM(tokenizer, only_first=True), samples, batch_size=3, progress=False))
    assert partial["single"] == {512: 100.0, 1024: 100.0} and partial["multikey"] == {512: 100.0, 1024: 100.0}
    assert partial["multivalue"] == {512: 25.0, 1024: 25.0} and partial["multiquery"] == {512: 25.0, 1024: 25.0}


def test_cli_writes_data_and_evaluates_a_model(tiny_export, tmp_path, capsys):
    data = tmp_path / "niah.jsonl"
    assert niah.main(["--write-data", str(data), "--tokenizer", str(DEFAULT_TOKENIZER), "--lengths", "512", "--samples", "2"]) == 0
    rows = [json.loads(line) for line in data.open()]
    assert len(rows) == 2 * len(niah.TASKS) and all(r["length"] == 512 for r in rows)

    out = tmp_path / "results.json"
    argv = [str(tiny_export), "--lengths", "256,384", "--tasks", "single", "--samples", "1", "--pattern", "d4w8s2",
            "--device", "cpu", "--output", str(out), "--quiet", "--max-new-tokens", "4"]  # fmt: skip
    assert niah.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| task | 256 | 384 | mean |" in printed and "| single |" in printed
    report = json.loads(out.read_text())
    assert report["patterns"] == ["d4w8s2", "d4w8s2"]
    assert set(report["summary"]["single"]) == {"256", "384"} and len(report["samples"]) == 2
    with pytest.raises(SystemExit):
        niah.main([str(tiny_export), "--tasks", "haystack"])
    with pytest.raises(SystemExit):
        niah.main(["--help"])


@pytest.mark.parametrize(
    "options, fragments",
    [
        (["--lengths", "4096,0"], ["argument --lengths", "'0' is not a token count"]),
        (["--lengths", "4q"], ["argument --lengths", "'4q' is not a token count", "4k = 4096"]),
        (["--tasks", "single,haystack"], ["argument --tasks", "'haystack' is unknown", "single, multikey, multivalue, multiquery"]),
        (["--samples", "0"], ["argument --samples", "integers >= 1"]),
        (["--batch-size", "-2"], ["argument --batch-size", "integers >= 1"]),
        (["--max-new-tokens", "0"], ["argument --max-new-tokens", "integers >= 1"]),
        (["--depths", "0,101"], ["argument --depths", "'101' is invalid", "numbers in [0, 100]"]),
        (["--pattern", "d16w256"], ["argument --pattern", "'d16w256' is invalid"]),
        (["--dtype", "int8"], ["argument --dtype", "'float32', 'bfloat16', 'float16'"]),
    ],
)
def test_bad_arguments_fail_before_anything_loads(tmp_path, capsys, options, fragments):
    line = cli_error(capsys, niah.main, [str(tmp_path / "missing"), *options], fragments)
    assert line.startswith("ratplus-niah: error: ")


def test_bad_files_and_requests_name_what_is_wrong(tiny_export, tmp_path, capsys):
    assert "has no config.json" in cli_error(capsys, niah.main, [str(tmp_path / "missing")])
    assert "give MODEL_DIR (or --write-data FILE with --tokenizer" in cli_error(capsys, niah.main, ["--lengths", "512"])
    argv = [str(tiny_export), "--tasks", "single", "--samples", "1", "--device", "cpu", "--quiet"]
    line = cli_error(capsys, niah.main, [*argv, "--haystack", str(tmp_path / "nothing")])
    assert "haystack" in line and "not 'essays', 'noise', or an existing folder/file of text" in line
    assert "length 64 is too short for task single" in cli_error(capsys, niah.main, [*argv, "--lengths", "64"])
    line = cli_error(capsys, niah.main, [*argv, "--lengths", "256", "--pattern", "2:dense+2:d4w8s2"])
    assert "do not sum to n_heads=2" in line
    bad = tmp_path / "bad"
    shutil.copytree(tiny_export, bad)
    (bad / "model.safetensors").write_bytes((tiny_export / "model.safetensors").read_bytes()[:4096])
    line = cli_error(capsys, niah.main, [str(bad), "--tasks", "single", "--samples", "1", "--lengths", "256", "--quiet"])
    assert f"{bad / 'model.safetensors'} cannot be read" in line and "truncated or corrupted" in line
