"""Per-rank bodies for the 2-process (gloo, CPU) FSDP2 checkpoint tests.

A separate module (not a test file) so ``torch.multiprocessing.spawn`` children can import
it by name: the tests put this folder on ``sys.path``, which spawn hands to the children.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ratplus_titan.infra.cpu import find_free_port
from ratplus_titan.model.args import RATPlusModelArgs
from ratplus_titan.model.model import RATPlusModel

WORLD_SIZE = 2


def small_args() -> RATPlusModelArgs:
    return RATPlusModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=101, max_seq_len=64)


def make_model(seed: int) -> RATPlusModel:
    """A small model with every tensor random (norm scales too, so a misplaced tensor shows)."""
    torch.manual_seed(seed)
    model = RATPlusModel(small_args())
    model.init_weights()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.2 if "in_proj" in name else 0.05)
    return model


def spawn(fn: Any, *args: Any) -> None:
    """Run ``fn(rank, port, *args)`` on ``WORLD_SIZE`` spawned CPU processes."""
    import torch.multiprocessing as mp

    mp.spawn(fn, args=(find_free_port(), *args), nprocs=WORLD_SIZE, join=True)


def _init(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)


def _sharded_model(seed: int) -> RATPlusModel:
    """FSDP2 per block, then the root, as torchtitan's parallelize does."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    model = make_model(seed)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _tensor_parallel_model(seed: int) -> RATPlusModel:
    """Column-wise in_proj/fc1, row-wise out_proj/fc2, vocab-sharded embedding (101 rows on 2 ranks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (WORLD_SIZE,), mesh_dim_names=("tp",))
    model = make_model(seed)
    plan = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate())}
    for i in model.layers:
        plan[f"layers.{i}.seq_layer.in_proj"] = ColwiseParallel()
        plan[f"layers.{i}.seq_layer.out_proj"] = RowwiseParallel()
        plan[f"layers.{i}.ffn.fc1"] = ColwiseParallel()
        plan[f"layers.{i}.ffn.fc2"] = RowwiseParallel()
    return parallelize_module(model, mesh, plan)


class _TrainState:
    """What torchtitan's Trainer registers as ``train_state`` (a Stateful)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])


def _manager(model: torch.nn.Module, base_folder: Path, **config: Any):
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.lr_scheduler import LRSchedulersContainer
    from torchtitan.components.optimizer import OptimizersContainer
    from torchtitan.config import Checkpoint as CheckpointConfig

    optimizers = OptimizersContainer([model], torch.optim.AdamW, {"lr": 1e-2})
    lr_schedulers = LRSchedulersContainer(optimizers, lambda step: 1.0)
    train_state = _TrainState()
    manager = CheckpointManager(
        dataloader=None,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=lr_schedulers,
        states={"train_state": train_state},
        checkpoint_config=CheckpointConfig(enable=True, keep_latest_k=0, **config),
        sd_adapter=None,
        base_folder=str(base_folder),
    )
    return manager, optimizers, train_state


def _full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_worker(rank: int, port: int, root: str) -> None:
    """Train one step under FSDP2, save DCP checkpoints, then load an export back the torchtitan way.

    Writes:

    - ``root/run/checkpoint/step-3``: torchtitan's CheckpointManager, full training state;
    - ``root/run/checkpoint/step-5``: its last-step save (``last_save_model_only``, bf16 export dtype);
    - ``root/plain/checkpoint/step-3``: ``dcp.save`` of ``get_model_state_dict`` (ModelWrapper's keys);
    - ``root/tp/step-1``: the same for the untrained seed-0 model under tensor parallelism;
    - ``root/reference.pt``: the full (unsharded) fp32 state dict, from rank 0;
    - ``root/export`` and ``root/dcp``: rank 0 exports ``plain`` (``ratplus-export``) and
      converts it back (``to_dcp``);
    - ``root/loaded.pt``: a fresh FSDP2 model after torchtitan's model-only initial load
      of ``root/dcp`` (``checkpoint.initial_load_path``, empty checkpoint folder).

    One spawn for all of it: starting the two processes costs most of the test's time.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from ratplus_titan.adapters import export, to_dcp

    _init(rank, port)
    try:
        root_path = Path(root)
        model = _sharded_model(seed=0)
        manager, optimizers, train_state = _manager(
            model, root_path / "run", folder="checkpoint", interval=1, export_dtype="bfloat16"
        )
        torch.manual_seed(100 + rank)
        tokens = torch.randint(0, model.args.vocab_size, (2, 16))
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizers.step()
        optimizers.zero_grad()
        train_state.step = 3
        manager.save(curr_step=3)
        train_state.step = 5
        manager.save(curr_step=5, last_step=True)
        manager.close()
        dcp.save(get_model_state_dict(model), checkpoint_id=str(root_path / "plain" / "checkpoint" / "step-3"))
        # the untrained seed-0 model under tensor parallelism (uneven vocab shards included)
        dcp.save(get_model_state_dict(_tensor_parallel_model(seed=0)), checkpoint_id=str(root_path / "tp" / "step-1"))
        full = _full_state_dict(model)
        if rank == 0:
            torch.save(full, root_path / "reference.pt")
            export.main([str(root_path / "plain" / "checkpoint"), str(root_path / "export"), "--n-heads", "4",
                         "--dtype", "float32", "--no-tokenizer"])
            to_dcp.main([str(root_path / "export"), str(root_path / "dcp")])
        dist.barrier()

        fresh = _sharded_model(seed=1234)
        manager, _, _ = _manager(
            fresh,
            root_path / "adapt",
            folder="checkpoint",
            initial_load_path=str(root_path / "dcp"),
            initial_load_model_only=True,
        )
        if not manager.load(step=-1):
            raise RuntimeError("CheckpointManager.load() loaded nothing")
        manager.close()
        full = _full_state_dict(fresh)
        if rank == 0:
            torch.save(full, root_path / "loaded.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
