"""ratplus_titan/data/sft.py: prompt/answer records -> rows whose loss sees only the answer and the eos."""

from __future__ import annotations

import gzip
import json
import random

import pytest
import torch

from ratplus_titan.data.sft import encode_pair, read_records, sft_row, tokenize_records
from ratplus_titan.data.tokenizer import load_tokenizer

IGNORE = -100
EOS = 2


def brute_force_row(prompt: list[int], answer: list[int], eos: int, seq_len: int) -> tuple[list[int], list[int]]:
    """Position by position: the input is the sequence's token there (eos past its end); the label is the
    next token when that token is an answer token or the final eos, else -100."""
    sequence = prompt + answer + [eos]
    inputs, labels = [], []
    for i in range(seq_len):
        inputs.append(sequence[i] if i < len(sequence) - 1 else eos)
        target = i + 1  # the position of the token this label predicts
        labels.append(sequence[target] if len(prompt) <= target < len(sequence) else IGNORE)
    return inputs, labels


def test_row_matches_brute_force_on_random_lengths():
    rng = random.Random(0)
    for _ in range(300):
        n_prompt, n_answer = rng.randint(1, 40), rng.randint(0, 12)
        seq_len = n_prompt + n_answer + rng.randint(0, 10)  # exactly full (n = seq_len + 1) .. padded
        prompt = [1] + [rng.randrange(3, 32000) for _ in range(n_prompt - 1)]
        answer = [rng.randrange(3, 32000) for _ in range(n_answer)]
        inputs, labels = sft_row(prompt, answer, EOS, seq_len)
        ref_inputs, ref_labels = brute_force_row(prompt, answer, EOS, seq_len)
        assert inputs.dtype == labels.dtype == torch.long and inputs.shape == labels.shape == (seq_len,)
        assert inputs.tolist() == ref_inputs and labels.tolist() == ref_labels
        # what the loss sees: exactly the answer and the eos, in order
        assert labels[labels != IGNORE].tolist() == answer + [EOS]


def test_row_longer_than_seq_len_plus_one_is_refused():
    sft_row([1, 5, 6], [7, 8], EOS, seq_len=5)  # 6 tokens = seq_len + 1: fits
    with pytest.raises(ValueError, match=r"7 tokens \(prompt 3, answer 3 \+ eos\) exceed seq_len \+ 1 = 6"):
        sft_row([1, 5, 6], [7, 8, 9], EOS, seq_len=5)
    with pytest.raises(ValueError, match="at least one token"):
        sft_row([], [7], EOS, seq_len=5)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def test_encode_pair_splits_the_joint_tokenization(tokenizer):
    for prompt, answer in [("What is the number? The number is", " 1234567."),
                           ("Some text.\nThe values are", " 12, 345, and 6789."),
                           ("Q: name a colour.\nA:", " green")]:  # fmt: skip
        prompt_ids, answer_ids = encode_pair(tokenizer, prompt, answer)
        assert prompt_ids == tokenizer.encode(prompt, add_bos=True)
        assert prompt_ids + answer_ids == tokenizer.encode(prompt + answer, add_bos=True)
        assert tokenizer.decode(answer_ids).strip() == answer.strip()


class _MergingTokenizer:
    """Characters, except that "ab" is one token: a prompt ending in "a" and an answer starting with "b" merge."""

    def encode(self, text, add_bos=False, add_eos=False):
        ids, i = [1] if add_bos else [], 0
        while i < len(text):
            if text.startswith("ab", i):
                ids.append(1000)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return ids


def test_encode_pair_falls_back_to_the_answer_alone_when_the_boundary_merges():
    prompt_ids, answer_ids = encode_pair(_MergingTokenizer(), "xa", "bc")
    assert prompt_ids == [1, ord("x"), ord("a")] and answer_ids == [ord("b"), ord("c")]
    prompt_ids, answer_ids = encode_pair(_MergingTokenizer(), "xy", "abc")
    assert answer_ids == [1000, ord("c")]


def _write(path, records, compress=False):
    opener = gzip.open if compress else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def test_tokenize_records_reads_files_and_names_bad_lines(tokenizer, tmp_path):
    records = [{"prompt": "Say yes:", "answer": " yes", "task": "x"}, {"prompt": "Count to three:", "answer": " 1 2 3"}]
    good = _write(tmp_path / "a.jsonl.gz", records, compress=True)
    rows = tokenize_records([good], tokenizer, seq_len=64)
    for (tokens, n_prompt), r in zip(rows, records):
        prompt_ids, answer_ids = encode_pair(tokenizer, r["prompt"], r["answer"])
        assert tokens.tolist() == prompt_ids + answer_ids and n_prompt == len(prompt_ids)

    n = len(rows[1][0]) + 1  # with the eos
    with pytest.raises(
        ValueError, match=rf"a.jsonl.gz:2: the record has {n} tokens .* more than training.seq_len \+ 1 = {n - 1}"
    ):
        tokenize_records([good], tokenizer, seq_len=n - 2)
    bad = _write(tmp_path / "bad.jsonl", [records[0], "", {"prompt": "x"}])
    with pytest.raises(
        ValueError,
        match=r"bad.jsonl:3: an SFT record needs string fields 'prompt' and 'answer' \(got keys \['prompt'\]\)",
    ):
        list(read_records(bad))
    broken = _write(tmp_path / "broken.jsonl", ["{not json"])
    with pytest.raises(ValueError, match="broken.jsonl:1: not a JSON object"):
        tokenize_records([broken], tokenizer, 64)
    empty = _write(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="no SFT records in"):
        tokenize_records([empty], tokenizer, 64)
