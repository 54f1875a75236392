"""``bench/common.py`` on the CPU: environment record, slug, timing, JSON output."""

from __future__ import annotations

import json
import time

from bench import common


def test_environment_and_slug_on_the_cpu():
    env = common.environment("cpu")
    assert set(env) == {"device", "torch", "triton", "cuda", "sms", "date"}
    assert env["device"] == "cpu" and env["sms"] == 0 and env["date"].endswith("+00:00")
    assert common.device_slug("cpu") == "cpu"


def test_cpu_do_bench_is_the_median_of_five_timed_calls_after_one_warm_up():
    delays = iter([0.0, 0.002, 0.2, 0.002, 0.2, 0.002])  # warm-up, then five timed calls
    calls = []

    def fn():
        calls.append(1)
        time.sleep(next(delays))

    ms = common.do_bench(fn, device="cpu")
    assert len(calls) == 6
    assert 2.0 <= ms < 50  # the median of 2, 200, 2, 200, 2 ms is 2 (the mean would be 81); noise only adds


def test_write_json_creates_folders_and_leaves_no_temporary_file(tmp_path):
    path = common.write_json(tmp_path / "a" / "b.json", {"x": [1, 2], "when": common.environment("cpu")["date"]})
    assert json.loads(path.read_text())["x"] == [1, 2]
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]
