"""scripts/adapt_chain.sh on the debug model: pretrain -> adapt (d4w8s2) -> export -> lm-eval -> table."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("lm_eval")


@pytest.mark.slow  # two torchtitan runs, two exports, one lm-eval run: ~1 min on a 2-core machine
def test_adaptation_chain_ends_with_a_metrics_table(tmp_path):
    out = tmp_path / "chain"
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        PRETRAIN_STEPS="4",
        ADAPT_STEPS="2",
        SEQ_LEN="64",
        BATCH="2",
        EVALS="adapted",
        LIMIT="6",
        EVAL_BATCH="6",
    )
    run = subprocess.run(
        ["bash", str(REPO / "scripts" / "adapt_chain.sh"), str(out)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    tail = run.stdout.strip().splitlines()[-8:]
    assert any(line.startswith("| model | pattern | mc acc | mc acc_norm | word ppl | bits/byte |") for line in tail), tail
    [row] = [line for line in tail if line.startswith("| adapted | d4w8s2 |")]
    values = [float(v) for v in row.strip("|").split("|")[2:]]
    assert 0 <= values[0] <= 1 and 0 <= values[1] <= 1 and values[2] > 1 and values[3] > 0

    # the adapted export records the target pattern (the pretrained one is not exported without its EVALS rows)
    assert json.loads((out / "export_adapted" / "config.json").read_text())["pattern"] == {
        "dilation": 4, "local_window": 8, "sinks": 2,
    }  # fmt: skip
    assert not (out / "export_pretrained").exists()
    # adaptation started from the pretrained weights, not from a fresh initialisation
    first = lambda log: float(re.search(r"step:\s+1\s+loss:\s+([0-9.]+)", (out / log).read_text())[1])  # noqa: E731
    assert first("adapt.log") < first("pretrain.log") - 0.5
    assert "loss_sparse" in (out / "pretrain.log").read_text() and "loss_sparse" not in (out / "adapt.log").read_text()
    assert json.loads((out / "metrics.json").read_text())[0]["model"] == "adapted"
