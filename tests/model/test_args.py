"""Flavors and validation of the model args."""

import pytest
import torch

from ratplus_titan.model import RATPlusModel, RATPlusModelArgs, ratplus_flavors
from ratplus_titan.pattern import Pattern


def count_by_formula(args: RATPlusModelArgs) -> int:
    """Per layer: in_proj 5d^2 (4d^2 without recurrence), out_proj d^2, FFN 8d^2, two norms; tied embedding."""
    d = args.dim
    per_layer = (5 if args.apply_re else 4) * d * d + d * d + 2 * args.ffn_multiplier * d * d + 2 * d
    return args.n_layers * per_layer + args.vocab_size * d + d


@pytest.mark.parametrize("flavor,paper_count", [("1B", 1.47e9), ("3B", 2.65e9), ("7B", 7.65e9)])
def test_parameter_counts_match_the_paper(flavor, paper_count):
    args = ratplus_flavors[flavor]
    with torch.device("meta"):
        model = RATPlusModel(args)
    nparams = sum(p.numel() for p in model.parameters())
    assert nparams == count_by_formula(args)
    assert abs(nparams - paper_count) / paper_count < 0.01


def test_debug_flavor_builds():
    with torch.device("meta"):
        model = RATPlusModel(ratplus_flavors["debugmodel"])
    assert sum(p.numel() for p in model.parameters()) == count_by_formula(ratplus_flavors["debugmodel"])


def test_unknown_flavor_names_allowed_values():
    with pytest.raises(KeyError, match="model.flavor='2B' is unknown: allowed values are debugmodel, 50M, 125M, 1B, 3B, 7B"):
        ratplus_flavors["2B"]


@pytest.mark.parametrize("kwargs,match", [
    ({"dilation": 0}, "dilation=0 is invalid"),
    ({"dilation": -4}, "dilation=-4 is invalid"),
    ({"local_window": -1}, "local_window=-1"),
    ({"sinks": -2}, "sinks=-2"),
    ({"dilation": [1, 16]}, "dilation has 2 values but the model has 4 layers"),
    ({"attention_backend": "cuda"}, "attention_backend='cuda' is invalid"),
    ({"n_heads": 3}, "not divisible"),
])
def test_bad_values_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RATPlusModelArgs(dim=64, n_layers=4, n_heads=kwargs.pop("n_heads", 4), **kwargs)


def test_seq_len_the_pattern_cannot_serve():
    args = RATPlusModelArgs(dim=64, n_layers=2, n_heads=4, dilation=16)
    args.check_seq_len(16)
    with pytest.raises(ValueError, match="training.seq_len=8 cannot serve pattern d16w0s0"):
        args.check_seq_len(8)
    with pytest.raises(ValueError, match="seq_len=8 cannot serve pattern d64w0s0"):
        RATPlusModelArgs(dim=64, n_layers=2, n_heads=4).check_seq_len(8, (Pattern(64),))


def test_flops_count_real_attention_pairs():
    """Sparse patterns must count fewer attention FLOPs; matmul FLOPs are 6 per weight."""
    args = RATPlusModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=100)
    with torch.device("meta"):
        model = RATPlusModel(args)
    seq_len = 256
    nparams, dense = args.get_nparams_and_flops(model, seq_len)
    _, sparse = args.get_nparams_and_flops(model, seq_len, [Pattern(64)] * 2)
    matmul = 6 * (nparams - (2 * args.n_layers + 1) * args.dim)
    recurrence = 3 * 10 * args.dim * args.n_layers
    # Dense causal: the average query sees (T + 1) / 2 keys; 4d FLOPs a pair forward, x3 for training.
    assert dense == int(matmul + recurrence + 3 * 4 * args.dim * (seq_len + 1) / 2 * args.n_layers)
    pairs = sum(1 + sum(1 for j in range(t) if (j + 1) % 64 == 0) for t in range(seq_len)) / seq_len
    assert sparse == int(matmul + recurrence + 3 * 4 * args.dim * pairs * args.n_layers)
