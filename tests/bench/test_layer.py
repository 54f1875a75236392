"""``bench/layer.py``: the CPU smoke run, and that its two layers differ by the recurrence only."""

from __future__ import annotations

import dataclasses
import json
import math

import torch

from bench import layer as bench_layer
from ratplus_titan.model.flavors import ratplus_flavors


def layer_params(dim: int, apply_re: bool) -> int:
    """From the dims alone (DESIGN §1): RMSNorm scale d, in_proj d -> 5d (4d without f), out_proj d -> d."""
    return dim + (5 if apply_re else 4) * dim * dim + dim * dim


def test_tiny_cpu_run_writes_both_layers_with_finite_positive_times(tmp_path):
    assert (
        bench_layer.main(["--device", "cpu", "--tiny", "--rounds", "1", "--out", str(tmp_path), "--deadline", "300"])
        == 0
    )
    data = json.loads((tmp_path / "layer_cpu.json").read_text())
    assert data["tiny"] and data["shape"]["seq_len"] == 64 and not data["skipped"] and "errors" not in data
    dense = {row["layer"]: row for row in data["rows"] if row["mode"] == "eager" and row["pattern"] == "dense"}
    assert set(dense) == {"ratplus", "baseline"}
    for row in data["rows"]:
        for key in ("fwd_ms", "fwd_bwd_ms"):
            assert math.isfinite(row[key]) and row[key] > 0, row
    assert any(row["pattern"] != "dense" and row["layer"] == "ratplus" for row in data["rows"])  # a sparse extra row
    ratio = data["ratios"]["eager"]
    assert math.isclose(ratio["fwd_bwd"], dense["ratplus"]["fwd_bwd_ms"] / dense["baseline"]["fwd_bwd_ms"])
    assert data["parts"]["scan_fwd_bwd_ms"] > 0
    # the two benchmarked layers: the recurrence is all that tells them apart
    dim = data["shape"]["dim"]
    layers = data["layers"]
    assert layers["ratplus"]["apply_re"] and not layers["baseline"]["apply_re"]
    assert layers["ratplus"]["attention_backend"] == layers["baseline"]["attention_backend"]
    assert layers["ratplus"]["pattern"] == layers["baseline"]["pattern"] == "dense"
    assert layers["ratplus"]["params"] == layer_params(dim, True)
    assert layers["baseline"]["params"] == layer_params(dim, False)
    assert layers["ratplus"]["params"] - layers["baseline"]["params"] == dim * dim
    check = data["equivalence_check"]
    assert check["ok"] and check["params_differing_in_shape"] == ["in_proj.weight"]


def test_1b_layers_are_the_flavor_with_only_apply_re_flipped():
    flavor = ratplus_flavors["1B"]
    ratplus, baseline = bench_layer.layer_args(False, True), bench_layer.layer_args(False, False)
    fields = [
        f.name for f in dataclasses.fields(flavor) if f.init and f.name not in ("n_layers", "max_seq_len", "apply_re")
    ]
    for name in fields:
        assert getattr(ratplus, name) == getattr(baseline, name) == getattr(flavor, name), name
    assert ratplus.apply_re and not baseline.apply_re
    assert ratplus.max_seq_len == baseline.max_seq_len == 4096
    assert ratplus.patterns[0] == baseline.patterns[0] and ratplus.patterns[0].is_dense
    # parameter counts of the real 1B modules against the dims
    dim = flavor.dim
    for args in (ratplus, baseline):
        layer = bench_layer.build_layer(args, "cpu", torch.float32)
        assert sum(p.numel() for p in layer.parameters()) == layer_params(dim, args.apply_re)
    assert layer_params(dim, True) - layer_params(dim, False) == bench_layer.recurrence_param_count(dim) == 2048 * 2048


def test_identity_recurrence_makes_the_ratplus_layer_the_baseline():
    """With the forget-gate rows ignored (K = k, V = x) and shared weights, both layers compute the same."""
    report = bench_layer.check_only_recurrence_differs(dim=64, n_heads=4, seq_len=16, device="cpu")
    assert report["ok"], report
    assert report["identity_recurrence_rel_err"] < 1e-6
    assert report["real_recurrence_rel_change"] > 0.05
    assert report["in_proj_rows"] == [5 * 64, 4 * 64]
