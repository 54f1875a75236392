"""ratplus_titan/infra/activation_checkpoint.py: ``[ratplus] recompute`` under every activation-checkpointing mode.

One bf16 block (RAT+, and the attention baseline, whose ``in_proj`` has ``fc1``'s shape ``d -> 4d``) is
wrapped as training wraps it (``tests/model/test_saved_memory.py``: ``measure``), compiled or eager, with
``recompute`` off and on; what it keeps for backward is counted there (compiled: the tensors the compiled
forward saves; eager: the storages its ops created that are still alive after the forward).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.utils._python_dispatch import TorchDispatchMode
from torchtitan.config.job_config import ActivationCheckpoint

from ratplus_titan.config import RECOMPUTE, ConfigError
from ratplus_titan.infra.activation_checkpoint import (
    RECOMPUTED_MATMULS,
    apply_ratplus_ac,
    check_recompute,
    kept_matmuls,
)
from ratplus_titan.model.args import RATPlusModelArgs
from ratplus_titan.model.model import RATPlusBlock, RATPlusModel
from tests.device import needs_interpreter
from tests.model.test_saved_memory import BATCH, SEQ, describe, measure, triton_recurrence  # noqa: F401  (fixture)

# (AC mode, compiled): op-level selective AC, no AC, every block recomputed whole.
MODES = [("op", True), ("op", False), ("none", True), ("none", False), ("full", True), ("full", False)]
MODE_IDS = [f"{mode}-{'compiled' if compiled else 'eager'}" for mode, compiled in MODES]
# How many [B, T, hidden] tensors each mode keeps without the option: fc1's output (op), and its GELU (none).
HIDDEN_KEPT = {"op": 1, "none": 2, "full": 0}


def sizes(result: dict) -> Counter:
    return Counter(nbytes for nbytes, _, _ in result["seen"].values())


@needs_interpreter
@pytest.mark.usefixtures("triton_recurrence")
@pytest.mark.parametrize("kind", ["ratplus", "attention"])
@pytest.mark.parametrize("mode, compiled", MODES, ids=MODE_IDS)
def test_recompute_fc1_keeps_no_ffn_hidden_and_nothing_more(kind, mode, compiled, device):
    """Off, the block keeps ``HIDDEN_KEPT[mode]`` tensors of ``[B, T, 4d]``; on, none, and every tensor it
    still keeps was kept with the option off too. Under op-level AC the hidden is the only difference (the
    attention baseline's ``in_proj`` output, the same shape as fc1's, is still kept)."""
    off = measure(kind, device, mode=mode, recompute="none", compiled=compiled)
    on = measure(kind, device, mode=mode, recompute="fc1", compiled=compiled)
    hidden_bytes = BATCH * SEQ * off["hidden"] * torch.bfloat16.itemsize
    in_proj = int(kind == "attention" and mode != "full")  # its in_proj output: 4d wide too, kept by both
    assert sizes(off)[hidden_bytes] == HIDDEN_KEPT[mode] + in_proj, describe(off["seen"])
    assert sizes(on)[hidden_bytes] == in_proj, describe(on["seen"])
    assert sizes(on) <= sizes(off), f"on: {describe(on['seen'])}; off: {describe(off['seen'])}"
    if mode == "op":
        assert sizes(off) - sizes(on) == Counter({hidden_bytes: 1}), describe(on["seen"])
    if mode == "full":
        assert sizes(on) == sizes(off)


@needs_interpreter
@pytest.mark.usefixtures("triton_recurrence")
@pytest.mark.parametrize("kind", ["ratplus", "attention"])
@pytest.mark.parametrize("mode, compiled", MODES, ids=MODE_IDS)
def test_recompute_fc1_gives_the_same_gradients(kind, mode, compiled, device):
    """Bit for bit on the CPU; on the GPU within the bf16 ulp or two of the scan's run-dependent look-back
    order (as ``test_recomputing_the_scan_gives_the_gradients_of_keeping_everything``)."""
    off = measure(kind, device, mode=mode, recompute="none", compiled=compiled)
    on = measure(kind, device, mode=mode, recompute="fc1", compiled=compiled)
    for a, b in zip(on["grads"], off["grads"], strict=True):
        if device.type == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=2**-6, atol=2**-8 * b.abs().max().item())


def small_model(n_layers: int, apply_re: bool = True) -> RATPlusModel:
    args = RATPlusModelArgs(dim=64, n_layers=n_layers, n_heads=2, vocab_size=32, max_seq_len=16, apply_re=apply_re,
                            attention_backend="reference")  # fmt: skip
    torch.manual_seed(0)
    model = RATPlusModel(args)
    model.init_weights()
    return model


def layer_mode_gradients(model: RATPlusModel, recompute: str) -> list[torch.Tensor]:
    apply_ratplus_ac(model, ActivationCheckpoint(mode="selective", selective_ac_option="2"), recompute)
    tokens = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))
    model(tokens).float().square().mean().backward()
    return [p.grad for p in model.parameters()]


def test_layer_mode_checkpoints_the_ffn_of_each_block_it_keeps_whole():
    """``selective_ac_option = "2"``: torchtitan recomputes every second block whole; with ``fc1`` the other
    blocks get their FFN checkpointed, and the gradients are those of the option off, bit for bit."""
    off, on = small_model(4), small_model(4)
    grads_off, grads_on = layer_mode_gradients(off, "none"), layer_mode_gradients(on, "fc1")
    whole = [isinstance(block, CheckpointWrapper) for block in on.layers.values()]
    ffn_wrapped = [isinstance(block.ffn, CheckpointWrapper) for block in on.layers.values()]
    assert sorted(whole) == [False, False, True, True] and ffn_wrapped == [not w for w in whole]
    assert not any(isinstance(block.ffn, CheckpointWrapper) for block in off.layers.values())
    assert all(torch.equal(a, b) for a, b in zip(grads_on, grads_off, strict=True))


class _MatmulShapes(TorchDispatchMode):
    """The weight shapes (``[out, in]``) of the ``aten.mm`` calls, in order."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func == torch.ops.aten.mm.default:
            self.shapes.append(tuple(args[1].shape[::-1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("apply_re", [True, False], ids=["ratplus", "attention"])
def test_a_blocks_matmuls_run_in_the_order_of_its_linears(apply_re):
    """``kept_matmuls`` marks the block's ``aten.mm`` calls by position: the linears' registration order
    must be the order the forward runs them (checked with distinct shapes: ffn_multiplier 3)."""
    args = RATPlusModelArgs(dim=64, n_layers=1, n_heads=2, vocab_size=32, max_seq_len=16, apply_re=apply_re,
                            ffn_multiplier=3, attention_backend="reference")  # fmt: skip
    block = RATPlusBlock(args, 0)
    linears = [(name, tuple(m.weight.shape)) for name, m in block.named_modules() if isinstance(m, nn.Linear)]
    with _MatmulShapes() as recorded:
        block(torch.randn(2, 16, 64), RATPlusModel(args).cos_sin[:16])
    assert recorded.shapes == [shape for _, shape in linears]
    kept = {name for (name, _), keep in zip(linears, kept_matmuls(block, "layers.0", ()), strict=True) if keep}
    assert kept == {"seq_layer.in_proj", "ffn.fc1"}
    kept = {
        name for (name, _), keep in zip(linears, kept_matmuls(block, "layers.0", ("ffn.fc1",)), strict=True) if keep
    }
    assert kept == {"seq_layer.in_proj"}


def test_every_recompute_value_names_its_matmuls():
    assert set(RECOMPUTED_MATMULS) == set(RECOMPUTE)


@pytest.mark.parametrize(
    "recompute, mode, message",
    [
        ("fc2", "selective", "ratplus.recompute='fc2' is invalid: allowed values are none, fc1"),
        ("fc1", "memory_budget", "ratplus.recompute='fc1' cannot run with activation_checkpoint.mode='memory_budget', "
         "where the compiler picks what to recompute: use mode 'selective' or 'full', or ratplus.recompute='none'"),
    ],
)  # fmt: skip
def test_a_recompute_the_mode_cannot_take_is_one_line(recompute, mode, message):
    with pytest.raises(ConfigError) as raised:
        check_recompute(recompute, mode)
    assert str(raised.value) == message
    check_recompute("none", mode)  # always allowed
