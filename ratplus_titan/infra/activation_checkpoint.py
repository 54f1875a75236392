"""Activation checkpointing of RAT+ blocks: torchtitan 0.2.2's AC modes, and ``[ratplus] recompute``.

What each ``[activation_checkpoint] mode`` keeps for backward (DESIGN §3.5 has the accounting):

- ``selective`` with ``selective_ac_option = "op"``: each block runs under an op-level policy
  (``_op_sac``): the outputs of the ops in ``sac_save_list()`` (attention, our pattern-attention
  kernel) and of the matmuls named in ``KEPT_MATMULS`` (``in_proj``, ``ffn.fc1``) are kept,
  everything else is recomputed in backward (the recurrence scan, the gates, ``out_proj``, the GELU).
  torchtitan's own policy keeps every second ``aten.mm`` by count, which for a RAT+ block
  (``in_proj, out_proj, fc1, fc2``) is the same two; naming them by module instead lets ``recompute``
  drop ``fc1`` alone. torchtitan's ``per_op_sac_force_recompute_mm_shapes_by_fqns`` cannot: it
  selects matmuls by weight shape, and the attention baseline's ``in_proj`` (``d -> 4d``) has
  ``fc1``'s shape; its forced matmuls also leave the count, so ``fc2``'s output would be kept
  instead. Its module names still work here, by module: a matching ``nn.Linear``'s output is not kept.
- ``selective`` with a number ``N`` (every N-th block recomputed whole, the others keep everything),
  ``full`` (every block recomputed whole) and ``memory_budget`` (the compiler chooses): torchtitan's
  ``apply_ac``.

``[ratplus] recompute = "fc1"`` (``RECOMPUTE`` in ``ratplus_titan/config.py``): backward recomputes
``fc1``'s output and its GELU (``[B, T, 4d]`` each) from the FFN's input in every block:

- ``op``: ``ffn.fc1`` leaves ``KEPT_MATMULS``; the GELU was never kept;
- ``full`` and a layer-``N`` block recomputed whole: nothing more to do;
- the other blocks (layer ``N``; every block with ``mode = "none"``): the FFN is checkpointed whole,
  keeping only its input; in eager mode its backward also reruns ``fc2`` (compiled, the partitioner
  drops it: backward needs ``fc2``'s input, not its output);
- ``memory_budget``: refused (``check_recompute``): the compiler decides what to recompute.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from torchtitan.config.job_config import ActivationCheckpoint
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.tools.logging import logger

from ratplus_titan.config import RECOMPUTE, ConfigError

# Selective AC keeps the outputs of these ops instead of recomputing them (matmuls: KEPT_MATMULS).
_SAC_SAVE_LIST = {
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops.aten.max.default,
    torch._higher_order_ops.flex_attention,
    torch._higher_order_ops.inductor_compiled_code,
}
# Our kernels whose outputs selective AC keeps: the pattern attention (recomputing it is a second
# attention forward). The recurrence scan is left out on purpose: it is memory-bound (one pass reads
# f, k, x and writes K, V), and its inputs are slices of the in_proj output that AC keeps anyway, so
# backward reruns it instead of holding K, V (2 x d bf16 a token) and its fp32 chunk states for
# every layer. The byte accounting is in tests/model/test_saved_memory.py.
_SAVED_RATPLUS_OPS = ("pattern_attention",)

KEPT_MATMULS = ("seq_layer.in_proj", "ffn.fc1")
"""The block's ``nn.Linear`` modules whose outputs op-level selective AC keeps (``recompute = "fc1"``
drops ``ffn.fc1``): ``out_proj``'s and ``fc2``'s outputs are not needed by backward."""

RECOMPUTED_MATMULS = {"none": (), "fc1": ("ffn.fc1",)}
"""Per ``[ratplus] recompute`` value, the ``nn.Linear`` modules whose outputs op-level AC does not keep."""


def sac_save_list() -> set:
    """The ops whose outputs selective AC keeps, ours included (registered once their modules load on CUDA)."""
    if torch.cuda.is_available():
        from ratplus_titan.kernels import pattern_attention_triton  # noqa: F401  (registers the op)
    ours = [getattr(torch.ops.ratplus, name, None) for name in _SAVED_RATPLUS_OPS]
    return _SAC_SAVE_LIST | {op.default for op in ours if op is not None}


def check_recompute(recompute: str, ac_mode: str) -> None:
    """Raise ``ConfigError`` (one line) unless ``[ratplus] recompute`` can run under ``[activation_checkpoint] mode``."""
    if recompute not in RECOMPUTE:
        raise ConfigError(f"ratplus.recompute={recompute!r} is invalid: allowed values are {', '.join(RECOMPUTE)}")
    if recompute != "none" and ac_mode == "memory_budget":
        raise ConfigError(
            f"ratplus.recompute={recompute!r} cannot run with activation_checkpoint.mode='memory_budget', where the "
            "compiler picks what to recompute: use mode 'selective' or 'full', or ratplus.recompute='none'"
        )


def apply_ratplus_ac(
    model: nn.Module,
    ac_config: ActivationCheckpoint,
    recompute: str = "none",
    *,
    model_compile_enabled: bool = False,
    save_list: set | None = None,
    base_folder: str = "",
) -> None:
    """Wrap the blocks of ``model.layers`` (before compile and FSDP) for ``ac_config.mode`` and ``recompute``.

    ``save_list``: the ops whose outputs op-level AC keeps (default ``sac_save_list()``).
    """
    check_recompute(recompute, ac_config.mode)
    save_list = sac_save_list() if save_list is None else save_list
    layers = model.get_submodule("layers")
    if ac_config.mode == "selective" and ac_config.selective_ac_option == "op":
        # As torchtitan's apply_ac: select compiled graphs in insertion order (pytorch/pytorch#166926).
        torch._C._dynamo.eval_frame._set_lru_cache(False)
        not_kept = (*ac_config.per_op_sac_force_recompute_mm_shapes_by_fqns, *RECOMPUTED_MATMULS[recompute])
        for layer_id, block in list(layers.named_children()):
            layers.register_module(layer_id, _op_sac(block, ac_config, save_list, f"layers.{layer_id}", not_kept))
    elif ac_config.mode != "none":
        apply_ac(model, ac_config, model_compile_enabled=model_compile_enabled, op_sac_save_list=save_list,
                 base_folder=base_folder)  # fmt: skip
    if recompute == "fc1":
        for block in layers.children():
            if not isinstance(block, CheckpointWrapper):  # a block checkpointed whole recomputes its FFN already
                block.ffn = checkpoint_wrapper(block.ffn, **_wrapper_options(ac_config))
    logger.info(f"Applied {ac_config.mode} activation checkpointing, ratplus.recompute={recompute!r}")


def kept_matmuls(block: nn.Module, base_fqn: str, not_kept: tuple[str, ...]) -> tuple[bool, ...]:
    """For each ``nn.Linear`` of ``block`` in forward order: is its output kept?

    A block's linears run in the order they are registered (``in_proj, out_proj, fc1, fc2``); a name
    in ``not_kept`` matches as torchtitan's fqn filters do, as a substring of ``base_fqn.name``.
    """
    linears = [name for name, module in block.named_modules() if isinstance(module, nn.Linear)]
    return tuple(
        name in KEPT_MATMULS and not any(part in f"{base_fqn}.{name}" for part in not_kept) for name in linears
    )


def _op_sac(block: nn.Module, ac_config: ActivationCheckpoint, save_list: set, base_fqn: str,
            not_kept: tuple[str, ...]) -> nn.Module:  # fmt: skip
    """``block`` checkpointed with the op-level policy: keep the outputs of ``save_list`` ops and of the
    ``aten.mm`` calls of the linears ``kept_matmuls`` marks (by their order in the forward), recompute the rest."""
    kept = kept_matmuls(block, base_fqn, not_kept)

    def context_fn() -> tuple[Any, Any]:
        matmuls: dict[bool, int] = defaultdict(int)  # aten.mm calls so far, in the forward and in its recompute

        def policy(ctx: Any, func: Callable, *args: Any, **kwargs: Any) -> CheckpointPolicy:
            if func == torch.ops.aten.mm.default:
                index = matmuls[ctx.is_recompute]
                matmuls[ctx.is_recompute] += 1
                keep = index < len(kept) and kept[index]  # a matmul that is no linear of the block: recomputed
            else:
                keep = func in save_list
            return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

        return create_selective_checkpoint_contexts(policy)

    return checkpoint_wrapper(block, context_fn=context_fn, **_wrapper_options(ac_config))


def _wrapper_options(ac_config: ActivationCheckpoint) -> dict[str, Any]:
    """The checkpoint options torchtitan passes for every AC mode."""
    return {"preserve_rng_state": ac_config.preserve_rng_state, "determinism_check": ac_config.determinism_check,
            "early_stop": ac_config.early_stop, "debug": ac_config.debug}  # fmt: skip
