"""LongBench runner: the metrics on hand-made examples, prompts, middle truncation, the CLI."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from ratplus_titan.eval import longbench as lb
from tests.cli_errors import cli_error


def test_qa_f1_on_hand_made_examples():
    # normalised: "cat sat on mat" vs "cat on mat": 3 common, precision 3/4, recall 1
    assert lb.qa_f1_score("The cat sat on the mat.", "a cat on mat") == pytest.approx(2 * 0.75 / 1.75)
    assert lb.qa_f1_score("Paris", "paris!") == 1.0
    assert lb.qa_f1_score("London", "Paris") == 0.0
    assert lb.qa_f1_score("", "Paris") == 0.0
    assert lb.normalize_answer("The  Quick, brown fox!") == "quick brown fox"


def test_rouge_l_on_hand_made_examples():
    # LCS "the cat was under the bed" = 6 of 7 predicted and 6 of 6 reference tokens
    assert lb.rouge_l_score("The cat was found under the bed.", "the cat was under the bed") == pytest.approx(12 / 13)
    assert lb.rouge_l_score("a b c d", "d c b a") == pytest.approx(0.25)  # LCS 1
    assert lb.rouge_l_score("", "anything") == 0.0
    assert lb.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4


def test_rouge_l_matches_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rng = random.Random(0)
    words = "the a cat dog sat ran on under mat bed quickly, slowly. Yes! no? 42 7".split()
    for _ in range(50):
        pred = " ".join(rng.choices(words, k=rng.randint(1, 20)))
        ref = " ".join(rng.choices(words, k=rng.randint(1, 20)))
        assert lb.rouge_l_score(pred, ref) == pytest.approx(scorer.score(ref, pred)["rougeL"].fmeasure, abs=1e-9)


def test_classification_count_retrieval_code_on_hand_made_examples():
    classes = ["Date", "Other date", "Human", "Description"]
    assert lb.classification_score("Other date", "Other date", all_classes=classes) == 1.0  # "Date" is inside the answer
    assert lb.classification_score("Date", "Other date", all_classes=classes) == 0.0
    assert lb.classification_score("Human or Description", "Human", all_classes=classes) == 0.5
    assert lb.classification_score("no idea", "Human", all_classes=classes) == 0.0
    with pytest.raises(ValueError, match="all_classes"):
        lb.classification_score("Human", "Human")

    assert lb.count_score("There are 12 unique paragraphs out of 30", 12) == 0.5
    assert lb.count_score("12", "12") == 1.0 and lb.count_score("twelve", 12) == 0.0

    assert lb.retrieval_score("Paragraph 7", "Paragraph 7") == 1.0
    assert lb.retrieval_score("Paragraph 3 or Paragraph 7", "Paragraph 7") == 0.5
    assert lb.retrieval_score("none", "Paragraph 7") == 0.0

    assert lb.code_sim_score("```python\n    return a + b\n```", "    return a + b") == 1.0
    assert lb.code_sim_score("# set x\nx = 1", "x = 2") == 0.8  # difflib: 2 * 4 matches / 10 chars
    assert lb.code_sim_score("// only comments", "x = 2") == 0.0


def test_score_sample_takes_the_first_line_and_the_best_answer():
    assert lb.score_sample("triviaqa", "\nParis\nQuestion: what else?", ["London", "Paris"]) == 1.0
    assert lb.score_sample("hotpotqa", "Paris\nParis", ["Paris"]) == pytest.approx(2 / 3)  # no first-line cut
    records = [
        {"pred": "Paris", "answers": ["Paris"], "length": 3000},
        {"pred": "Rome", "answers": ["Paris"], "length": 5000},
        {"pred": "Paris", "answers": ["Paris"], "length": 9000},
    ]
    result = lb.score_task("hotpotqa", records)
    assert result == {"n": 3, "metric": "qa_f1", "score": 66.67, "0-4k": 100.0, "4-8k": 0.0, "8k+": 100.0}
    table = lb.format_table({"hotpotqa": result, "trec": {"n": 1, "metric": "classification", "score": 50.0}})
    assert "| hotpotqa | 3 | qa_f1 | 66.67 | 100.00 | 0.00 | 100.00 |" in table
    assert "| average | 4 | | 58.34 |" in table


def test_prompts_truncation_and_files(tmp_path):
    prompt = lb.build_prompt("hotpotqa", {"context": "Passage 1: {braces} stay.", "input": "Who?"})
    assert prompt.startswith("Answer the question based on the given passages.")
    assert "Passage 1: {braces} stay." in prompt and prompt.endswith("Question: Who?\nAnswer:")
    assert lb.build_prompt("lcc", {"context": "def f():\n", "input": ""}).endswith("def f():\nNext line of code:\n")
    assert lb.truncate_middle(list(range(10)), 6) == [0, 1, 2, 7, 8, 9]
    assert lb.truncate_middle([1, 2, 3], 6) == [1, 2, 3]
    assert lb.task_of_file("data/hotpotqa_e.jsonl") == "hotpotqa"
    with pytest.raises(ValueError, match="'dureader'.*not supported"):
        lb.task_of_file("dureader.jsonl")
    bad = tmp_path / "qasper.jsonl"
    bad.write_text(json.dumps({"input": "q", "answers": ["a"]}) + "\n")
    with pytest.raises(ValueError, match="no 'context' field"):
        lb.load_samples(bad)


def test_cli_runs_a_model_and_scores(tiny_export, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    filler = "The river runs past the old mill and the bridge. " * 40  # far longer than the model's window
    with (data / "hotpotqa.jsonl").open("w") as f:
        for i, answer in enumerate(["the mill", "the bridge"]):
            f.write(json.dumps({"input": f"Question {i}: what is by the river?", "context": filler, "answers": [answer],
                                "length": 400, "all_classes": None}) + "\n")  # fmt: skip
    with (data / "trec.jsonl").open("w") as f:
        f.write(json.dumps({"input": "What year was it?", "context": "Q: Who? Type: Human", "answers": ["Date"],
                            "all_classes": ["Date", "Human"], "length": 50}) + "\n")  # fmt: skip
    out = tmp_path / "out"
    argv = [str(tiny_export), str(data), "--max-length", "96", "--device", "cpu", "--pattern", "d4w8s2",
            "--output-dir", str(out), "--quiet", "--batch-size", "2"]  # fmt: skip
    assert lb.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| hotpotqa | 2 | qa_f1 |" in printed and "| trec | 1 | classification |" in printed
    records = [json.loads(line) for line in (out / "hotpotqa.jsonl").open()]
    assert len(records) == 2 and all(r["prompt_tokens"] <= 96 - lb.TASKS["hotpotqa"].max_new_tokens for r in records)
    report = json.loads((out / "result.json").read_text())
    assert set(report["results"]) == {"hotpotqa", "trec"}
    # scoring the written predictions again gives the same table
    assert lb.main(["--score-only", str(out)]) == 0
    again = capsys.readouterr().out
    assert f"| hotpotqa | 2 | qa_f1 | {report['results']['hotpotqa']['score']:.2f} |" in again
    with pytest.raises(SystemExit):
        lb.main([str(tiny_export), str(data), "--tasks", "dureader"])
    with pytest.raises(SystemExit):
        lb.main(["--help"])


@pytest.mark.parametrize(
    "options, fragments",
    [
        (["--tasks", "hotpotqa,dureader"], ["argument --tasks", "'dureader' is unknown", "narrativeqa, qasper"]),
        (["--max-length", "0"], ["argument --max-length", "not a token count"]),
        (["--limit", "0"], ["argument --limit", "integers >= 1"]),
        (["--batch-size", "x"], ["argument --batch-size", "'x' is not an integer"]),
        (["--pattern", "d4w8s2,,dense"], ["argument --pattern", "layer 1 of 3"]),
        (["--decode-mode", "turbo"], ["argument --decode-mode", "'auto', 'eager', 'graph', 'compile'"]),
    ],
)
def test_bad_arguments_fail_before_anything_loads(tmp_path, capsys, options, fragments):
    line = cli_error(capsys, lb.main, [str(tmp_path / "missing"), str(tmp_path / "data"), *options], fragments)
    assert line.startswith("ratplus-longbench: error: ")


def test_bad_files_name_the_file_and_line(tiny_export, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    good = json.dumps({"input": "q", "context": "c", "answers": ["a"]})
    (data / "hotpotqa.jsonl").write_text(good + "\n" + good[:20] + "\n")  # a cut-short line
    argv = [str(tiny_export), str(data / "hotpotqa.jsonl"), "--device", "cpu", "--quiet"]
    line = cli_error(capsys, lb.main, argv)
    assert f"{data / 'hotpotqa.jsonl'}:2: not a JSON object" in line and "truncated" in line
    (data / "hotpotqa.jsonl").write_text(json.dumps({"input": "q", "context": "c"}) + "\n")
    assert "hotpotqa.jsonl:1: record has no 'answers' field (LongBench format: input, context, answers)" in cli_error(
        capsys, lb.main, argv
    )
    (data / "hotpotqa.jsonl").write_text(good + "\n")
    line = cli_error(capsys, lb.main, [*argv, "--max-length", "20"])
    assert "--max-length 20 leaves no room for a prompt next to 32 answer tokens (hotpotqa): give at least 34" in line
    assert "is neither a jsonl file nor a folder" in cli_error(capsys, lb.main, [str(tiny_export), str(tmp_path / "none")])
    assert "has no config.json" in cli_error(capsys, lb.main, [str(tmp_path), str(data)])
    assert "record has no 'pred' field" in cli_error(capsys, lb.main, ["--score-only", str(data / "hotpotqa.jsonl")])
    bad = tmp_path / "bad"
    shutil.copytree(tiny_export, bad)
    (bad / "config.json").write_text("{")
    assert f"{bad / 'config.json'} is not valid JSON" in cli_error(capsys, lb.main, [str(bad), str(data), "--quiet"])
