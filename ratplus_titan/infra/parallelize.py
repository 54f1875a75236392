"""Distribution for RAT+: tensor parallel, activation checkpointing, compile, FSDP2.

All parallelism lives here; the model knows none of it (as torchtitan's llama3).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torchtitan.config import TORCH_DTYPE_MAP, JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.models.llama3.infra.parallelize import apply_compile, disable_fsdp_gradient_division
from torchtitan.tools.logging import logger

from ratplus_titan.config import RATPlus
from ratplus_titan.head_groups import HeadGroups
from ratplus_titan.infra.activation_checkpoint import apply_ratplus_ac


def parallelize_ratplus(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig) -> nn.Module:
    """TP -> AC (``infra/activation_checkpoint.py``, with ``[ratplus] recompute``) -> per-block compile -> FSDP2,
    the order torchtitan's models use."""
    if parallel_dims.cp_enabled or parallel_dims.pp_enabled:
        raise ValueError(
            "parallelism.context_parallel_degree and pipeline_parallel_degree must be 1 for ratplus "
            "(supported: data_parallel_shard/replicate_degree, tensor_parallel_degree)"
        )
    if parallel_dims.tp_enabled:
        tp = parallel_dims.tp
        if job_config.training.seq_len % tp:
            raise ValueError(
                f"training.seq_len={job_config.training.seq_len} must be divisible by tensor_parallel_degree={tp}"
            )
        if model.args.n_heads % tp:
            raise ValueError(f"model n_heads={model.args.n_heads} must be divisible by tensor_parallel_degree={tp}")
        float8 = "quantize.linear.float8" in job_config.model.converters or "float8" in job_config.model.converters
        rowwise = job_config.quantize.linear.float8.recipe_name in ("rowwise", "rowwise_with_gw_hp")
        apply_tp(
            model,
            parallel_dims.get_mesh("tp"),
            loss_parallel=not job_config.parallelism.disable_loss_parallel,
            float8_tensorwise=float8 and not rowwise,
        )
    compile_model = job_config.compile.enable and "model" in job_config.compile.components
    section = getattr(job_config, "ratplus", None) or RATPlus()
    apply_ratplus_ac(
        model,
        job_config.activation_checkpoint,
        section.recompute,
        model_compile_enabled=compile_model,
        base_folder=job_config.job.dump_folder,
    )
    if compile_model:
        apply_compile(model, job_config.compile)
    if parallel_dims.fsdp_enabled:
        names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        apply_fsdp(
            model,
            parallel_dims.get_mesh(names),
            param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
            cpu_offload=job_config.training.enable_cpu_offload,
            reshard_after_forward=job_config.parallelism.fsdp_reshard_after_forward != "never",
        )
        logger.info("Applied FSDP2 to the RAT+ model")
    elif parallel_dims.dp_replicate_enabled:
        raise ValueError("pure DDP (data_parallel_replicate_degree > 1 without sharding) is not supported; use FSDP")
    return model


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, loss_parallel: bool, float8_tensorwise: bool = False) -> None:
    """Megatron-style TP with sequence-parallel norms.

    ``in_proj`` rows are head-interleaved (``[head][o,q,k,x,f][hd]``), so the plain
    column split of ``ColwiseParallel`` gives each rank whole heads of all five parts:
    the recurrence, RoPE, attention and gate then run on local heads with no communication.
    A layer with head groups runs this rank's part of them (``HeadGroups.shard``; a group may span ranks).
    The LM head reuses the vocab-sharded embedding weight: logits come out vocab-sharded.
    """
    if float8_tensorwise:
        from torchao.float8.float8_tensor_parallel import Float8ColwiseParallel, Float8RowwiseParallel

        colwise, rowwise = Float8ColwiseParallel, Float8RowwiseParallel
    else:
        colwise, rowwise = ColwiseParallel, RowwiseParallel
    parallelize_module(
        model,
        tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            # The head needs the full sequence: hand it a replicated DTensor.
            "norm": SequenceParallel(),
        },
    )
    parallelize_module(
        model.norm,
        tp_mesh,
        PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=False),
    )
    for block in model.layers.values():
        parallelize_module(
            block,
            tp_mesh,
            {
                "seq_layer.input_norm": SequenceParallel(),
                "seq_layer.in_proj": colwise(input_layouts=Shard(1)),
                "seq_layer.out_proj": rowwise(output_layouts=Shard(1)),
                "ffn.norm": SequenceParallel(),
                "ffn.fc1": colwise(input_layouts=Shard(1)),
                "ffn.fc2": rowwise(output_layouts=Shard(1)),
            },
        )
        if isinstance(block.seq_layer.pattern, HeadGroups):
            block.seq_layer.pattern = block.seq_layer.pattern.shard(tp_mesh.get_local_rank(), tp_mesh.size())
    if not loss_parallel:
        model.register_forward_hook(_gather_logits)
    logger.info(f"Applied {'float8 ' if float8_tensorwise else ''}tensor parallelism to the RAT+ model")


def _gather_logits(module: nn.Module, args, output):
    return output.full_tensor() if isinstance(output, DTensor) else output


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
) -> None:
    """FSDP2 per block, then the root (embedding, final norm; the tied head uses the root's embedding)."""
    config = {"mesh": dp_mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)}
    if cpu_offload:
        config["offload_policy"] = CPUOffloadPolicy()
    blocks = list(model.layers.values())
    for index, block in enumerate(blocks):
        # The last block's parameters would be gathered again at once for backward.
        fully_shard(block, **config, reshard_after_forward=reshard_after_forward and index < len(blocks) - 1)
    fully_shard(model, **config)
    disable_fsdp_gradient_division(model)
    if dp_mesh.device_type == "cpu":  # gloo has no PREMUL_SUM: reduce with a plain sum
        for module in model.modules():
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)
