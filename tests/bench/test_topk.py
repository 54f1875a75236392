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
    for key in ("select_ms", "fwd_ms", "fwd_bwd_ms", "sdpa_fwd_ms", "work_ratio", "select_share"):
        assert math.isfinite(prefill[key]) and prefill[key] > 0, key
    assert prefill["work_ratio"] >= 1.0  # the kernels compute at least what the queries attend


def test_work_ratio_counts_padded_tiles_and_local_blocks():
    """Hand count: T=8, blocks of 2, top_k 1, 1 sink, tiles of 4; one (batch, head) whose queries 2-7 pick
    block 0 and the rest (none) nothing. Attended: own block for 8 queries + 6 picks = 14. Computed: block 0's
    6 pickers in 2 tiles of 4 = 8; local: tile 0 (queries 0-3) own blocks 0, 1 = 2 blocks; tile 1 (4-7) the
    sink block 0 and own blocks 2, 3 = 3 blocks; (2 + 3) * 4 = 20. Ratio 28 / 14 = 2."""
    import torch

    from ratplus_titan.topk import TopKPattern

    starts = torch.tensor([[0, 6, 6, 6, 6]])
    assert bench_topk.work_ratio(8, TopKPattern(2, 1, "moba", 1), starts, 4) == 2.0
