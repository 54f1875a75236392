import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench import induction
from ratplus_titan.eval.repeated_tokens import FIRST_ID
from ratplus_titan.model.args import RATPlusModelArgs
from ratplus_titan.model.model import RATPlusModel
from ratplus_titan.pattern import DENSE, Pattern


def test_copies_at_is_the_first_step_at_half_the_guessing_loss():
    curve = [{"step": 10, "guess": 5.0, "repeats": 4.9}, {"step": 20, "guess": 5.0, "repeats": 2.6},
             {"step": 30, "guess": 5.2, "repeats": 2.6}, {"step": 40, "guess": 5.0, "repeats": 0.1}]  # fmt: skip
    assert induction.copies_at(curve) == 30
    assert induction.copies_at(curve[:2]) is None


def test_training_windows_hold_the_share_of_periodic_rows():
    rng = np.random.default_rng(0)
    windows = induction.training_windows(200, 64, 50, 0.25, 17, rng)
    assert windows.shape == (200, 65) and windows.dtype == torch.int64
    assert int(windows.min()) >= FIRST_ID and int(windows.max()) < 50

    def period(row):
        return next((d for d in range(17, 33) if all(row[i] == row[i - d] for i in range(d, 65))), None)

    periodic = [period(row.tolist()) for row in windows]
    # random rows over 47 ids are periodic by chance with probability ~47^-32: the count is the share
    assert sum(p is not None for p in periodic) == 50


def test_recall_losses_split_the_targets_at_the_distance():
    torch.manual_seed(0)
    model = RATPlusModel(RATPlusModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=40, max_seq_len=16))
    model.init_weights()
    windows = torch.randint(FIRST_ID, 40, (3, 17))
    guess, repeats = induction.recall_losses(model, windows, distance=6)
    # independently, in float64: targets 0..5 (tokens 1..6) are guessing, token 6 included: it repeats
    # token 0, but its predecessor (token 5) has no earlier occurrence, so no copying circuit can predict it
    logits = model(windows[:, :-1]).double()
    nll = F.cross_entropy(logits.reshape(-1, 40), windows[:, 1:].reshape(-1), reduction="none").view(3, 16)
    assert guess == pytest.approx(nll[:, :6].mean().item(), rel=1e-5)
    assert repeats == pytest.approx(nll[:, 6:].mean().item(), rel=1e-5)


def test_a_short_run_writes_the_curve(tmp_path):
    code = induction.main(["--steps", "6", "--eval-every", "3", "--dim", "32", "--heads", "2", "--layers", "1",
                           "--seq-len", "32", "--vocab", "40", "--batch", "4", "--eval-windows", "4",
                           "--out", str(tmp_path), "--tag", "_t"])  # fmt: skip
    assert code == 0
    (path,) = tmp_path.glob("induction_*_t.json")  # induction_<device>_t.json: cpu, or the GPU's name
    result = json.loads(path.read_text())
    assert set(result["models"]) == {"ratplus", "attention"}
    assert result["guess_nats"] == pytest.approx(math.log(40 - FIRST_ID))
    for run in result["models"].values():
        assert [p["step"] for p in run["curve"]] == [3, 6]
        # six steps of a fresh model on random ids: nothing is copied yet, both halves are guessed
        for point in run["curve"]:
            assert point["guess"] == pytest.approx(result["guess_nats"], abs=0.3)
            assert point["repeats"] > 0.5 * point["guess"]
        assert run["copies_at"] is None


def test_recall_losses_under_a_pattern_use_that_pattern():
    torch.manual_seed(1)
    model = RATPlusModel(RATPlusModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=40, max_seq_len=16))
    model.init_weights()
    windows = torch.randint(FIRST_ID, 40, (3, 17))
    pattern = Pattern.parse("d4w2s1")
    guess, repeats = induction.recall_losses(model, windows, distance=6, pattern=pattern)
    logits = model(windows[:, :-1], pattern).double()
    nll = F.cross_entropy(logits.reshape(-1, 40), windows[:, 1:].reshape(-1), reduction="none").view(3, 16)
    assert guess == pytest.approx(nll[:, :6].mean().item(), rel=1e-5)
    assert repeats == pytest.approx(nll[:, 6:].mean().item(), rel=1e-5)
    # and it differs from dense: the pattern really is applied
    assert repeats != pytest.approx(induction.recall_losses(model, windows, distance=6)[1], rel=1e-4)


def test_joint_training_steps_sparse_then_dense_and_evaluates_each_pattern(tmp_path, monkeypatch):
    trained_under = []  # the pattern of every forward with gradients (training), in order
    forward = RATPlusModel.forward

    def spy(self, tokens, pattern=None):
        if torch.is_grad_enabled():
            trained_under.append(pattern)
        return forward(self, tokens, pattern)

    monkeypatch.setattr(RATPlusModel, "forward", spy)
    code = induction.main(["--models", "ratplus", "--steps", "3", "--eval-every", "3", "--dim", "32", "--heads", "2",
                           "--layers", "1", "--seq-len", "32", "--vocab", "40", "--batch", "2", "--eval-windows", "2",
                           "--joint-dilation", "4", "--eval-patterns", "d-1w4s1,d4w4s1", "--adapt-steps", "2",
                           "--out", str(tmp_path), "--tag", "_j"])  # fmt: skip
    assert code == 0
    # joint training, then each adaptation under its pattern alone
    assert trained_under == [Pattern(4), DENSE] * 3 + [Pattern.parse("d-1w4s1")] * 2 + [Pattern.parse("d4w4s1")] * 2
    (path,) = tmp_path.glob("induction_*_j.json")
    run = json.loads(path.read_text())["models"]["ratplus"]
    (point,) = run["curve"]
    assert list(point["patterns"]) == ["d-1w4s1", "d4w4s1"]
    assert all(math.isfinite(value) for value in point["patterns"].values())
    adapted = run["adapted"]
    assert list(adapted) == ["d-1w4s1", "d4w4s1"] and all(set(a) == {"guess", "repeats"} for a in adapted.values())


def test_adaptation_trains_a_copy():
    """Each pattern's adaptation starts from the trained model: ``adapt`` leaves it unchanged."""
    args = induction.build_parser().parse_args(["--seq-len", "16", "--vocab", "40", "--batch", "2", "--adapt-steps", "2"])
    args.min_distance = 5
    torch.manual_seed(0)
    model = RATPlusModel(RATPlusModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=40, max_seq_len=16))
    model.init_weights()
    before = [p.detach().clone() for p in model.parameters()]
    windows = torch.randint(FIRST_ID, 40, (2, 17))
    found = induction.adapt(model, args, Pattern.parse("d4w2s1"), windows, 8, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # and the copy did change: its recall differs from the unadapted model's under the same pattern
    assert found["repeats"] != pytest.approx(induction.recall_losses(model, windows, 8, Pattern.parse("d4w2s1"))[1], rel=1e-4)


@pytest.mark.parametrize("flags,message", [
    (["--min-distance", "40", "--seq-len", "64"], "--min-distance 40 must be at most half the window, 32"),
    (["--dim", "30", "--heads", "4"], "--dim 30 must split into --heads 4"),
    (["--models", "mamba"], "mamba"),
])  # fmt: skip
def test_bad_flags_are_one_line_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        induction.main(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
