"""Tile counts of the pattern-attention kernels: grid, tile iterations per program, critical path, makespan.

No GPU: the loop bounds of each kernel of ``kernels/pattern_attention_triton.py`` are spelled out here in
Python (``*_programs`` below mirror the kernels' ``tl.range`` bounds; keep them in step), for the old
backward (``compact`` + ``local``: the code before the far/near split) and the new one (``far`` + ``near``).
Per kernel it prints the grid (programs), the longest program in tile iterations (the critical path: one
program runs on one SM, its loop is serial), the total tile iterations, and the makespan of a greedy
in-order dispatch of the programs onto ``--sms`` slots (one program per SM for the backward tiles, two for
the forward's). Sink tiles count as whole tiles (an overestimate: they are ``BLOCK_S`` rows).

``--fit`` fits ``bwd_ms = t_dq * makespan_dq + t_dkdv * (makespan_compact + makespan_local) + c`` to the
H100 backward times of the old code in ``bench/results/attention_H100.json`` and predicts the new
backward with the same per-iteration times. Output: the table of ``kernels/NOTES_pattern_attention.md``.
"""

from __future__ import annotations

import argparse
import heapq
import json
from pathlib import Path

import numpy as np

from bench import common

common.import_without_train_spec()

SLOTS_PER_SM = {"fwd": 2, "dq": 1, "compact": 1, "local": 1, "far": 1, "near": 1}


def kernels_module():
    """The kernel module (imported on first use: importing triton early would keep the interpreter tests
    of tests/kernels from running in the same process)."""
    from ratplus_titan.kernels import pattern_attention_triton

    return pattern_attention_triton


def tiles(kind: str) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of bf16 at hd=128 (``_GPU_CONFIGS[kind][128]``)."""
    return kernels_module()._GPU_CONFIGS[kind][128][:2]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def n_tiles(lo: int, hi: int, step: int) -> int:
    """Iterations of ``tl.range(lo, hi, step)``."""
    return max(0, cdiv(hi - lo, step))


def query_block_programs(seq_len, dilation, window, sinks, block_m, block_n, block_s) -> list[int]:
    """Forward / dQ: one program per query block, heaviest first (``_query_block_ranges``)."""
    pat = kernels_module()
    d, r_lo, _, has_dil = pat._pattern_args(dilation, window, sinks, seq_len)
    out = []
    for i in reversed(range(cdiv(seq_len, block_m))):
        m0, m1 = i * block_m, min(i * block_m + block_m, seq_len)
        r_hi = max(m1 - 1 - window, 0) // d
        r_full = max(m0 - window, 0) // d
        mid = r_lo + (max(r_full - r_lo, 0) // block_n) * block_n
        lo = max(m0 - window, 0)
        lo = 0 if lo <= sinks else lo
        s_hi = sinks if lo > 0 else 0
        a = min(lo + cdiv(max(m1 - 1 - window - lo, 0), block_n) * block_n, m1)
        b = a + (max(m0 + 1 - a, 0) // block_n) * block_n
        tiles = n_tiles(0, s_hi, block_s) + n_tiles(lo, a, block_n) + n_tiles(a, b, block_n) + n_tiles(b, m1, block_n)
        if has_dil:
            tiles += n_tiles(r_lo, mid, block_n) + n_tiles(mid, r_hi, block_n)
        out.append(tiles)
    return out


def compact_programs(seq_len, dilation, window, sinks, block_m, block_n) -> list[int]:
    """Old ``_bwd_compact_kernel``: one program per block of compact rows over all its queries."""
    pat = kernels_module()
    d, r_lo, num_rows, has_dil = pat._pattern_args(dilation, window, sinks, seq_len)
    out = []
    for r0 in range(r_lo, num_rows if has_dil else r_lo, block_n):
        lo = r0 * d + d + window
        a = min(lo + cdiv((block_n - 1) * d, block_m) * block_m, seq_len) if r0 + block_n <= num_rows else seq_len
        b = a + ((seq_len - a) // block_m) * block_m
        out.append(n_tiles(lo, a, block_m) + n_tiles(a, b, block_m) + n_tiles(b, seq_len, block_m))
    return out


def local_programs(seq_len, window, sinks, block_m, block_n) -> list[int]:
    """Old ``_bwd_local_kernel``: a sink block loops over all T queries."""
    out = []
    for n0 in range(0, seq_len, block_n):
        hi = seq_len if n0 < sinks else min(seq_len, n0 + block_n + window)
        a = min(n0 + cdiv(block_n - 1, block_m) * block_m, hi) if n0 + block_n <= seq_len else hi
        full = hi - a if n0 + block_n <= sinks else min(max(n0 + window + 1 - a, 0), hi - a)
        b = a + (full // block_m) * block_m
        out.append(n_tiles(n0, a, block_m) + n_tiles(a, b, block_m) + n_tiles(b, hi, block_m))
    return out


def far_programs(seq_len, dilation, window, sinks, block_m, block_n, programs_bh, sms) -> tuple[list[int], int]:
    """New ``_bwd_far_kernel``: (tiles of each (split, block) program in launch order, number of splits)."""
    pat = kernels_module()
    d, r_lo, _, _ = pat._pattern_args(dilation, window, sinks, seq_len)
    num_far = pat.far_rows(dilation, sinks, seq_len)
    split_len = pat.far_split_len(seq_len, d, window, sinks, r_lo, num_far, block_m, block_n, programs_bh, sms)
    num_splits = cdiv(seq_len, split_len)
    out = []
    for s in range(num_splits):
        for f0 in range(0, num_far, block_n):
            lo = (pat.far_position(f0, d, sinks, r_lo) + window + 1) // block_m * block_m
            q0, q1 = max(lo, s * split_len), min(seq_len, (s + 1) * split_len)
            if q0 >= q1:
                out.append(0)
                continue
            last = pat.far_position(f0 + block_n - 1, d, sinks, r_lo)
            a = cdiv(last + window + 1, block_m) * block_m if f0 + block_n <= num_far else q1
            a = min(max(a, q0), q1)
            b = a + ((q1 - a) // block_m) * block_m
            out.append(n_tiles(q0, a, block_m) + n_tiles(a, b, block_m) + n_tiles(b, q1, block_m))
    return out, num_splits


def near_programs(seq_len, window, block_m, block_n) -> list[int]:
    """New ``_bwd_near_kernel``: queries within W of each key block only."""
    out = []
    for n0 in range(0, seq_len, block_n):
        hi = min(seq_len, n0 + block_n + window)
        a = min(n0 + cdiv(block_n - 1, block_m) * block_m, hi) if n0 + block_n <= seq_len else hi
        b = a + (min(max(n0 + window + 1 - a, 0), hi - a) // block_m) * block_m
        out.append(n_tiles(n0, a, block_m) + n_tiles(a, b, block_m) + n_tiles(b, hi, block_m))
    return out


def makespan(programs: list[int], programs_bh: int, slots: int, overhead: float = 1.0) -> float:
    """Tile iterations until the last program ends: programs dispatched in launch order (B*H fastest) to
    the first free slot; each nonempty program costs ``overhead`` more (loads of its own tile, stores)."""
    free = [0.0] * slots
    for tiles in programs:
        for _ in range(programs_bh):
            start = heapq.heappop(free)
            heapq.heappush(free, start + (tiles + overhead if tiles else 0.1))
    return max(free)


def count(seq_len: int, spec: str, heads: int, sms: int) -> dict:
    """Per kernel: programs, longest program, total tile iterations, makespan (tile iterations)."""
    from ratplus_titan.pattern import Pattern

    pat = kernels_module()
    p = Pattern.parse(spec)
    dilation, window, sinks = p.dilation, p.local_window, p.sinks
    (fm, fn), (qm, qn), (km, kn) = tiles("fwd"), tiles("dq"), tiles("dkdv")
    far, num_splits = far_programs(seq_len, dilation, window, sinks, km, kn, heads, sms)
    kernels = {
        "fwd": query_block_programs(seq_len, dilation, window, sinks, fm, fn, pat._sink_block(sinks, fn)),
        "dq": query_block_programs(seq_len, dilation, window, sinks, qm, qn, pat._sink_block(sinks, qn)),
        "compact": compact_programs(seq_len, dilation, window, sinks, km, kn),
        "local": local_programs(seq_len, window, sinks, km, kn),
        "far": far,
        "near": near_programs(seq_len, window, km, kn),
    }
    rows = {}
    for name, programs in kernels.items():
        rows[name] = {
            "programs": heads * sum(1 for t in programs if t),
            "longest": max(programs, default=0),
            "total": heads * sum(programs),
            "makespan": makespan(programs, heads, sms * SLOTS_PER_SM[name]),
        }
    rows["far"]["splits"] = num_splits
    return rows


def fit(measured: list[tuple[dict, float]], dq_ratio: float | None = None) -> tuple[float, float, float]:
    """Least squares ``bwd_ms = t_dq * dq + t_dkdv * (compact + local) + c`` (ms per tile iteration);
    ``dq_ratio``: fix ``t_dq = dq_ratio * t_dkdv`` (e.g. 3 / 4: a dQ tile has 3 dots, a dK/dV tile 4)."""
    dq = np.array([r["dq"]["makespan"] for r, _ in measured])
    dkdv = np.array([r["compact"]["makespan"] + r["local"]["makespan"] for r, _ in measured])
    b = np.array([ms for _, ms in measured])
    if dq_ratio is None:
        t_dq, t_dkdv, c = np.linalg.lstsq(np.stack([dq, dkdv, np.ones_like(b)], 1), b, rcond=None)[0]
        return float(t_dq), float(t_dkdv), float(c)
    t_dkdv, c = np.linalg.lstsq(np.stack([dq_ratio * dq + dkdv, np.ones_like(b)], 1), b, rcond=None)[0]
    return float(dq_ratio * t_dkdv), float(t_dkdv), float(c)


def predict(rows: dict, t_dq: float, t_dkdv: float, c: float, kernels: tuple[str, str]) -> float:
    return t_dq * rows["dq"]["makespan"] + t_dkdv * sum(rows[k]["makespan"] for k in kernels) + c


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attention_tiles", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", default="16384,65536,131072")
    parser.add_argument("--patterns", default="d16w256s4,d64w256s4")
    parser.add_argument("--heads", type=int, default=16, help="B*H (B=1)")
    parser.add_argument("--sms", type=int, default=132, help="SMs (H100 SXM and H200: 132)")
    parser.add_argument("--fit", default=str(common.RESULTS / "attention_H100.json"),
                        help="measured old-code backward times to fit per-iteration costs to ('' to skip)")
    args = parser.parse_args(argv)
    counts = {(t, spec): count(t, spec, args.heads, args.sms)
              for t in map(int, args.seq_lens.split(",")) for spec in args.patterns.split(",")}
    print(f"| T | pattern | kernel | programs | longest | total | makespan ({args.sms} SMs) |")
    print("|---|---|---|---|---|---|---|")
    for (t, spec), rows in counts.items():
        for name, row in rows.items():
            extra = f" ({row['splits']} splits)" if "splits" in row else ""
            print(f"| {t} | {spec} | {name}{extra} | {row['programs']} | {row['longest']} | {row['total']} "
                  f"| {row['makespan']:.0f} |")
    if not args.fit:
        return 0
    data = json.loads(Path(args.fit).read_text())
    measured = [((r["T"], r["pattern"]), r["bwd_ms"]) for r in data["attention"]["rows"]
                if r["method"] == "triton" and (r["T"], r["pattern"]) in counts]
    pairs = [(counts[key], ms) for key, ms in measured]
    fits = {"free": fit(pairs), "dq = 3/4 dkdv": fit(pairs, 0.75)}
    for name, (t_dq, t_dkdv, c) in fits.items():
        print(f"\nfit ({name}) to {Path(args.fit).name}: t_dq {1e3 * t_dq:.2f} us, t_dkdv {1e3 * t_dkdv:.2f} us per "
              f"tile iteration, constant {c:.3f} ms")
    print("| T | pattern | measured old bwd ms | " + " | ".join(f"model old, new ({n})" for n in fits) + " |")
    print("|---|---|---|" + "---|" * len(fits))
    for (seq_len, spec), ms in measured:
        rows = counts[(seq_len, spec)]
        cells = [f"{predict(rows, *f, ('compact', 'local')):.2f}, {predict(rows, *f, ('far', 'near')):.2f}"
                 for f in fits.values()]
        print(f"| {seq_len} | {spec} | {ms:.2f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
