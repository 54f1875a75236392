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
    result = json.loads((tmp_path / "induction_cpu_t.json").read_text())
    assert set(result["models"]) == {"ratplus", "attention"}
    assert result["guess_nats"] == pytest.approx(math.log(40 - FIRST_ID))
    for run in result["models"].values():
        assert [p["step"] for p in run["curve"]] == [3, 6]
        # six steps of a fresh model on random ids: nothing is copied yet, both halves are guessed
        for point in run["curve"]:
            assert point["guess"] == pytest.approx(result["guess_nats"], abs=0.3)
            assert point["repeats"] > 0.5 * point["guess"]
        assert run["copies_at"] is None


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
