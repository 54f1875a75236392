"""``bench/topk.py``: the toy-size smoke run writes every phase's numbers (on the GPU when there is one,
else on the CPU in Triton's interpreter: ``tests/device.py``)."""

from __future__ import annotations

import json
import math
import time

import pytest

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
    assert "select" not in data  # the select sweep runs only when asked for


def test_tiny_select_sweep_matches_the_default_bitwise(tmp_path, device):
    """``--phases select``: the default launch, then the tiny grid (scores per program 512, 16384 x warps 1, 2);
    every setting's outputs bitwise the default's; settings with the default's launch repeat its numbers."""
    argv = ["--tiny", "--phases", "select", "--scores", "ratplus", "--budget", "600", "--out", str(tmp_path)]
    assert bench_topk.main(argv) == 0
    data = json.loads((tmp_path / f"topk_{common.device_slug(device.type)}_tiny.json").read_text())
    assert set(data) >= {"select", "elapsed_s"} and not {"check", "decode", "prefill"} & set(data)
    rows = data["select"]
    assert [r["setting"] for r in rows] == ["default", "512/1", "512/2", "16384/1", "16384/2"]
    by_label = {r["setting"]: r for r in rows}
    launch = ("list_m", "sel_m", "num_warps", "ms")
    for row in rows:
        assert "error" not in row and row["equal"] is True, row
        assert row["seq_len"] == 96 and math.isfinite(row["ms"]) and row["ms"] > 0, row
        if row["same_launch_as"]:
            assert [row[n] for n in launch] == [by_label[row["same_launch_as"]][n] for n in launch], row
    assert rows[0]["vs_default"] == 1.0 and rows[0]["same_launch_as"] is None
    if device.type == "cpu":  # rows of 16 queries at most (list_m 16): 512 and 16384 scores, one launch
        assert rows[3]["same_launch_as"] == "default" and rows[4]["same_launch_as"] == "512/2"


def test_select_sweep_records_a_failing_setting_and_goes_on(device):
    """A setting ``select_prefill`` refuses (3 warps) is a row with its error; the sweep goes on to the next, here
    with chunks of 32 queries (``list_m``), 32 at a time: other kernels than the default's, the same outputs."""
    clock = bench_topk.Clock(device.type, time.time(), 600)
    rows = bench_topk.bench_select(bench_topk.TINY, device.type, clock, ("moba",), (16384,), (3, 2), list_m=(32,))
    assert [r["setting"] for r in rows] == ["default", "16384/3/32", "16384/2/32"]
    assert "num_warps=3" in rows[1]["error"] and "ms" not in rows[1]
    assert (rows[2]["list_m"], rows[2]["sel_m"]) == (32, 32) and rows[0]["list_m"] != 32
    assert rows[2]["equal"] is True and "error" not in rows[2]
    assert bench_topk.tat.CONFIG_OVERRIDE == {} and bench_topk.tsel.SELECT_OVERRIDE == {}


def test_parallel_compile_reports_each_launch(device):
    """``precompile_select`` (the select phase's compiles, in spawned processes): a launch that runs is compiled,
    one that fails comes back with its error, one past the time allowed is stopped, one not started says so."""
    tasks = {(96, (16, 16, 1, "radix")): {}, (96, (16, 16, 3, "radix")): {"num_warps": 3}}
    out = bench_topk.precompile_select(bench_topk.TINY, device.type, 2, tasks, "moba", 300)
    assert out[96, (16, 16, 1, "radix")] is None and "num_warps=3" in out[96, (16, 16, 3, "radix")], out
    out = bench_topk.precompile_select(bench_topk.TINY, device.type, 1, tasks, "moba", 0.5)
    assert "ran past" in out[96, (16, 16, 1, "radix")] and "not started" in out[96, (16, 16, 3, "radix")], out


def test_work_ratio_counts_padded_tiles_and_local_blocks():
    """Hand count: T=8, blocks of 2, top_k 1, 1 sink, tiles of 4; one (batch, head) whose queries 2-7 pick
    block 0 and the rest (none) nothing. Attended: own block for 8 queries + 6 picks = 14. Computed: block 0's
    6 pickers in 2 tiles of 4 = 8; local: tile 0 (queries 0-3) own blocks 0, 1 = 2 blocks; tile 1 (4-7) the
    sink block 0 and own blocks 2, 3 = 3 blocks; (2 + 3) * 4 = 20. Ratio 28 / 14 = 2."""
    import torch

    from ratplus_titan.topk import TopKPattern

    starts = torch.tensor([[0, 6, 6, 6, 6]])
    assert bench_topk.work_ratio(8, TopKPattern(2, 1, "moba", 1), starts, 4) == 2.0


def test_select_sweep_times_both_top_k_algorithms(tmp_path, device):
    """``--select-top-k radix,sorted``: each setting with each top-k algorithm (``SELECT_OVERRIDE["top_k"]``), side
    by side, the sorted one's outputs bitwise the default's (radix); an unknown algorithm is refused by the CLI."""
    argv = ["--tiny", "--phases", "select", "--scores", "quest", "--select-scores", "16384", "--select-warps", "1",
            "--select-top-k", "radix,sorted", "--budget", "600", "--out", str(tmp_path)]
    assert bench_topk.main(argv) == 0
    rows = json.loads((tmp_path / f"topk_{common.device_slug(device.type)}_tiny.json").read_text())["select"]
    assert [r["setting"] for r in rows] == ["default", "16384/1/radix", "16384/1/sorted"]
    assert [r["top_k_algorithm"] for r in rows] == ["radix", "radix", "sorted"]
    for row in rows:
        assert "error" not in row and row["equal"] is True and row["ms"] > 0, row
    assert rows[2]["same_launch_as"] is None  # its own kernels, timed
    if device.type == "cpu":  # the default's launch on the CPU: 1 warp, 16 rows at a time
        assert rows[1]["same_launch_as"] == "default"
    with pytest.raises(SystemExit):
        bench_topk.main(["--tiny", "--phases", "select", "--select-top-k", "bitonic", "--out", str(tmp_path)])
