"""``bench/kernels.py``: a smoke run of the attention bench feeds the README table (on the GPU when there is one,
else on the CPU in Triton's interpreter: ``tests/device.py``)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from bench import attention_tiles, common, kernels, readme_tables


def test_speedups_are_over_the_sdpa_rows_of_the_same_length():
    rows = [
        {"T": 8, "method": "sdpa_dense", "pattern": "dense", "fwd_ms": 6.0, "bwd_ms": 12.0},
        {"T": 8, "method": "sdpa_flash", "pattern": "dense", "fwd_ms": 4.0, "bwd_ms": 8.0},
        {"T": 16, "method": "sdpa_dense", "pattern": "dense", "fwd_ms": 60.0, "bwd_ms": 120.0},
        {"T": 8, "method": "triton", "pattern": "d16w256s4", "fwd_ms": 2.0, "bwd_ms": 3.0},
        {"T": 16, "method": "triton", "pattern": "d16w256s4", "error": "OOM"},
    ]
    kernels.add_speedups(rows)
    ours = rows[3]
    assert (ours["fwd_speedup_vs_dense"], ours["bwd_speedup_vs_dense"]) == (3.0, 4.0)
    assert (ours["fwd_speedup_vs_flash"], ours["bwd_speedup_vs_flash"]) == (2.0, 8 / 3)
    assert "fwd_speedup_vs_dense" not in rows[4] and "fwd_speedup_vs_dense" not in rows[0]


def test_fwdbwd_speedups_and_the_issue_targets():
    rows = [
        {"T": 16384, "method": "sdpa_dense", "pattern": "dense", "fwd_ms": 2.0, "bwd_ms": 5.0, "fwdbwd_ms": 7.0},
        {"T": 16384, "method": "triton", "pattern": "d16w256s4", "fwd_ms": 0.4, "bwd_ms": 0.8, "fwdbwd_ms": 1.0},
        {"T": 16384, "method": "triton", "pattern": "d64w256s4", "fwd_ms": 0.25, "bwd_ms": 0.7, "fwdbwd_ms": 1.0},
        {"T": 65536, "method": "sdpa_dense", "pattern": "dense", "fwd_ms": 30.0, "bwd_ms": 80.0, "fwdbwd_ms": 110.0},
        {"T": 65536, "method": "triton", "pattern": "d16w256s4", "fwd_ms": 2.0, "bwd_ms": 9.0, "fwdbwd_ms": 11.0},
    ]
    kernels.add_speedups(rows)
    assert rows[1]["fwdbwd_speedup_vs_dense"] == 7.0 and rows[2]["bwd_speedup_vs_dense"] == 5.0 / 0.7
    summary = {(s["part"], s["T"], s["pattern"]): (s["target"], s["met"]) for s in kernels.attention_summary(rows)}
    assert summary == {
        ("fwdbwd", 16384, "d16w256s4"): (6.0, True),  # 7 / 1.0 = 7x
        ("fwdbwd", 16384, "d64w256s4"): (8.0, False),  # 7x
        ("fwd", 65536, "d16w256s4"): (12.0, True),  # 30 / 2 = 15x
    }


def test_tile_model_makespan_and_split_counts():
    # 1 slot: 3 + 1 and 1 + 1 (each program costs one more for its own loads and stores)
    assert attention_tiles.makespan([3, 1], programs_bh=1, slots=1) == 6.0
    assert attention_tiles.makespan([3, 1], programs_bh=2, slots=2) == 6.0
    rows = attention_tiles.count(16384, "d64w256s4", heads=16, sms=132)
    for row in rows.values():  # no schedule beats the longest program or the total work over the slots
        assert row["makespan"] >= row["longest"]
    assert rows["far"]["total"] >= rows["compact"]["total"]  # splitting adds no tiles but the cut ones
    assert rows["far"]["programs"] >= 4 * 132 and rows["far"]["longest"] < rows["compact"]["longest"] / 10


def test_small_attention_run_writes_the_rows_the_readme_table_reads(tmp_path, monkeypatch, device):
    argv = ["attention", "--device", device.type, "--seq-lens", "64", "--heads", "2", "--out", str(tmp_path)]
    assert kernels.main(argv) == 0
    name = f"kernels_{common.device_slug(device.type)}.json"
    data = json.loads((tmp_path / name).read_text())
    if device.type == "cpu":
        assert data["env"]["device"] == "cpu" and data["copy_GBps"] is None
    else:
        assert data["env"]["device"] == torch.cuda.get_device_name() and data["copy_GBps"] > 0
    rows = data["attention"]["rows"]
    assert {(r["method"], r["pattern"]) for r in rows} == {
        ("sdpa_dense", "dense"), ("sdpa_flash", "dense"), ("triton", "d16w256s4"), ("triton", "d64w256s4"),
    }  # fmt: skip
    for row in rows:
        assert row["T"] == 64 and math.isfinite(row["fwd_ms"]) and row["fwd_ms"] > 0 and row["bwd_ms"] > 0, row
        assert row["fwdbwd_ms"] > 0, row
        if row["method"] == "triton":  # checked against the fp32 reference at this length
            check = row["check_vs_fp32_reference"]
            assert check["finite"] and max(check[k] for k in ("out", "dq", "dk", "dv")) < 2e-2, check

    monkeypatch.setattr(readme_tables, "RESULTS", tmp_path)
    monkeypatch.setitem(readme_tables.SOURCES, "attention", name)
    table = readme_tables.attention()
    assert f"`{name}`" in table[0]
    dense = next(r for r in rows if r["method"] == "sdpa_dense")
    flash = next(r for r in rows if r["method"] == "sdpa_flash")
    ours = {r["pattern"]: r for r in rows if r["method"] == "triton"}
    cells = [f"{dense[k] / ours[p][k]:.1f}x ({flash[k] / ours[p][k]:.1f}x)" for p in ("d16w256s4", "d64w256s4")
             for k in ("fwd_ms", "bwd_ms")]  # fmt: skip
    assert table[-1] == "| 64 | " + " | ".join(cells) + " |"


def test_variants_time_and_check_the_triton_rows_under_their_settings_then_restore_the_defaults(tmp_path, monkeypatch, device):
    from ratplus_titan.kernels import pattern_attention_triton as pat

    waves = pat.FAR_WAVES  # the default
    seen = []  # the launch settings in force whenever a row is timed
    timer = kernels.time_attention

    def spy(method, *args):
        seen.append((method, dict(pat.CONFIG_OVERRIDE), pat.FAR_SPLIT_TILES, pat.FAR_WAVES))
        return timer(method, *args)

    monkeypatch.setattr(kernels, "time_attention", spy)
    variants = "dkdv=16x32x1x1,far_split=1;dq=32x16x1x1,far_waves=2"
    argv = ["attention", "--device", device.type, "--seq-lens", "64", "--heads", "2", "--methods", "sdpa_dense,triton",
            "--variants", variants, "--out", str(tmp_path)]  # fmt: skip
    assert kernels.main(argv) == 0
    rows = json.loads((tmp_path / f"kernels_{common.device_slug(device.type)}.json").read_text())["attention"]["rows"]
    names = [None, "dkdv=16x32x1x1,far_split=1", "dq=32x16x1x1,far_waves=2"]
    triton_rows = [r for r in rows if r["method"] == "triton"]
    assert [(r["pattern"], r.get("variant")) for r in triton_rows] == [(p, n) for p in ("d16w256s4", "d64w256s4") for n in names]
    for row in triton_rows:  # every variant timed, checked against the fp32 reference, compared with SDPA
        check = row["check_vs_fp32_reference"]
        assert check["finite"] and max(check[k] for k in ("out", "dq", "dk", "dv")) < 2e-2, row
        assert row["fwdbwd_speedup_vs_dense"] > 0
    settings = [s for s in seen if s[0] == "triton"]
    expected = [({}, None, waves), ({"dkdv": (16, 32, 1, 1)}, 1, waves), ({"dq": (32, 16, 1, 1)}, None, 2)]
    assert [s[1:] for s in settings] == expected * 2
    assert pat.CONFIG_OVERRIDE == {} and (pat.FAR_SPLIT_TILES, pat.FAR_WAVES) == (None, waves)  # restored
    summary = json.loads((tmp_path / f"kernels_{common.device_slug(device.type)}.json").read_text())["attention"]["targets"]
    assert all("variant" not in s for s in summary)


@pytest.mark.parametrize(
    "text,message",
    [
        ("dkdv=64x64x4", "BMxBNxWARPSxSTAGES"),
        ("dq=48x64x4x3", "powers of two"),
        ("fwd=8x64x4x3", "BM and BN >= 16"),
        ("far_split=0", "positive integers"),
        ("tiles=64x64x4x3", "allowed keys are fwd, dq, dkdv, far_split, far_waves, far_min_tiles"),
    ],
)
def test_a_bad_variant_names_the_key_and_the_allowed_values(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        kernels.attention_variants(f"far_waves=2;{text}")
