"""``bench/decode.py``: a CPU smoke run of the kernel phase (Triton interpreter) writes both kernels' rows."""

from __future__ import annotations

import json

from bench import decode, readme_tables


def test_cpu_kernel_phase_times_both_kernels_for_every_pattern(tmp_path):
    argv = ["--device", "cpu", "--phases", "kernel", "--kernel-contexts", "32", "--kernel-batch", "1", "--out", str(tmp_path)]
    assert decode.main(argv) == 0
    data = json.loads((tmp_path / "decode_cpu.json").read_text())
    rows = data["kernel"]
    assert [(r["pattern"], r["variant"]) for r in rows] == [(p, k) for p in decode.PATTERNS for k in ("split", "flat")]
    for row in rows:
        assert "error" not in row and row["ms"] > 0, row
        assert row["context"] == 32 and row["batch"] == 1
        assert row["bytes_read"] == 2 * 1 * 16 * row["rows"] * 128 * 2  # keys and values, bf16
        assert "graph_ms" not in row  # CUDA graphs only on the GPU
    assert readme_tables.kernel_rows(data) == []  # so no README rows from a CPU run
