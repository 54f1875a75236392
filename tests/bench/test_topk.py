"""``bench/topk.py``: the toy-size smoke run writes every phase's numbers (on the GPU when there is one,
else on the CPU in Triton's interpreter: ``tests/device.py``)."""

from __future__ import annotations

import json
import math

from bench import common
from bench import topk as bench_topk


def test_tiny_run_checks_and_times_every_phase(tmp_path, device):
    argv = ["--tiny", "--scores", "ratplus", "--inputs", "smooth8", "--budget", "600", "--out", str(tmp_path)]
    assert bench_topk.main(argv) == 0  # it runs on the GPU when there is one, as the device fixture does
    data = json.loads((tmp_path / f"topk_{common.device_slug(device.type)}_tiny.json").read_text())
    assert set(data["check"]) == {"quest", "moba", "ratplus", "decode"}
    assert all(row["rows_with_other_picks"] == 0 for name, row in data["check"].items() if name != "decode")
    (decode,) = data["decode"]
    assert decode["rows_read"] == 2 + (decode["top_k"] + 1) * 4 and decode["ratplus_ms"] > 0
    (prefill,) = data["prefill"]
    assert "error" not in prefill, prefill
    for key in ("select_ms", "fwd_ms", "fwd_bwd_ms", "sdpa_fwd_ms", "visit_ratio"):
        assert math.isfinite(prefill[key]) and prefill[key] > 0, key
    assert prefill["visit_ratio"] >= 1.0  # a tile computes at least what its queries attend
