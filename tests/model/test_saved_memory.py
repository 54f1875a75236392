"""What one block keeps for backward in training (selective AC ``op`` + compile), RAT+ against llama3.

The GPU path, on the GPU when there is one (``tests/device.py``) and emulated on the CPU otherwise: the
recurrence runs as the Triton custom op (interpreted on the CPU), the sparse pattern as the Triton
attention op, dense attention as one of SDPA's fused ops (on the GPU whichever SDPA or torchtitan's llama3
picks, all in the save lists; on the CPU the flash op's ``_for_cpu`` twin, added to the save lists in its
place); RAT+'s activation checkpointing (``infra/activation_checkpoint.py``, torchtitan's ``apply_ac`` for
llama3) with our save list (``sac_save_list``), then
``torch.compile`` with the min-cut partitioner inductor uses (backend ``aot_eager_decomp_partition``).
The saved tensors are those the compiled forward hands to autograd, caught with ``saved_tensors_hooks``;
each storage counts once and whole (a view keeps its whole base alive); parameters and the RoPE table
(shared by all layers) are left out, and so are storages of a few bytes (the RNG seed and offset that
SDPA's CUDA ops keep: bytes per layer, not per token).

Accounting per token, in bf16 rows of width ``d`` (``H`` heads; lse is fp32 per head), from the
tensor lists below (``expected_saved``):

============================  =======  =========  ===================
kept for backward             RAT+     attention  llama3 (same shape)
============================  =======  =========  ===================
block input                   1        1          1
in_proj output (o q k x [f])  5        4          --
wq, wv outputs                --       --         2 (wk, wo recomputed)
attention output              1        1          1
attention lse                 2H/d     2H/d       2H/d
FFN hidden (mm output)        4 (fc1)  4 (fc1)    hidden/d (w1; w3 recomputed)
total at 1B (d=2048, H=16)    11.02    10.02      6.77 (hidden 5632)
============================  =======  =========  ===================

Before this accounting was enforced the scan's outputs were kept too (selective AC listed
``ratplus::recurrence_scan``): K and V (2 rows) and its fp32 chunk states (2 x 4 bytes a channel
every 16 steps: 0.25 rows), 13.27 rows in all. At 1B, seq 4096, local batch 8, one row over 24
layers is 24 x 32768 x 4096 bytes = 3 GiB: RAT+ keeps 4.25 rows (12.8 GiB) more than llama3, down
from 6.5 rows (19.5 GiB); the rest is the fused projection (5 rows against llama3's 2, which
recomputes wk and wo) and the 4d GELU FFN (4 rows against SwiGLU's 2.75). Each further row saved
costs a recomputed d x d matmul slice (2 d^2 FLOPs a token); the scan costs one memory-bound pass.
"""

from __future__ import annotations

import functools
import gc
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torchtitan.config.job_config import ActivationCheckpoint
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.models.llama3 import TransformerModelArgs
from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list as llama3_sac_save_list
from torchtitan.models.llama3.model.model import FeedForward, TransformerBlock, precompute_freqs_cis
from triton.runtime import interpreter

import ratplus_titan.model.model as model_module
from ratplus_titan.infra.activation_checkpoint import apply_ratplus_ac, sac_save_list
from ratplus_titan.kernels import pattern_attention_triton, recurrence_triton  # noqa: F401  (registers their ops)
from ratplus_titan.model.args import RATPlusModelArgs
from ratplus_titan.model.model import RATPlusBlock, rope_cache
from ratplus_titan.pattern import Pattern
from tests.device import needs_interpreter
from tests.kernels.test_recurrence_triton import _vectorized_scan

pytestmark = needs_interpreter

BATCH, SEQ, HEADS, HEAD_DIM = 2, 64, 2, 64
DIM = HEADS * HEAD_DIM
BF16, FP32 = 2, 4  # bytes
# llama3's FFN hidden is 8/3 d rounded up to multiple_of: 32 here gives 352 = 2.75 d, the 1B ratio (5632 / 2048).
LLAMA3_MULTIPLE_OF = 32
CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
# Smaller storages are bookkeeping, not activations (every activation here has >= BATCH * SEQ * 4 bytes).
MIN_ACTIVATION_BYTES = 64


# ----------------------------------------------------------------------------------------------
# the accounting
# ----------------------------------------------------------------------------------------------


def expected_saved(kind: str, batch: int, seq: int, dim: int, heads: int, hidden: int) -> dict[str, int]:
    """Bytes of each tensor one block should keep for backward (see the table above)."""
    row = batch * seq * dim * BF16  # one bf16 [B, T, d]
    lse = batch * heads * seq * FP32
    if kind == "llama3":
        return {"block input": row, "wq output": row, "wv output": row, "attention output": row,
                "attention lse": lse, "w1 output": batch * seq * hidden * BF16}  # fmt: skip
    parts = 5 if kind == "ratplus" else 4
    return {"block input": row, "in_proj output": parts * row, "attention output": row, "attention lse": lse,
            "fc1 output": batch * seq * hidden * BF16}  # fmt: skip


def rows_per_token(saved: dict[str, int], batch: int, seq: int, dim: int) -> float:
    return sum(saved.values()) / (batch * seq * dim * BF16)


def test_accounting_at_1b_matches_the_table():
    """The docstring's totals, from the same lists at the 1B flavor (llama3 hidden from torchtitan's FFN)."""
    with torch.device("meta"):
        llama3_hidden = FeedForward(
            dim=2048, hidden_dim=4 * 2048, multiple_of=256, ffn_dim_multiplier=None
        ).w1.out_features
    hidden = {"ratplus": 4 * 2048, "attention": 4 * 2048, "llama3": llama3_hidden}
    shape = dict(batch=8, seq=4096, dim=2048, heads=16)
    totals = {
        kind: rows_per_token(expected_saved(kind, **shape, hidden=hidden[kind]), 8, 4096, 2048) for kind in hidden
    }
    assert llama3_hidden == 5632
    assert [round(totals[k], 2) for k in ("ratplus", "attention", "llama3")] == [11.02, 10.02, 6.77]


# ----------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------


def saved_storages(fn: Callable, left_out: list[torch.Tensor], *inputs) -> tuple[torch.Tensor, dict[tuple, tuple]]:
    """Run ``fn(*inputs)``; every storage autograd saved: ``(device, data_ptr) -> (bytes, shape, dtype)``.

    A storage saved twice counts once; a view counts the whole storage it keeps alive.
    Storages of ``left_out`` tensors (parameters, shared tables) and those under ``MIN_ACTIVATION_BYTES``
    are not counted.
    """
    skip = {(t.device, t.untyped_storage().data_ptr()) for t in left_out}
    seen: dict[tuple, tuple] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr())
        if storage.nbytes() >= MIN_ACTIVATION_BYTES and key not in skip:
            seen.setdefault(key, (storage.nbytes(), tuple(tensor.shape), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn(*inputs)
    return out, seen


def kept_storages(fn: Callable, left_out: list[torch.Tensor], *inputs) -> tuple[torch.Tensor, dict[tuple, tuple]]:
    """Like ``saved_storages`` for eager checkpointing, whose region keeps its tensors away from
    ``saved_tensors_hooks``: every storage an op created in ``fn(*inputs)`` that is still alive when it
    returns, other than the output's, is held for backward (by autograd or by the checkpoint)."""
    skip = {(t.device, t.untyped_storage().data_ptr()) for t in left_out}
    created: dict[tuple, tuple] = {}

    class Created(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in pytree.tree_leaves(out):
                if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
                    storage = tensor.untyped_storage()
                    key = (tensor.device, storage.data_ptr())
                    if key not in created or created[key][0].expired():  # a freed storage's address reused
                        created[key] = (StorageWeakRef(storage), storage.nbytes(), tuple(tensor.shape), tensor.dtype)
            return out

    with Created():
        out = fn(*inputs)
    gc.collect()
    skip.add((out.device, out.untyped_storage().data_ptr()))
    seen = {key: (nbytes, shape, dtype) for key, (ref, nbytes, shape, dtype) in created.items()
            if not ref.expired() and key not in skip and nbytes >= MIN_ACTIVATION_BYTES}  # fmt: skip
    return out, seen


class _Layers(nn.Module):
    """The ``layers`` dict ``apply_ac`` walks, holding one block."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.layers = nn.ModuleDict({"0": block})


def training_block(
    block: nn.Module, save_list: set, mode: str = "op", recompute: str = "none", compiled: bool = True
) -> nn.Module:
    """``block`` as training wraps it: activation checkpointing ``mode`` (``op``: selective AC with ``save_list``;
    ``full``; a number: selective every N-th block; ``none``), the ``[ratplus] recompute`` option for RAT+
    blocks (``apply_ratplus_ac``; torchtitan's ``apply_ac`` for llama3), then compile unless not ``compiled``."""
    holder = _Layers(block)
    ac_config = ActivationCheckpoint(
        mode="selective" if mode == "op" or mode.isdigit() else mode,
        selective_ac_option=mode if mode != "full" else "op",
    )
    if isinstance(block, RATPlusBlock):
        apply_ratplus_ac(
            holder, ac_config, recompute, model_compile_enabled=compiled, save_list=save_list | {CPU_FLASH}
        )
    elif mode != "none":
        apply_ac(holder, ac_config, model_compile_enabled=compiled, op_sac_save_list=save_list | {CPU_FLASH})
    block = holder.layers["0"]
    if not compiled:
        return block
    torch._dynamo.reset()  # blocks of one class and shape would reuse a graph traced under another AC policy
    return torch.compile(block, backend="aot_eager_decomp_partition", fullgraph=True)


@functools.cache
def measure(
    kind: str, device: torch.device, pattern: Pattern | None = None, mode: str = "op", recompute: str = "none",
    compiled: bool = True,
) -> dict:  # fmt: skip
    """Saved storages and gradients of one training step of one bf16 block (RAT+, attention, llama3) on ``device``,
    wrapped by ``training_block``."""
    torch.manual_seed(0)
    if kind == "llama3":
        args = TransformerModelArgs(dim=DIM, n_layers=1, n_heads=HEADS, n_kv_heads=HEADS, vocab_size=64,
                                    multiple_of=LLAMA3_MULTIPLE_OF, max_seq_len=SEQ)  # fmt: skip
        block = TransformerBlock(0, args).to(device, torch.bfloat16)
        table, extra, save_list = precompute_freqs_cis(HEAD_DIM, SEQ, args.rope_theta), (None,), llama3_sac_save_list
        hidden = block.feed_forward.w1.out_features
    else:
        args = RATPlusModelArgs(dim=DIM, n_layers=1, n_heads=HEADS, vocab_size=64, max_seq_len=SEQ,
                                apply_re=kind == "ratplus", attention_backend="triton")  # fmt: skip
        block = RATPlusBlock(args, 0).to(device, torch.bfloat16)
        table, extra, save_list = rope_cache(HEAD_DIM, SEQ, args.rope_theta), (pattern,), sac_save_list()
        hidden = block.ffn.fc1.out_features
    table = table.to(device)
    params = list(block.parameters())
    step = training_block(block, save_list, mode, recompute, compiled)
    u = torch.randn(BATCH, SEQ, DIM, dtype=torch.bfloat16).to(device).requires_grad_(True)
    out, seen = (saved_storages if compiled else kept_storages)(step, [*params, table], u, table, *extra)
    out.float().square().sum().backward()
    grads = [u.grad, *(p.grad for p in params)]
    return {"seen": seen, "grads": grads, "expected": expected_saved(kind, BATCH, SEQ, DIM, HEADS, hidden),
            "hidden": hidden}  # fmt: skip


def describe(seen: dict[tuple, tuple]) -> str:
    row = BATCH * SEQ * DIM * BF16
    return ", ".join(f"{shape} {dtype} ({nbytes / row:.2f} rows)" for nbytes, shape, dtype in seen.values())


@pytest.fixture
def triton_recurrence(monkeypatch):
    """The model's recurrence goes to the Triton op on either device (on the CPU the model would send its
    tensors to the reference); interpreted, it scans whole slices at a time (same order). Other modules
    import this one by name and request it per test: an imported autouse fixture would apply to every test
    there, CPU-tensor tests included, which the compiled op refuses on a GPU machine."""
    monkeypatch.setattr(model_module, "gated_recurrence", recurrence_triton.recurrence_triton)
    if isinstance(recurrence_triton._scan_fwd_kernel, interpreter.InterpretedFunction):
        monkeypatch.setattr(interpreter.ScanOps, "generic_scan", _vectorized_scan)


@pytest.fixture(autouse=True)
def _every_test_here_uses_the_triton_recurrence(triton_recurrence):
    """Every test of this module measures the Triton recurrence (``triton_recurrence``)."""


# ----------------------------------------------------------------------------------------------
# the checks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, pattern",
    [("ratplus", None), ("ratplus", Pattern(16)), ("attention", None)],
    ids=["ratplus-dense", "ratplus-d16-triton", "attention-dense"],
)
def test_block_keeps_no_more_than_the_accounting(kind, pattern, device):
    """Dense is SDPA; ``d16`` is the Triton pattern attention (joint training's sparse phase)."""
    result = measure(kind, device, pattern)
    saved = sum(nbytes for nbytes, _, _ in result["seen"].values())
    bound = sum(result["expected"].values())
    assert saved <= bound, (
        f"{kind} block keeps {saved} bytes for backward, the accounting allows {bound} "
        f"({rows_per_token(result['expected'], BATCH, SEQ, DIM):.2f} rows a token: {result['expected']}); "
        f"kept: {describe(result['seen'])}"
    )


def test_llama3_block_keeps_exactly_its_accounting(device):
    """The baseline of the ratio below: torchtitan's llama3 block, its own save list."""
    result = measure("llama3", device)
    sizes = sorted(nbytes for nbytes, _, _ in result["seen"].values())
    assert sizes == sorted(result["expected"].values()), describe(result["seen"])


def test_ratplus_over_llama3_within_the_accounted_ratio(device):
    """RAT+ / llama3 saved bytes at this shape stay within the ratio of their tensor lists (11.03 / 7.03 here)."""
    ratplus, llama3 = measure("ratplus", device), measure("llama3", device)
    ratio = sum(n for n, _, _ in ratplus["seen"].values()) / sum(n for n, _, _ in llama3["seen"].values())
    bound = sum(ratplus["expected"].values()) / sum(llama3["expected"].values())
    assert ratio <= bound + 1e-9, f"RAT+ keeps {ratio:.3f}x llama3's saved bytes, the accounting allows {bound:.3f}x"


def test_recomputing_fc1_keeps_llama3s_footprint(device):
    """``[ratplus] recompute = "fc1"`` (bench variant ``ratplus_fc1_recompute``): fc1 recomputed, 4 rows fewer."""
    result = measure("ratplus", device, recompute="fc1")
    expected = {name: n for name, n in result["expected"].items() if name != "fc1 output"}
    sizes = sorted(nbytes for nbytes, _, _ in result["seen"].values())
    assert sizes == sorted(expected.values()), describe(result["seen"])


def test_recomputing_the_scan_gives_the_gradients_of_keeping_everything(device):
    """Selective AC reruns the scan in backward: the gradients equal those of the same compiled block without AC.

    Bit for bit on the CPU. On the GPU the scan's look-back (a chunk folds whichever earlier states are
    published when it looks) sums in a run-dependent order: the bf16 gradients then agree to a bf16 ulp
    or two (2^-6 of each value, or 2^-8 of the largest where a value is near 0).
    """
    with_ac, without_ac = measure("ratplus", device), measure("ratplus", device, mode="none")
    for a, b in zip(with_ac["grads"], without_ac["grads"], strict=True):
        if device.type == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=2**-6, atol=2**-8 * b.abs().max().item())


def test_scan_op_keeps_its_inputs_and_chunk_states_only(device):
    """Without AC the Triton scan saves ``f, k, x`` and the fp32 state at each chunk end, no fp32 state per step."""
    gen = torch.Generator().manual_seed(3)
    f, k, x = (
        torch.randn(BATCH, SEQ, HEADS, HEAD_DIM, generator=gen, dtype=torch.bfloat16).to(device).requires_grad_()
        for _ in range(3)
    )
    (key_states, value_states), seen = saved_storages(recurrence_triton.recurrence_triton, [], f, k, x)
    chunk = recurrence_triton.default_tiles(SEQ, HEADS, HEAD_DIM, torch.bfloat16)[0]
    chunk_states = math.ceil(SEQ / chunk) * 2 * BATCH * DIM * FP32
    assert sorted(nbytes for nbytes, _, _ in seen.values()) == sorted([f.nbytes, k.nbytes, x.nbytes, chunk_states])
    (key_states.sum() + value_states.sum()).backward()
    assert all(t.grad is not None for t in (f, k, x))
