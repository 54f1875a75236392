"""``bench/train_throughput.py``: the memory-snapshot replay, the child entry point, step averaging."""

from __future__ import annotations

import json
import random
import sys
import time

import torch

from bench import train_throughput as bench_train


def _frames(name: str) -> list[dict]:
    """Innermost first, as the allocator records them: generated code, torch, our model."""
    return [
        {"filename": "/tmp/torchinductor_x/ab/cab.py", "line": 7, "name": name},
        {"filename": "/usr/lib/python3/dist-packages/torch/_dynamo/eval_frame.py", "line": 1, "name": "_fn"},
        {"filename": "/repo/ratplus_titan/model/model.py", "line": 3, "name": "hidden_states"},
    ]


def random_history(seed: int, before: int = 5, events: int = 300):
    """A random allocator history: ``before`` blocks live when recording starts, then alloc/free events.

    Returns the snapshot (live blocks at the end, recorded events) and, from a forward replay, the
    peak live total over the recorded window and the blocks live at the first time it is reached.
    """
    rng = random.Random(seed)
    live: dict[int, tuple[int, list]] = {}
    next_addr = 0

    def new_addr() -> int:
        nonlocal next_addr
        next_addr += 4096
        return next_addr

    for _ in range(before):
        live[new_addr()] = (rng.choice([512, 2048, 8192]), [])
    trace = []
    peak, at_peak = sum(s for s, _ in live.values()), dict(live)
    for _ in range(events):
        if live and rng.random() < 0.45:
            addr = rng.choice(sorted(live))
            size, frames = live.pop(addr)
            trace.append({"action": "free_requested", "addr": addr, "size": size, "frames": frames})
            trace.append({"action": "free_completed", "addr": addr, "size": size, "frames": frames})
        else:
            addr, size = new_addr(), rng.choice([512, 1024, 4096, 65536])
            frames = _frames(f"site{size}")
            live[addr] = (size, frames)
            trace.append({"action": "alloc", "addr": addr, "size": size, "frames": frames})
            trace.append({"action": "segment_map", "addr": addr, "size": size})  # ignored
        total = sum(s for s, _ in live.values())
        if total > peak:
            peak, at_peak = total, dict(live)
    blocks = [{"address": a, "size": s, "state": "active_allocated", "frames": f} for a, (s, f) in live.items()]
    blocks.append({"address": 1, "size": 999, "state": "inactive"})  # cached, not allocated
    snapshot = {"segments": [{"device": 0, "blocks": blocks}], "device_traces": [trace]}
    return snapshot, peak, at_peak


def test_peak_summary_matches_a_forward_replay():
    for seed in range(20):
        snapshot, peak, at_peak = random_history(seed)
        summary = bench_train.peak_summary(snapshot, top=1000)
        assert summary["peak_allocated_bytes"] == peak, seed
        assert summary["live_blocks_at_peak"] == len(at_peak)
        expected: dict[tuple[int, str], int] = {}
        for size, frames in at_peak.values():
            key = (size, bench_train.allocation_site(frames))
            expected[key] = expected.get(key, 0) + 1
        assert {(g["size_bytes"], g["site"]): g["count"] for g in summary["groups"]} == expected
        totals = [g["total_bytes"] for g in summary["groups"]]
        assert totals == sorted(totals, reverse=True) and summary["other_bytes"] == 0


def test_allocation_site_names_generated_code_and_our_caller():
    assert bench_train.allocation_site(_frames("call")) == "ab/cab.py:7:call <- model/model.py:3:hidden_states"
    assert bench_train.allocation_site([]) == "allocated before recording"


def test_in_rows_divides_by_one_bf16_row():
    summary = {"groups": [{"size_bytes": 3 * 8 * 4096 * 2048 * 2}]}
    assert bench_train.in_rows(summary, 8 * 4096 * 2048 * 2)["groups"][0]["rows"] == 3.0


def test_child_runs_the_module_and_records_from_the_given_optimizer_step(tmp_path, monkeypatch):
    """``--child MODULE SUMMARY START ARGS``: MODULE runs as ``__main__`` with ARGS; recording starts after
    optimizer step START; at exit the summary of the snapshot (CUDA faked here) is written."""
    (tmp_path / "fake_entry.py").write_text(
        "import json, sys, time, torch\n"
        "class Container(torch.optim.Optimizer):  # as torchtitan's OptimizersContainer: steps its optimizer inside\n"
        "    def __init__(self, inner):\n"
        "        self.inner = inner\n"
        "        torch.optim.Optimizer.__init__(self, inner.param_groups[0]['params'], {})\n"
        "    def step(self):\n"
        "        self.inner.step()\n"
        "if __name__ == '__main__':\n"
        "    param = torch.nn.Parameter(torch.ones(2))\n"
        "    optimizer = Container(torch.optim.SGD([param], lr=0.1))\n"
        "    stepped = []\n"
        "    for _ in range(5):\n"
        "        param.grad = torch.ones(2)\n"
        "        optimizer.step()\n"
        "        stepped.append(time.perf_counter_ns())\n"
        f"    json.dump({{'argv': sys.argv[1:], 'stepped': stepped}}, open({str(tmp_path / 'entry.json')!r}, 'w'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    started = []
    snapshot, _, _ = random_history(0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 123)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 456)
    monkeypatch.setattr(
        torch.cuda.memory, "_record_memory_history", lambda **kw: started.append(time.perf_counter_ns())
    )
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda: snapshot)
    summary = tmp_path / "summary.json"
    bench_train.main(
        ["--child", "fake_entry", str(summary), "3", "--job.config_file", "x.toml", "--training.steps", "5"]
    )
    entry = json.loads((tmp_path / "entry.json").read_text())
    assert entry["argv"] == ["--job.config_file", "x.toml", "--training.steps", "5"]
    assert len(started) == 1 and entry["stepped"][1] < started[0] < entry["stepped"][2]  # inside the 3rd step
    expected = bench_train.peak_summary(snapshot) | {
        "max_memory_allocated_bytes": 123,
        "max_memory_reserved_bytes": 456,
    }
    assert json.loads(summary.read_text()) == expected


def test_recorded_steps_are_left_out_of_the_averages():
    steps = [
        {"step": i, "loss": 1.0, "memory_gib": 10.0 + i, "tps": 100.0 * i, "tflops": 1.0, "mfu": 1.0}
        for i in range(1, 11)
    ]
    result = bench_train.summarize({"steps": steps, "snapshot_steps": 2}, skip=5)
    assert result["summary"]["steps_averaged"] == 3  # steps 6, 7, 8
    assert result["summary"]["tokens_per_s_per_gpu"] == 700.0
    assert result["summary"]["peak_memory_gib"] == 18.0
    plain = bench_train.summarize({"steps": steps}, skip=5)
    assert plain["summary"]["steps_averaged"] == 5


def test_ratplus_variants_parse_and_the_recompute_ones_set_the_option():
    """Every RAT+ variant's flags are a job config the trainer takes (1B config); the ``*_fc1_recompute``
    variants turn ``[ratplus] recompute`` on, the others leave it off."""
    from ratplus_titan.infra.entry import parse_job_config

    config_file = str(bench_train.REPO / "train_configs" / "ratplus_1b.toml")
    for name, (module, args) in bench_train.VARIANTS.items():
        if module != "ratplus_titan.train":
            continue
        config = parse_job_config(["--job.config_file", config_file, *args], warn=False)
        assert config.ratplus.recompute == ("fc1" if name.endswith("_fc1_recompute") else "none"), name
        assert config.ratplus.joint_train == ("_joint" in name), name
