"""Needle-in-a-haystack: samples hold their needles at the stated depths; the scorer; the CLI."""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass

import pytest
import sentencepiece as spm

from ratplus_titan.data.sft import encode_pair
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
    table = niah.format_table(summary)
    assert "| task | 4K | 16K | mean |" in table
    assert "| single | 50.0 | 100.0 | 75.0 |" in table and "| multivalue | 75.0 | - | 75.0 |" in table


@dataclass
class _Output:
    text: str
    tokens: list[int]


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
            answer = niah.answer_text(values[:1] if self.only_first else values)
            outputs.append(_Output(answer.strip(), encode_pair(self.tokenizer, text, answer)[1]))
        return outputs


def test_evaluate_scores_a_perfect_and_a_partial_model(tokenizer, essays):
    samples = niah.generate_samples(tokenizer, lengths=[512, 1024], num_samples=3, haystack=essays)
    oracle = OracleLM(tokenizer)
    results = niah.evaluate(oracle, samples, batch_size=2, progress=False)
    assert [r["index"] for r in results] == [s["index"] for s in samples]  # original order
    assert all(r["score"] == 1.0 and r["exact"] for r in results), [(r["answer"], r["prediction"], r["exact"]) for r in results if not r["exact"]]
    assert all(n <= 2 for n, _ in oracle.calls)
    first_only = niah.evaluate(OracleLM(tokenizer, only_first=True), samples, batch_size=3, progress=False)
    partial = niah.summarize(first_only)
    assert partial["single"] == {512: 100.0, 1024: 100.0} and partial["multikey"] == {512: 100.0, 1024: 100.0}
    assert partial["multivalue"] == {512: 25.0, 1024: 25.0} and partial["multiquery"] == {512: 25.0, 1024: 25.0}
    # exact: the whole answer, token for token; one value of four is not it
    assert all(r["exact"] == (r["task"] in ("single", "multikey")) for r in first_only)


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


def test_needle_distances_point_at_the_values_and_the_answer_is_the_farthest(samples):
    for s in samples:
        ids = SP.encode(niah.prompt_text(s))
        assert s["prompt_tokens"] == len(ids) + 1  # + BOS
        assert s["answer"] == " " + ", ".join(s["outputs"]) + "."
        for needle in s["needles"]:
            at = needle["value_offset"] - 1  # index into ids (no BOS)
            assert SP.decode(ids[:at]).endswith(f"for {needle['key']} is:"), SP.decode(ids[:at])[-60:]
            assert SP.decode(ids[at : at + 12]).strip().startswith(needle["value"])
            assert needle["distance"] == s["prompt_tokens"] - 1 - needle["value_offset"] > 0
        asked = [n for n in s["needles"] if n["key"] in s["queries"]]
        assert sorted(n["value"] for n in asked) == sorted(s["outputs"])
        assert s["answer_distance"] == max(n["distance"] for n in asked)
        assert s["answer_depth"] in [n["depth"] for n in asked if n["distance"] == s["answer_distance"]]
        # several values of one key are expected in the order they appear (the needles' order)
        if s["task"] == "multivalue":
            text = s["input"]
            assert sorted(s["outputs"], key=text.index) == s["outputs"]


def test_uniform_depths_and_keys_values_of_a_split(tokenizer, essays):
    train = niah.generate_samples(tokenizer, ["single", "multikey"], [512], 40, "uniform", essays, split="train")
    depths = [n["depth"] for s in train for n in s["needles"]]
    assert all(0 <= d <= 100 for d in depths) and len(set(depths)) > 0.9 * len(depths)
    assert {int(d // 20) for d in depths if d < 100} == {0, 1, 2, 3, 4}
    for s in train:
        for n in s["needles"]:
            assert niah.split_of(n["value"]) == "train"
            adjective, noun = n["key"].rsplit("-", 1)
            assert niah.split_of(adjective) == niah.split_of(noun) == "train"
    with pytest.raises(ValueError, match="split 'test' is unknown: allowed values are train, eval"):
        niah.generate_samples(tokenizer, ["single"], [512], 1, haystack=essays, split="test")
    with pytest.raises(ValueError, match="depths='random' is invalid"):
        niah.generate_samples(tokenizer, ["single"], [512], 1, "random", essays)


def test_bucket_labels_at_their_edges():
    labels = {d: niah.depth_bucket(d) for d in (0, 19.9, 20, 79.99, 80, 100)}
    assert labels == {0: "0-20", 19.9: "0-20", 20: "20-40", 79.99: "60-80", 80: "80-100", 100: "80-100"}
    labels = {d: niah.distance_bucket(d) for d in (1, 256, 257, 1024, 1025, 10**6)}
    assert labels == {1: "<=256", 256: "<=256", 257: "257-1024", 1024: "257-1024", 1025: ">1024", 10**6: ">1024"}
    assert niah.distance_bucket(300, [100]) == ">100" and niah.depth_bucket(50, [50]) == "50-100"
    for bad in ([], [40, 20], [0, 50], [50, 100]):
        with pytest.raises(ValueError, match="give increasing bucket edges"):
            niah.check_edges(bad, "depth_edges", 0, 100)


def test_accuracy_tables_against_explicit_loops():
    rng = random.Random(0)
    results = [{"task": rng.choice(["single", "multikey"]), "score": rng.choice([0.0, 1.0, 0.5]),
                "answer_depth": rng.uniform(0, 100), "answer_distance": rng.randint(1, 3000)} for _ in range(300)]  # fmt: skip
    results.append({"task": "single", "score": 1.0, "answer_depth": None, "answer_distance": None})  # only by task
    tables = niah.accuracy_tables(results, depth_edges=[25, 50], distance_edges=[100, 2000])
    depth_ranges = {"0-25": (0, 25), "25-50": (25, 50), "50-100": (50, 100.001)}
    distance_ranges = {"<=100": (1, 100), "101-2000": (101, 2000), ">2000": (2001, 10**9)}
    for task in ("single", "multikey", "all"):
        mine = [r for r in results if task in ("all", r["task"])]
        by_task = tables["by_task"][task]
        assert by_task["n"] == len(mine) and by_task["accuracy"] == pytest.approx(100 * sum(r["score"] for r in mine) / len(mine))
        for bucket, (a, b) in depth_ranges.items():
            inside = [r["score"] for r in mine if r["answer_depth"] is not None and a <= r["answer_depth"] < b]
            cell = tables["by_depth"][task][bucket]
            assert cell["n"] == len(inside) > 0 and cell["accuracy"] == pytest.approx(100 * sum(inside) / len(inside))
        for bucket, (a, b) in distance_ranges.items():
            inside = [r["score"] for r in mine if r["answer_distance"] is not None and a <= r["answer_distance"] <= b]
            cell = tables["by_distance"][task][bucket]
            assert cell["n"] == len(inside) > 0 and cell["accuracy"] == pytest.approx(100 * sum(inside) / len(inside))
        assert list(tables["by_depth"][task]) == list(depth_ranges) and list(tables["by_distance"][task]) == list(distance_ranges)
    empty = niah.accuracy_tables(results[:1], depth_edges=[25, 50])
    assert {v["n"] for v in empty["by_depth"]["all"].values()} == {0, 1}
    assert all(v["accuracy"] is None for v in empty["by_depth"]["all"].values() if v["n"] == 0)


def test_cli_evaluates_a_samples_file_teacher_forced(tiny_export, tmp_path, capsys):
    data = tmp_path / "eval.jsonl.gz"
    assert niah.main(["--write-data", str(data), "--tokenizer", str(DEFAULT_TOKENIZER), "--lengths", "256",
                      "--tasks", "single,multikey", "--samples", "2", "--max-new-tokens", "16"]) == 0  # fmt: skip
    out = tmp_path / "report.json"
    argv = [str(tiny_export), "--samples-file", str(data), "--scorer", "teacher-forced", "--pattern", "topk4k3s2-ratplus",
            "--device", "cpu", "--batch-size", "3", "--output", str(out), "--quiet", "--distance-buckets", "64,128"]  # fmt: skip
    assert niah.main(argv) == 0
    assert "| single | 0.0 | 0.0 |" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["scorer"] == "teacher-forced" and report["patterns"] == ["topk4k3s2-ratplus"] * 2
    assert report["samples_file"] == str(data) and report["tasks"] == ["single", "multikey"] and report["lengths"] == [256]
    assert report["distance_edges"] == [64, 128] and list(report["by_distance"]["all"]) == ["<=64", "65-128", ">128"]
    assert list(report["by_depth"]["all"]) == ["0-20", "20-40", "40-60", "60-80", "80-100"]
    assert report["by_task"]["all"] == {"accuracy": 0.0, "n": 4}
    assert sum(v["n"] for v in report["by_distance"]["all"].values()) == 4
    again = niah.evaluate_file(tiny_export, data, "topk4k3s2-ratplus", batch_size=2, device="cpu", distance_edges=[64, 128])
    assert again["samples"] == report["samples"] and again["by_distance"] == report["by_distance"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task": "single", "input": "x"}) + "\n")
    line = cli_error(capsys, niah.main, [str(tiny_export), "--samples-file", str(bad), "--device", "cpu"])
    assert f"{bad}:1: record has no 'index' field (NIAH samples" in line
    line = cli_error(capsys, niah.main, [str(tiny_export), "--samples-file", str(tmp_path / "none.jsonl")])
    assert "samples file" in line and "does not exist" in line
    line = cli_error(capsys, niah.main, [str(tiny_export), "--depth-buckets", "50,20"])
    assert "--depth-buckets=[50.0, 20.0] is invalid: give increasing bucket edges in (0, 100)" in line
