"""Test helpers for torchtitan 0.2.2's ``Trainer`` on CPU: assets, in-process runs, gloo ranks.

The CPU patch itself is product code: ``ratplus_titan/infra/cpu.py`` (notes:
``docs/torchtitan_cpu.md``). This module adds what the tests need around it: torchtitan's
llama3 debug model with a tiny tokenizer and corpus, a trainer built and torn down in this
process, several processes on gloo, seed checkpoints.

Use::

    from tests.torchtitan_cpu import debug_assets, llama3_debug_args, trainer_session

    assets = debug_assets(tmp_path)                      # tokenizer + tiny corpus
    args = llama3_debug_args(assets, tmp_path / "out", steps=5)
    with trainer_session(Trainer, args) as trainer:
        trainer.train()
    losses = trainer.loss_history                        # [(step, loss, grad_norm)]

Multi-process (gloo) runs: :func:`spawn_gloo`.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import json
import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ratplus_titan.infra.cpu import (
    CPU_FAST_ARGS,
    find_free_port,
    load_class,
    patch_torchtitan_for_cpu,
    single_process_env,
)
from tests import global_state

__all__ = [
    "LLAMA3_DEBUG_TOML",
    "build_debug_tokenizer",
    "create_seed_checkpoint",
    "debug_assets",
    "llama3_debug_args",
    "replicate_corpus_for_ranks",
    "run_trainer",
    "spawn_gloo",
    "train_and_report",
    "trainer_session",
    "write_debug_corpus",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
# The real-text corpus shipped with the package (a copy of shared/data/corpus; see ratplus_titan/assets/README.md).
SHARED_CORPUS = REPO_ROOT / "ratplus_titan" / "assets" / "corpus" / "en_pd_ccby.train.jsonl.gz"


# --------------------------------------------------------------------------------------
# Test assets: tokenizer and corpus
# --------------------------------------------------------------------------------------


def _read_corpus_texts(corpus: Path, max_docs: int | None) -> list[str]:
    texts = []
    opener = gzip.open if corpus.suffix == ".gz" else open
    with opener(corpus, "rt", encoding="utf-8") as f:
        for line in f:
            if max_docs is not None and len(texts) >= max_docs:
                break
            texts.append(json.loads(line)["text"])
    return texts


def write_debug_corpus(out_dir: str | os.PathLike, max_docs: int = 200, corpus: Path = SHARED_CORPUS) -> Path:
    """Write ``out_dir/train.jsonl`` with the first ``max_docs`` documents of ``corpus``.

    ``--training.dataset c4_test --training.dataset_path out_dir`` then loads it
    through torchtitan's stock ``load_dataset(path, split="train")``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "train.jsonl"
    if not target.exists():
        tmp = out / "train.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for text in _read_corpus_texts(corpus, max_docs):
                f.write(json.dumps({"text": text}) + "\n")
        os.replace(tmp, target)
    return out


def build_debug_tokenizer(
    out_dir: str | os.PathLike, vocab_size: int = 2048, corpus: Path = SHARED_CORPUS, max_docs: int = 500
) -> Path:
    """Train a byte-level BPE tokenizer (``tokenizer.json`` + ``tokenizer_config.json``).

    ``vocab_size`` must not exceed the model's (llama3 ``debugmodel``: 2048) because
    torchtitan does not resize the embedding to the tokenizer.  Deterministic;
    takes about a second.  Special tokens: ``<|begin_of_text|>`` (bos),
    ``<|end_of_text|>`` (eos).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(out_dir)
    if (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[bos, eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_read_corpus_texts(corpus, max_docs), trainer=trainer)
    assert tok.get_vocab_size() <= vocab_size, tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": bos, "eos_token": eos, "add_bos_token": True, "add_eos_token": True})
    )
    return out


def replicate_corpus_for_ranks(dataset_dir: str | os.PathLike, out_dir: str | os.PathLike, world_size: int) -> Path:
    """``out_dir/train.jsonl`` = ``world_size`` copies of ``dataset_dir/train.jsonl``.

    torchtitan shards a map-style dataset contiguously (``split_dataset_by_node``), so
    every rank then reads exactly the batches a single process reads from
    ``dataset_dir``: with the same initial weights (:func:`create_seed_checkpoint`) an
    N-rank data-parallel run must reproduce the single-process losses.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = (Path(dataset_dir) / "train.jsonl").read_text(encoding="utf-8")
    (out / "train.jsonl").write_text(text * world_size, encoding="utf-8")
    return out


def create_seed_checkpoint(args: Sequence[str], trainer_cls: type | None = None) -> Path:
    """Save step-0 weights the way ``torchtitan.train.main`` does for
    ``--checkpoint.create_seed_checkpoint`` (one process, no sharding) and return the
    folder to pass as ``--checkpoint.initial_load_path`` (with ``--checkpoint.enable``).

    Needed to compare runs of different world sizes: FSDP initialises sharded
    weights with DTensor's RNG, which differs from single-process init.
    """
    extra = [
        "--checkpoint.enable",
        "--checkpoint.create_seed_checkpoint",
        "--parallelism.data_parallel_shard_degree",
        "1",
    ]
    with trainer_session(trainer_cls, [*args, *extra]) as trainer:
        trainer.checkpointer.save(curr_step=0, last_step=True)
        folder = Path(trainer.checkpointer.folder) / "step-0"
    return folder


def debug_assets(root: str | os.PathLike, max_docs: int = 200) -> dict[str, Path]:
    """Tokenizer and corpus under ``root`` (created once, reused afterwards)."""
    root = Path(root)
    return {
        "tokenizer": build_debug_tokenizer(root / "tokenizer"),
        "dataset": write_debug_corpus(root / "data", max_docs=max_docs),
    }


# torchtitan v0.2.2 torchtitan/models/llama3/train_configs/debug_model.toml (not shipped in
# the wheel), verbatim except for the comments.
LLAMA3_DEBUG_TOML = """\
[job]
dump_folder = "./outputs"
description = "Llama 3 debug training"
print_config = false

[profiling]
enable_profiling = false
save_traces_folder = "profile_trace"
profile_freq = 10
enable_memory_snapshot = false
save_memory_snapshot_folder = "memory_snapshot"

[metrics]
log_freq = 1
disable_color_printing = false
enable_tensorboard = false
save_tb_folder = "tb"
enable_wandb = false

[model]
name = "llama3"
flavor = "debugmodel"
hf_assets_path = "./tests/assets/tokenizer"

[optimizer]
name = "AdamW"
lr = 8e-4
eps = 1e-8

[lr_scheduler]
warmup_steps = 2
decay_ratio = 0.8
decay_type = "linear"
min_lr_factor = 0.0

[training]
local_batch_size = 8
seq_len = 2048
max_norm = 1.0
steps = 10
dataset = "c4_test"

[parallelism]
data_parallel_replicate_degree = 1
data_parallel_shard_degree = -1
fsdp_reshard_after_forward = "default"
tensor_parallel_degree = 1
enable_async_tensor_parallel = false
pipeline_parallel_degree = 1
pipeline_parallel_schedule = "Interleaved1F1B"
context_parallel_degree = 1

[checkpoint]
enable = false
folder = "checkpoint"
interval = 10
last_save_model_only = false
export_dtype = "float32"
async_mode = "disabled"

[activation_checkpoint]
mode = "selective"
selective_ac_option = '2'

[compile]
enable=false
components = ["model", "loss"]

[quantize.linear.float8]
enable_fsdp_float8_all_gather = false
precompute_float8_dynamic_scale_for_fsdp = false
filter_fqns = ["output"]

[validation]
enable = false
dataset = "c4_validation"
freq = 5
steps = 10
"""


def llama3_debug_args(
    assets: dict[str, Path],
    dump_folder: str | os.PathLike,
    steps: int = 10,
    seq_len: int = 128,
    batch_size: int = 4,
    fast: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """CLI args: torchtitan's llama3 debug-model TOML, local assets, a small shape.

    ``fast=False`` keeps the TOML's own (GPU-oriented) settings apart from the
    shape, which is what the timing study compares against.
    """
    dump = Path(dump_folder)
    dump.mkdir(parents=True, exist_ok=True)
    toml = dump / "llama3_debug_model.toml"
    toml.write_text(LLAMA3_DEBUG_TOML)
    args = [
        "--job.config_file", str(toml),
        "--job.dump_folder", str(dump),
        "--model.hf_assets_path", str(assets["tokenizer"]),
        "--training.dataset", "c4_test",
        "--training.dataset_path", str(assets["dataset"]),
        "--training.steps", str(steps),
        "--training.seq_len", str(seq_len),
        "--training.local_batch_size", str(batch_size),
        "--lr_scheduler.warmup_steps", str(min(2, steps)),
        "--debug.seed", "0",
    ]  # fmt: skip
    if fast:
        args += list(CPU_FAST_ARGS)
    return args + list(extra)


# --------------------------------------------------------------------------------------
# Running a trainer in this process
# --------------------------------------------------------------------------------------


def _record_losses(trainer: Any) -> None:
    """Attach ``trainer.loss_history``: ``(step, global_avg_loss, grad_norm)`` per logged step."""
    mp = trainer.metrics_processor
    history: list[tuple[int, float, float]] = []
    orig_log = mp.log

    def log(step: int, global_avg_loss: float, global_max_loss: float, grad_norm: float, *a: Any, **kw: Any):
        history.append((step, float(global_avg_loss), float(grad_norm)))
        return orig_log(step, global_avg_loss, global_max_loss, grad_norm, *a, **kw)

    mp.log = log
    trainer.loss_history = history


def run_trainer(trainer_cls: type | None, args: Sequence[str], env: dict[str, str] | None = None) -> Any:
    """Patch, set the launcher env vars, and build ``trainer_cls(ConfigManager().parse_args(args))``.

    Returns the trainer (not yet trained) with ``trainer.loss_history`` attached.
    Without ``RANK`` in ``env`` or ``os.environ`` (set by :func:`spawn_gloo` or
    torchrun) a single-process world on a free ``MASTER_PORT`` is assumed.
    The caller owns cleanup: prefer :func:`trainer_session`.
    ``ConfigManager.parse_args`` is always given ``args`` explicitly: its default
    is ``sys.argv[1:]`` *captured at import time* (pytest's argv, under pytest).
    """
    patch_torchtitan_for_cpu()
    env = dict(env or {})
    if "RANK" not in env and "RANK" not in os.environ:
        env = single_process_env(env)  # no launcher: a world of one
    os.environ.update(env)
    from torchtitan.config import ConfigManager

    if trainer_cls is None:
        from torchtitan.train import Trainer as trainer_cls
    config = ConfigManager().parse_args(list(args))
    trainer = trainer_cls(config)
    _record_losses(trainer)
    return trainer


def _cleanup(trainer: Any) -> None:
    try:
        if trainer is not None:
            trainer.close()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        # utils.GarbageCollection calls gc.disable() and never re-enables it.
        gc.enable()


@contextlib.contextmanager
def trainer_session(
    trainer_cls: type | None,
    args: Sequence[str],
    env: dict[str, str] | None = None,
    num_threads: int | None = None,
) -> Iterator[Any]:
    """:func:`run_trainer` as a context manager: closes the trainer, destroys the
    process group, re-enables ``gc`` and restores ``os.environ``, torch's switches that
    the trainer sets (``--debug.deterministic``: deterministic algorithms, cuDNN flags;
    ``tests/global_state.py``) and the intra-op thread count afterwards.

    ``num_threads=1`` makes a run immune to the OpenMP spin-wait slowdown on a
    shared/oversubscribed machine (see docs/torchtitan_cpu.md); leave it ``None``
    on a dedicated machine.
    """
    saved_env = dict(os.environ)
    saved_state = global_state.snapshot()
    saved_threads = torch.get_num_threads()
    trainer = None
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        trainer = run_trainer(trainer_cls, args, env)
        yield trainer
    finally:
        try:
            _cleanup(trainer)
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
            global_state.restore(saved_state)
            torch.set_num_threads(saved_threads)


# --------------------------------------------------------------------------------------
# Several processes on gloo
# --------------------------------------------------------------------------------------


def _spawn_entry(
    local_rank: int,
    world_size: int,
    port: int,
    fn: Callable,
    args: tuple,
    out_dir: str,
    env: dict[str, str],
    threads: int,
) -> None:
    # CPU ranks on gloo, also on a GPU machine: they start with no CUDA device visible (``spawn_gloo``'s
    # ``no_cuda_in_children``), so nothing (torchtitan's device choice at import, DCP, our SAC list) takes a
    # CUDA path.
    os.environ.update(env)
    os.environ.update(
        {
            "RANK": str(local_rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "HF_DATASETS_OFFLINE": "1",
        }
    )
    # The ranks share the parent's cores (under pytest-xdist, one worker's share): more intra-op threads
    # than cores make OpenMP spin-wait (3-15x slower, docs/torchtitan_cpu.md).
    torch.set_num_threads(threads)
    result: dict[str, Any]
    try:
        patch_torchtitan_for_cpu()
        result = {"ok": True, "value": fn(*args)}
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    finally:
        if torch.distributed.is_initialized():
            with contextlib.suppress(Exception):
                torch.distributed.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{local_rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    if not result["ok"]:
        raise SystemExit(1)


@contextlib.contextmanager
def no_cuda_in_children() -> Iterator[None]:
    """``CUDA_VISIBLE_DEVICES=""`` in this process's environment while children are spawned, so that they
    start with it. Set only in the child (``_spawn_entry``), it came too late on a GPU machine: unpickling
    ``fn`` imports modules that ask ``torch.cuda``, whose device count is then cached as 1, and
    ``torch.compile`` later failed on the hidden device (``IndexError`` in ``get_device_properties``)."""
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if saved is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def spawn_gloo(
    fn: Callable, *args: Any, world_size: int = 2, env: dict[str, str] | None = None, timeout: float = 300
) -> list[Any]:
    """Run ``fn(*args)`` in ``world_size`` fresh processes (``spawn``) that see
    ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` (a free port), a patched
    torchtitan and no CUDA device, each with its share of this process's intra-op threads; return the
    per-rank return values (rank order).

    ``fn`` must be importable by the children (a module-level function) and its
    return value picklable.  ``fn`` typically calls :func:`run_trainer` with
    ``env=None`` (the rank variables are already set) and trains; it may also
    init the process group itself.  A failure on any rank raises ``RuntimeError``
    carrying that rank's traceback.
    """
    import torch.multiprocessing as mp

    port = find_free_port()
    with tempfile.TemporaryDirectory(prefix="tt_gloo_") as out_dir, no_cuda_in_children():
        ctx = mp.start_processes(
            _spawn_entry,
            args=(world_size, port, fn, args, out_dir, dict(env or {}), max(1, torch.get_num_threads() // world_size)),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        error: Exception | None = None
        try:
            while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"spawn_gloo: {fn.__name__} did not finish in {timeout} s")
        except mp.ProcessRaisedException as e:  # pragma: no cover - reported below
            error = e
        except mp.ProcessExitedException as e:
            error = e
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
        results = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pkl")
            if not os.path.exists(path):
                raise RuntimeError(f"spawn_gloo: rank {rank} wrote no result ({error})")
            with open(path, "rb") as f:
                res = pickle.load(f)
            if not res["ok"]:
                raise RuntimeError(f"spawn_gloo: rank {rank} failed: {res['error']}\n{res['traceback']}")
            results.append(res["value"])
        if error is not None:
            raise RuntimeError(f"spawn_gloo: {error}")
        return results


def train_and_report(trainer_cls_path: str | None, args: Sequence[str], log: bool = False) -> dict[str, Any]:
    """:func:`spawn_gloo` target: build a trainer (``"pkg.mod:Cls"`` or ``None`` for
    torchtitan's) from the rank env, train, return a picklable summary: ``rank``,
    ``world_size``, ``fsdp``, ``dtensor_params``, ``losses`` (``[(step, loss,
    grad_norm)]``), ``seconds``, ``steps``.  ``log=True`` turns on torchtitan's log."""
    from torch.distributed.tensor import DTensor

    if log:
        from torchtitan.tools.logging import init_logger

        init_logger()
    trainer_cls = load_class(trainer_cls_path) if trainer_cls_path else None

    trainer = run_trainer(trainer_cls, args)
    try:
        t0 = time.perf_counter()
        trainer.train()
        params = list(trainer.model_parts[0].parameters())
        return {
            "rank": torch.distributed.get_rank(),
            "world_size": torch.distributed.get_world_size(),
            "fsdp": trainer.parallel_dims.fsdp_enabled,
            "dtensor_params": all(isinstance(p, DTensor) for p in params),
            "losses": list(trainer.loss_history),
            "seconds": time.perf_counter() - t0,
            "steps": trainer.step,
        }
    finally:
        _cleanup(trainer)
