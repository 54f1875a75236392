"""ratplus_titan/data/sft.py: prompt/answer records -> rows whose loss sees only the answer and the eos."""

from __future__ import annotations

import gzip
import json
import random
import shutil

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


# ---- through the trainer ([training] dataset = "sft") --------------------------------------------

WORDS = "the a river stone bright seven quiet north apple window number is of and to".split()


def write_records(path, n: int = 10, seed: int = 0) -> list[dict]:
    """``n`` distinct records: prompts of 5-30 words, answers of 1-8 words (a few fit seq_len 64 exactly)."""
    rng = random.Random(seed)
    records = [{"prompt": f"Record {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + " ->",
                "answer": " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))} for i in range(n)]  # fmt: skip
    _write(path, records)
    return records


def sft_args(dump, steps: int, data, *extra: str, batch: int = 4) -> list[str]:
    from tests.trainer_utils import trainer_args

    return trainer_args(dump, steps, "--training.dataset", "sft", "--training.dataset_path", str(data),
                        "--ratplus.no-joint-train", *extra, batch=batch, seq_len=64)  # fmt: skip


def test_trainer_loss_is_the_float64_cross_entropy_of_the_answers_only(tokenizer, tmp_path, monkeypatch):
    """The trainer's step-1 loss equals a float64 cross-entropy computed from the records alone (not from
    the dataset's labels): the mean over every answer token and eos of the batch, the prompts left out.
    Any prompt token reaching the loss (or a padding token, or a missing eos) changes it."""
    import copy

    from ratplus_titan.train import RATPlusTrainer
    from tests.torchtitan_cpu import trainer_session
    from tests.trainer_utils import register_test_flavor

    register_test_flavor()
    data = tmp_path / "records.jsonl"
    records = write_records(data)
    encoded = [encode_pair(tokenizer, r["prompt"], r["answer"]) for r in records]
    with trainer_session(RATPlusTrainer, sft_args(tmp_path / "out", 1, data, "--checkpoint.no-enable")) as trainer:
        reference = copy.deepcopy(trainer.model_parts[0]).double().eval()
        inputs = []
        step = trainer.forward_backward_step

        def record_inputs(*, input_dict, labels, global_valid_tokens):
            inputs.append(input_dict["input"].clone())
            return step(input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens)

        monkeypatch.setattr(trainer, "forward_backward_step", record_inputs)
        trainer.train()
        loss = trainer.phase_losses[0]["loss"]
    [batch] = inputs
    assert batch.shape == (4, 64)
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        logits = reference(batch).double()  # [4, 64, V]
    for row, row_logits in zip(batch, logits):
        # which record this row is: its first tokens are bos + prompt + answer
        [(prompt, answer)] = [(p, a) for p, a in encoded if row[: len(p) + len(a)].tolist() == p + a]
        targets = answer + [tokenizer.eos_id]
        for j, target in enumerate(targets):
            total -= torch.log_softmax(row_logits[len(prompt) - 1 + j], dim=-1)[target]
        count += len(targets)
    assert loss == pytest.approx(float(total / count), rel=1e-5)


def test_sft_training_resumes_exactly_and_visits_every_record_each_epoch(tmp_path, monkeypatch):
    """6 steps of 4 rows over 10 records (2.4 shuffled epochs), checkpoints every 3 steps: the rows of
    each epoch are the 10 records once each, in a new order; a run resumed at step 3 replays steps 4-6
    bit for bit. Starting from a pretrained checkpoint (initial_load_path, model only) works too."""
    from ratplus_titan.train import RATPlusTrainer
    from tests.torchtitan_cpu import trainer_session
    from tests.trainer_utils import register_test_flavor

    register_test_flavor()
    data = tmp_path / "records.jsonl"
    write_records(data)
    pretrained = tmp_path / "pretrained"
    with trainer_session(RATPlusTrainer, sft_args(pretrained, 1, data, "--checkpoint.interval", "1")) as trainer:
        trainer.train()
    start = ["--checkpoint.initial_load_path", str(pretrained / "checkpoint" / "step-1"),
             "--checkpoint.initial_load_model_only", "--checkpoint.interval", "3"]  # fmt: skip

    def run(folder):
        rows = []
        with trainer_session(RATPlusTrainer, sft_args(folder, 6, data, *start)) as trainer:
            step = trainer.forward_backward_step

            def record_rows(*, input_dict, labels, global_valid_tokens):
                rows.extend(x[:12].tolist() for x in input_dict["input"])
                return step(input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens)

            monkeypatch.setattr(trainer, "forward_backward_step", record_rows)
            trainer.train()
            return trainer.phase_losses, rows

    first, rows = run(tmp_path / "first")
    assert [r["step"] for r in first] == list(range(1, 7)) and all(torch.isfinite(torch.tensor(r["loss"])) for r in first)
    epochs = [rows[:10], rows[10:20]]
    for epoch in epochs:
        assert len({tuple(r) for r in epoch}) == 10  # every record once
    assert epochs[0] != epochs[1]  # a fresh permutation each epoch

    resumed = tmp_path / "resumed"
    (resumed / "checkpoint").mkdir(parents=True)
    shutil.copytree(tmp_path / "first" / "checkpoint" / "step-3", resumed / "checkpoint" / "step-3")
    again, again_rows = run(resumed)
    assert [r["step"] for r in again] == [4, 5, 6]
    assert again == first[3:] and again_rows == rows[12:]


def test_validation_on_held_out_sft_records(tmp_path):
    """``[validation] dataset = "sft"``: the held-out records' answer loss, in file order, finite."""
    from ratplus_titan.train import RATPlusTrainer
    from tests.torchtitan_cpu import trainer_session
    from tests.trainer_utils import register_test_flavor

    register_test_flavor()
    write_records(tmp_path / "train.jsonl")
    write_records(tmp_path / "held_out.jsonl", n=6, seed=1)
    validation = ["--validation.enable", "--validation.dataset", "sft", "--validation.dataset_path",
                  str(tmp_path / "held_out.jsonl"), "--validation.freq", "2", "--validation.steps", "-1",
                  "--validation.seq_len", "64", "--validation.local_batch_size", "3"]  # fmt: skip
    logged = []
    args = sft_args(tmp_path / "out", 2, tmp_path / "train.jsonl", "--checkpoint.no-enable", *validation)
    with trainer_session(RATPlusTrainer, args) as trainer:
        trainer.metrics_processor.log_validation = lambda loss, step, **kw: logged.append((step, float(loss)))
        trainer.train()
    assert [step for step, _ in logged] == [1, 2]
    assert all(5.0 < loss < 12.0 for _, loss in logged), logged


def test_bad_sft_config_is_refused_while_the_trainer_is_built(tmp_path):
    from ratplus_titan.train import RATPlusTrainer
    from tests.torchtitan_cpu import trainer_session
    from tests.trainer_utils import register_test_flavor

    register_test_flavor()
    data = tmp_path / "records.jsonl"
    _write(data, [{"prompt": "word " * 70, "answer": " x"}])
    with pytest.raises(ValueError, match=r"records.jsonl:1: the record has \d+ tokens .* more than training.seq_len \+ 1 = 65"):
        with trainer_session(RATPlusTrainer, sft_args(tmp_path / "a", 1, data, "--checkpoint.no-enable")):
            pass
    with pytest.raises(FileNotFoundError, match="training.dataset_path = .* names no \\['.jsonl', '.jsonl.gz', '.jsonl.xz'\\] files"):
        with trainer_session(RATPlusTrainer, sft_args(tmp_path / "b", 1, tmp_path / "*.txt", "--checkpoint.no-enable")):
            pass


@pytest.mark.slow
def test_run_train_sh_fine_tunes_on_niah_records_and_resumes(tokenizer, tmp_path):
    """The user path: niah_splits records at 256 tokens from the bundled corpus -> run_train.sh with
    train_configs/sft_example.toml (CPU: one gloo process) on the debug model, 2 steps, then resumed to 3."""
    import math
    import os
    import re
    import subprocess
    import sys

    from ratplus_titan.data.dataset import BUNDLED_CORPUS
    from ratplus_titan.eval.niah_splits import make_splits
    from tests.trainer_utils import REPO

    splits = make_splits(tokenizer, BUNDLED_CORPUS["train"], BUNDLED_CORPUS["validation"], 256, n_train=4, n_eval=1,
                         out_dir=tmp_path / "niah")  # fmt: skip
    env = {**os.environ, "PYTHON": sys.executable, "NGPU": "0", "CONFIG_FILE": "train_configs/sft_example.toml",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("RANK", None)
    overrides = ["--job.dump_folder", str(tmp_path / "out"), "--model.flavor", "debugmodel", "--training.seq_len", "256",
                 "--training.local_batch_size", "2", "--training.global_batch_size", "4",
                 "--training.dataset_path", str(splits["train"]), "--checkpoint.initial_load_path", "",
                 "--checkpoint.interval", "1", "--lr_scheduler.warmup_steps", "1", "--metrics.log_freq", "1",
                 "--metrics.no-enable-tensorboard"]  # fmt: skip

    def run(steps: int) -> str:
        proc = subprocess.run(["bash", str(REPO / "run_train.sh"), *overrides, "--training.steps", str(steps)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc.stdout + proc.stderr

    first = run(2)
    losses = [float(x) for x in re.findall(r"step:\s+\d+\s+loss:\s+([-\d.naif]+)", first)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), first[-3000:]
    assert "8 records" in first and "in shuffled order" in first
    again = run(3)
    assert re.search(r"step:\s+3\s+loss:", again) and not re.search(r"step:\s+[12]\s+loss:", again), again[-3000:]
    assert (tmp_path / "out" / "checkpoint" / "step-3").is_dir()
