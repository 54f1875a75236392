"""The guard of ``tests/conftest.py``: ``tests/global_state.py`` sees each kind of change and puts it back."""

import os

import torch

from tests import global_state


def test_changes_are_listed_and_restored():
    before = global_state.snapshot()
    assert global_state.changes(before, global_state.snapshot()) == []
    torch.set_float32_matmul_precision("high")  # also turns allow_tf32 on
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_default_dtype(torch.float64)
    os.environ["TRITON_INTERPRET"] = "0" if os.environ.get("TRITON_INTERPRET") == "1" else "1"
    try:
        changed = {line.split(":")[0] for line in global_state.changes(before, global_state.snapshot())}
    finally:
        global_state.restore(before)
    assert changed == {
        "torch.get_float32_matmul_precision()",
        "torch.backends.cuda.matmul.allow_tf32",
        "deterministic algorithms (on, warn_only)",
        "torch.get_default_dtype()",
        "$TRITON_INTERPRET",
    }
    assert global_state.changes(before, global_state.snapshot()) == []


def test_kernel_settings_are_restored_in_place():
    from ratplus_titan.kernels import pattern_attention_triton as pat

    overrides = pat.CONFIG_OVERRIDE
    before = global_state.snapshot()
    overrides["fwd"] = (16, 16, 1, 1)
    pat.FAR_SPLIT_TILES = 3
    try:
        changed = global_state.changes(before, global_state.snapshot())
    finally:
        global_state.restore(before)
    assert len(changed) == 2 and pat.CONFIG_OVERRIDE is overrides and "fwd" not in overrides
    assert pat.FAR_SPLIT_TILES is None
