"""ratplus-perplexity: held-out loss by pattern and position bucket, against a float64 step-by-step reference."""

import json
import math

import numpy as np
import pytest
import torch

from ratplus_titan.adapters.layout import save_export
from ratplus_titan.eval.perplexity import bucket_edges, evaluate, main, read_windows
from ratplus_titan.model.args import RATPlusModelArgs
from ratplus_titan.model.model import RATPlusModel
from ratplus_titan.pattern import Pattern

VOCAB, SEQ_LEN = 61, 40


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    torch.manual_seed(0)
    args = RATPlusModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=VOCAB, max_seq_len=SEQ_LEN)
    model = RATPlusModel(args)
    model.init_weights()
    for p in model.parameters():  # larger weights than init: the patterns must change the logits visibly
        p.data.mul_(8.0)
    folder = tmp_path_factory.mktemp("export")
    save_export(folder, model.state_dict(), args, dtype="float32", tokenizer_path=None)
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=7 * (SEQ_LEN + 1) + 5, dtype=np.uint16)
    data = folder / "validation.bin"
    tokens.tofile(data)
    return folder, data, tokens, args, model.state_dict()


def reference_rows(args, state_dict, windows, spec: str, edges=(8, 24)) -> tuple[float, dict]:
    """float64 model with the explicit-mask attention; loss = logsumexp - target logit, summed in loops."""
    ref_args = RATPlusModelArgs(**{**{k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len")},
                                   "attention_backend": "reference"})  # fmt: skip
    model = RATPlusModel(ref_args).double()
    model.load_state_dict({k: v.double() for k, v in state_dict.items()})
    model.set_patterns([Pattern.parse(spec) if spec != "dense" else Pattern()] * args.n_layers)
    per_position = [0.0] * SEQ_LEN
    with torch.no_grad():
        for window in windows:
            logits = model(window[None, :-1])[0]  # [T, V] float64
            for t in range(SEQ_LEN):
                per_position[t] += float(torch.logsumexp(logits[t], 0) - logits[t, window[t + 1]])
    n = len(windows)
    cuts = [0, *edges, SEQ_LEN]
    buckets = {f"{a}-{b}": sum(per_position[a:b]) / (n * (b - a)) for a, b in zip(cuts[:-1], cuts[1:])}
    return sum(per_position) / (n * SEQ_LEN), buckets


def test_windows_are_the_bin_files_first_windows(model_and_data):
    _, data, tokens, _, _ = model_and_data
    windows = read_windows(data, SEQ_LEN, 3)
    assert windows.shape == (3, SEQ_LEN + 1)
    assert np.array_equal(windows.numpy(), tokens[: 3 * (SEQ_LEN + 1)].reshape(3, SEQ_LEN + 1))
    assert read_windows(data, SEQ_LEN, 0).shape[0] == 7  # 0 = all whole windows; the 5 left over are not one


def test_seeded_windows_are_whole_windows_of_the_file_drawn_by_the_seed(model_and_data):
    _, data, tokens, _, _ = model_and_data
    whole = tokens[: 7 * (SEQ_LEN + 1)].reshape(7, SEQ_LEN + 1)
    drawn = read_windows(data, SEQ_LEN, 3, seed=4)
    rows = [next(k for k in range(7) if np.array_equal(whole[k], w)) for w in drawn.numpy()]
    assert rows == sorted(set(rows))  # three distinct windows, in file order
    assert torch.equal(drawn, read_windows(data, SEQ_LEN, 3, seed=4))
    assert any(not torch.equal(drawn, read_windows(data, SEQ_LEN, 3, seed=s)) for s in range(5, 10))
    assert torch.equal(read_windows(data, SEQ_LEN, 0, seed=4), read_windows(data, SEQ_LEN, 0))  # all: file order


def test_bucket_edges_cover_every_position_once():
    for seq_len in (5, 256, 300, 2048):
        cuts = bucket_edges(seq_len)
        assert cuts[0][0] == 0 and cuts[-1][1] == seq_len
        assert all(a < b for a, b in cuts) and all(b == c for (_, b), (c, _) in zip(cuts[:-1], cuts[1:]))


@pytest.mark.parametrize("spec", ["dense", "d4w6s1", "d-1w3s0"])
def test_loss_matches_the_float64_reference(model_and_data, spec):
    folder, data, _, args, state_dict = model_and_data
    (row,) = evaluate(folder, data, [spec], SEQ_LEN, windows=5, batch_size=2, dtype="float32", device="cpu", quiet=True,
                      edges=(8, 24))  # fmt: skip
    loss, buckets = reference_rows(args, state_dict, read_windows(data, SEQ_LEN, 5), spec)
    assert row["tokens"] == 5 * SEQ_LEN
    assert row["loss"] == pytest.approx(loss, rel=1e-5)
    assert row["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert row["by_position"].keys() == buckets.keys()
    for key, value in buckets.items():
        assert row["by_position"][key] == pytest.approx(value, rel=1e-5), key
    assert row["kv_rows"] == (SEQ_LEN if spec == "dense" else Pattern.parse(spec).cache_rows(SEQ_LEN))


def test_patterns_give_different_losses(model_and_data):
    """The pattern really reaches the model (a test that would pass with the pattern ignored proves nothing)."""
    folder, data, *_ = model_and_data
    rows = evaluate(folder, data, ["dense", "d-1w1s0"], SEQ_LEN, windows=3, batch_size=3, dtype="float32", device="cpu", quiet=True)
    assert abs(rows[0]["loss"] - rows[1]["loss"]) > 1e-3


def test_cli_writes_json_and_rejects_bad_arguments(model_and_data, tmp_path, capsys):
    folder, data, *_ = model_and_data
    out = tmp_path / "rows.json"
    argv = [str(folder), str(data), "--pattern", "dense", "--pattern", "d4w6s1", "--seq-len", str(SEQ_LEN),
            "--windows", "2", "--device", "cpu", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert [r["pattern"] for r in json.loads(out.read_text())] == ["dense", "d4w6s1"]
    capsys.readouterr()  # the rows and the progress bars
    missing = tmp_path / "no_such_model"
    cases = [([str(folder), str(data), "--seq-len", "0"], "--seq-len"), ([str(folder), str(data), "--pattern", "d0w1s1"], "d0w1s1"),
             ([str(folder), str(data), "--windows", "-1"], "--windows"), ([str(missing), str(data)], str(missing)),
             ([str(folder), str(tmp_path / "none.bin")], "none.bin"),
             ([str(folder), str(tmp_path / "odd.bin")], "odd.bin has 83 bytes, not a whole number of uint16 token ids"),
             ([str(folder), str(tmp_path / "late.bin"), "--seq-len", str(SEQ_LEN), "--windows", "2"], f"late.bin holds token id {VOCAB} (token 100), outside the vocabulary of {VOCAB}")]  # fmt: skip
    (tmp_path / "odd.bin").write_bytes(b"\1" * 83)
    late = np.fromfile(data, dtype=np.uint16)
    late[100] = VOCAB  # past the 2 windows of 41 tokens read: the whole file is checked
    late.tofile(tmp_path / "late.bin")
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
