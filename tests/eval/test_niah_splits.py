"""eval/niah_splits.py: fine-tuning records from training text, evaluation samples from held-out text,
no key, value or haystack text shared."""

from __future__ import annotations

import json
import re

import pytest

from ratplus_titan.data.dataset import BUNDLED_CORPUS
from ratplus_titan.data.pretokenize import read_documents
from ratplus_titan.data.sft import encode_pair, tokenize_records
from ratplus_titan.data.tokenizer import load_tokenizer
from ratplus_titan.eval import niah, niah_splits
from tests.cli_errors import cli_error

LENGTH = 256  # the CPU CI scale of the reproduction


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def splits(tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("splits")
    result = niah_splits.make_splits(tokenizer, BUNDLED_CORPUS["train"], BUNDLED_CORPUS["validation"], LENGTH,
                                     ["single", "multikey"], n_train=60, n_eval=30, seed=1, out_dir=out)  # fmt: skip
    train = [json.loads(line) for line in result["train"].open()]
    evaluation = niah.read_samples(result["eval"])
    return result, train, evaluation


def _keys_and_values(records_needles):
    keys, values = set(), set()
    for needles in records_needles:
        for n in needles:
            keys.add(n["key"])
            values.add(n["value"])
    return keys, values


def test_splits_share_no_key_value_or_key_word(splits, tokenizer):
    result, train, evaluation = splits
    assert result["train_records"] == len(train) == 120 and result["eval_samples"] == len(evaluation) == 60
    # a train record's needles are in its prompt text: read them back from there
    needle = re.compile(r"One of the special magic numbers for (\S+) is: (\d+)\.")
    train_pairs = [needle.findall(r["prompt"]) for r in train]
    assert [len(p) for p in train_pairs] == [1 if r["task"] == "single" else 4 for r in train]
    train_keys = {k for pairs in train_pairs for k, _ in pairs}
    train_values = {v for pairs in train_pairs for _, v in pairs}
    eval_keys, eval_values = _keys_and_values(s["needles"] for s in evaluation)
    assert train_keys and eval_keys and not train_keys & eval_keys
    assert train_values and eval_values and not train_values & eval_values
    train_words = {w for k in train_keys for w in k.rsplit("-", 1)}
    eval_words = {w for k in eval_keys for w in k.rsplit("-", 1)}
    assert not train_words & eval_words
    # the answer is the asked key's value, in the format the teacher-forced scorer checks
    for r, pairs in zip(train, train_pairs):
        asked = re.search(r"for (\S+) mentioned in the provided text is$", r["prompt"])[1]
        assert r["answer"] == " " + dict(pairs)[asked] + "."
    for s in evaluation:
        assert s["answer"] == niah.answer_text(s["outputs"]) and len(s["outputs"]) == 1


def test_haystacks_come_from_their_own_text(splits):
    _, train, evaluation = splits
    train_text = " ".join(" ".join(d.split()) for d in read_documents(BUNDLED_CORPUS["train"]))
    eval_text = " ".join(" ".join(d.split()) for d in read_documents(BUNDLED_CORPUS["validation"]))
    needle = re.compile(r"One of the special magic numbers for \S+ is: \d+\.")
    train_prompts = {r["prompt"] for r in train}

    checked = 0
    for prompt in [r["prompt"] for r in train] + [niah.prompt_text(s) for s in evaluation]:
        own, other = (train_text, eval_text) if prompt in train_prompts else (eval_text, train_text)
        context = prompt.split("\n", 1)[1].rsplit("\n", 1)[0]
        for sentence in niah.split_sentences(context):
            if len(sentence) > 60 and not needle.search(sentence):  # long enough not to occur by chance elsewhere
                assert sentence in own and sentence not in other
                checked += 1
    assert checked > 100


def test_depths_are_spread_and_records_fit_the_length(splits, tokenizer):
    result, train, evaluation = splits
    depths = [d for r in train for d in r["depths"]]
    assert all(0 <= d <= 100 for d in depths)
    assert {min(int(d // 20), 4) for d in depths} == {0, 1, 2, 3, 4}
    rows = tokenize_records([result["train"]], tokenizer, seq_len=LENGTH)  # no record too long for seq_len
    assert len(rows) == len(train)
    for r, s in zip(train[:5], evaluation[:5]):
        assert set(r) >= {
            "prompt",
            "answer",
            "task",
            "length",
            "depths",
            "distances",
            "answer_depth",
            "answer_distance",
        }
        assert len(r["distances"]) == len(r["depths"]) and r["answer_distance"] in r["distances"]
        prompt_ids, answer_ids = encode_pair(tokenizer, niah.prompt_text(s), s["answer"])
        assert len(prompt_ids) == s["prompt_tokens"] and len(prompt_ids) + len(answer_ids) + 1 <= LENGTH + 1


def test_cli_writes_both_files_and_reports_bad_input(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--train-haystack", str(BUNDLED_CORPUS["validation"]), "--eval-haystack", "essays", "--length", "300",
            "--tasks", "single", "--train-samples", "3", "--eval-samples", "2", "--out", str(out), "--quiet"]  # fmt: skip
    assert niah_splits.main(argv) == 0
    assert "wrote 3 fine-tuning records" in capsys.readouterr().out
    assert len((out / "niah_train.jsonl").read_text().splitlines()) == 3
    assert len(niah.read_samples(out / "niah_eval.jsonl")) == 2
    with pytest.raises(SystemExit) as exit_:
        niah_splits.main(["--help"])
    assert exit_.value.code == 0
    too_short = [*argv[:5], "64", *argv[6:]]
    assert "length 64 is too short for task single" in cli_error(capsys, niah_splits.main, too_short)
    line = cli_error(capsys, niah_splits.main, ["--train-haystack", "/no/such.jsonl.xz", *argv[2:]])
    assert "haystack '/no/such.jsonl.xz': not 'essays', 'noise'" in line
    assert "argument --tasks" in cli_error(capsys, niah_splits.main, [*argv, "--tasks", "needle"])
    assert "--length" in cli_error(capsys, niah_splits.main, argv[:4])
