"""A tiny exported RAT+ model (fp32, LLaMA-2 tokenizer) shared by the evaluation tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ratplus_titan.adapters.layout import save_export
from ratplus_titan.data.tokenizer import DEFAULT_TOKENIZER
from ratplus_titan.model.args import RATPlusModelArgs
from ratplus_titan.model.model import RATPlusModel

TINY = dict(dim=32, n_layers=2, n_heads=2, vocab_size=32000, max_seq_len=128)
PATTERN = dict(dilation=4, local_window=8, sinks=2)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """Random weights, adapted for d4w8s2, saved in fp32 with the shipped tokenizer."""
    torch.manual_seed(0)
    args = RATPlusModelArgs(**TINY, **PATTERN)
    model = RATPlusModel(args)
    model.init_weights()
    out = tmp_path_factory.mktemp("tiny_export")
    save_export(out, model.state_dict(), args, dtype="float32", tokenizer_path=DEFAULT_TOKENIZER)
    return out


@pytest.fixture(autouse=True)
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield
    torch.set_num_threads(threads)
