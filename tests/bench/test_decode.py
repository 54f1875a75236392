"""``bench/decode.py``: a smoke run of the kernel phase writes both kernels' rows (on the GPU when there is
one, with CUDA-graph timings; else on the CPU in Triton's interpreter: ``tests/device.py``)."""

from __future__ import annotations

import json

from bench import common, decode, readme_tables


def test_kernel_phase_times_both_kernels_for_every_pattern(tmp_path, device):
    argv = ["--device", device.type, "--phases", "kernel", "--kernel-contexts", "32", "--kernel-batch", "1",
            "--out", str(tmp_path)]  # fmt: skip
    assert decode.main(argv) == 0
    data = json.loads((tmp_path / f"decode_{common.device_slug(device.type)}.json").read_text())
    rows = data["kernel"]
    assert [(r["pattern"], r["variant"]) for r in rows] == [(p, k) for p in decode.PATTERNS for k in ("split", "flat")]
    on_gpu = device.type == "cuda"
    for row in rows:
        assert "error" not in row and row["ms"] > 0, row
        assert row["context"] == 32 and row["batch"] == 1
        assert row["bytes_read"] == 2 * 1 * 16 * row["rows"] * 128 * 2  # keys and values, bf16
        assert ("graph_ms" in row) == on_gpu  # CUDA graphs only on the GPU
        if on_gpu:
            assert row["graph_ms"] > 0 and row["graph_fraction_of_copy_bw"] > 0, row
    assert readme_tables.kernel_rows(data) == (rows if on_gpu else [])  # no README rows from a CPU run
