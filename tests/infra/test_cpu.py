"""ratplus_titan/infra/cpu.py: torchtitan 0.2.2's stock Trainer (llama3 debug model) and ours on CPU/gloo."""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ratplus_titan.infra import cpu
from tests import torchtitan_cpu as ttcpu
from tests.trainer_utils import register_test_flavor, trainer_args

REPO_ROOT = Path(__file__).resolve().parents[2]
# torchtitan's step line; a numeric MFU there would come from a made-up CPU peak.
NUMERIC_MFU = re.compile(r"mfu:\s*[-+\d.]+")

pytestmark = pytest.mark.skipif(not ttcpu.SHARED_CORPUS.exists(), reason="shared corpus not available")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return ttcpu.debug_assets(tmp_path_factory.mktemp("ttcpu_assets"), max_docs=100)


def _assert_finite_and_falling(losses: list[float]) -> None:
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0] - 0.2, losses
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses


def test_patch_is_idempotent_and_covers_loaded_modules():
    cpu.patch_torchtitan_for_cpu()
    cpu.patch_torchtitan_for_cpu()
    import torchtitan.tools.utils as tt_utils
    import torchtitan.train as tt_train

    assert tt_utils.device_type == "cpu"
    assert tt_utils.get_device_info()[0] == "cpu"
    assert math.isnan(tt_utils.get_peak_flops("anything"))  # no peak known: no MFU
    for name, mod in list(sys.modules.items()):
        if name.startswith("torchtitan") and isinstance(getattr(mod, "device_type", None), str):
            assert mod.device_type == "cpu", name
        if name.startswith("torchtitan") and hasattr(mod, "device_module"):
            assert not getattr(mod.device_module, "__name__", "").startswith("torch.cuda"), name
    tt_train.time.sleep(10)  # the final `time.sleep(2)` of Trainer.train is a no-op
    stats = cpu.CpuDeviceModule.memory_stats()
    assert stats["reserved_bytes.all.peak"] > 0


def test_stock_trainer_trains_llama3_debug_on_cpu(assets, tmp_path):
    from torchtitan.train import Trainer

    args = ttcpu.llama3_debug_args(assets, tmp_path / "out", steps=6, seq_len=128, batch_size=4)
    with ttcpu.trainer_session(Trainer, args, num_threads=1) as trainer:
        assert trainer.device.type == "cpu"
        assert torch.distributed.get_backend() == "gloo"
        assert not trainer.parallel_dims.fsdp_enabled
        trainer.train()
    assert trainer.step == 6
    assert [s for s, _, _ in trainer.loss_history] == list(range(1, 7))
    _assert_finite_and_falling([loss for _, loss, _ in trainer.loss_history])
    assert not torch.distributed.is_initialized()


def test_trainer_subclass_and_checkpoint_resume(assets, tmp_path):
    from torchtitan.train import Trainer

    class CountingTrainer(Trainer):
        calls = 0

        def train_step(self, data_iterator):
            type(self).calls += 1
            return super().train_step(data_iterator)

    extra = ["--checkpoint.enable", "--checkpoint.interval", "2"]
    args = ttcpu.llama3_debug_args(assets, tmp_path / "out", steps=4, seq_len=64, batch_size=2, extra=extra)
    with ttcpu.trainer_session(CountingTrainer, args, num_threads=1) as first:
        first.train()
    assert CountingTrainer.calls == 4
    assert sorted(os.listdir(tmp_path / "out" / "checkpoint")) == ["step-2", "step-4"]

    # Resume from step 2: steps 3 and 4 replay exactly (model, optimizer, data position).
    import shutil

    shutil.rmtree(tmp_path / "out" / "checkpoint" / "step-4")
    with ttcpu.trainer_session(CountingTrainer, args, num_threads=1) as second:
        second.train()
    assert [s for s, _, _ in second.loss_history] == [3, 4]
    resumed = [x for row in second.loss_history for x in row]
    assert resumed == pytest.approx([x for row in first.loss_history[2:] for x in row], rel=1e-5)


@pytest.mark.slow
def test_fsdp2_two_process_gloo_matches_single_process(assets, tmp_path):
    """FSDP2 over gloo (2 ranks, each reading the single-process batches, same seed
    checkpoint) reproduces the single-process run: checks the shim's SUM-reduce-scatter
    replacement for gloo's missing PREMUL_SUM."""
    single = {**assets, "dataset": assets["dataset"]}
    replicated = {**assets, "dataset": ttcpu.replicate_corpus_for_ranks(assets["dataset"], tmp_path / "rep", 2)}

    def args(a, out, extra=()):
        return ttcpu.llama3_debug_args(a, tmp_path / out, steps=4, seq_len=64, batch_size=2, extra=list(extra))

    seed = ttcpu.create_seed_checkpoint(args(single, "seed"))
    load = ["--checkpoint.enable", "--checkpoint.initial_load_path", str(seed), "--checkpoint.interval", "1000"]
    with ttcpu.trainer_session(None, args(single, "one", load), num_threads=1) as one:
        one.train()

    results = ttcpu.spawn_gloo(ttcpu.train_and_report, None, args(replicated, "two", load), world_size=2, timeout=300)
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["world_size"] == 2 and r["fsdp"] and r["dtensor_params"], r
        assert r["steps"] == 4
    # The logged loss is the global (all-reduced) loss: identical on both ranks.
    assert results[0]["losses"] == results[1]["losses"]
    flat = [x for row in results[0]["losses"] for x in row]
    assert flat == pytest.approx([x for row in one.loss_history for x in row], rel=1e-3)


@pytest.mark.slow
def test_command_line_entry_point(assets, tmp_path):
    args = ttcpu.llama3_debug_args(assets, tmp_path / "out", steps=2, seq_len=64, batch_size=2, fast=False)
    cmd = [sys.executable, "-m", "ratplus_titan.infra.cpu", "--trainer", "torchtitan.train:Trainer", "--", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step:  2" in proc.stderr + proc.stdout
    step_lines = [line for line in (proc.stderr + proc.stdout).splitlines() if "step:  2" in line]
    assert all("mfu: n/a" in line and not NUMERIC_MFU.search(line) for line in step_lines), step_lines


def test_ratplus_trainer_step_log_has_no_numeric_mfu(tmp_path, caplog):
    """The CPU step line keeps loss, memory, tps and tflops (measured) and says ``mfu: n/a``."""
    from ratplus_titan.train import RATPlusTrainer

    register_test_flavor()
    caplog.set_level(logging.INFO)
    with ttcpu.trainer_session(RATPlusTrainer, trainer_args(tmp_path, 2), num_threads=1) as trainer:
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if "loss:" in r.getMessage() and "tps:" in r.getMessage()]
    assert len(lines) == 2, lines
    for line in lines:
        assert "mfu: n/a" in line and not NUMERIC_MFU.search(line), line
        assert re.search(r"tflops:\s*[\d.,]+", line), line
    assert any("computing MFU: n/a" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "message, expected",
    [
        ("step:  1  loss:  8.1  tps: 1,234  tflops: 0.05  mfu: nan%", "step:  1  loss:  8.1  tps: 1,234  tflops: 0.05  mfu: n/a"),
        ("step:  1  loss:  8.1  tps: 1,234  tflops: 279.03  mfu: 28.21%", None),  # a GPU line stays as it is
        ("step:  1  loss:      nan  grad_norm:     nan", None),
    ],
)
def test_mfu_filter_rewrites_only_the_unknown_peak(message, expected):
    record = logging.LogRecord("root", logging.INFO, __file__, 1, "%s", (message,), None)
    assert cpu.MfuNotAvailable().filter(record)
    assert record.getMessage() == (message if expected is None else expected)
