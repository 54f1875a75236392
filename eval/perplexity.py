"""Held-out loss and perplexity of an exported model under one or more attention patterns.

    ratplus-perplexity MODEL_DIR data/validation.bin --pattern dense --pattern d16w256s4 --seq-len 2048 --windows 256

Reads the first ``--windows`` windows of ``seq_len + 1`` tokens from a pre-tokenized ``.bin`` file (the
same windows ``[training] dataset = "bin"`` reads: ``python -m ratplus_titan.data.pretokenize`` writes
them), runs the model under each pattern (full-sequence forward, the prefill path) and reports the mean
next-token cross-entropy (nats) and its perplexity, overall and by position bucket: a sparse pattern
equals dense attention for the first ``W`` positions, so the later buckets are where it can lose.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ratplus_titan import cli

if TYPE_CHECKING:
    import torch

DEFAULT_BUCKETS = (256, 1024)
"""Bucket edges: positions [0, 256), [256, 1024), [1024, seq_len)."""


def read_windows(
    path: str | Path, seq_len: int, windows: int, vocab_size: int | None = None, seed: int | None = None
) -> torch.Tensor:
    """The first ``windows`` windows (0 = all) of ``seq_len + 1`` tokens of a uint16 ``.bin`` file -> ``[N, seq_len + 1]``
    (``[training] dataset = "bin"``'s windows, in file order), after checking the file (its size; its ids
    below ``vocab_size`` when given): a bad file is a ``ValueError`` naming it. With ``seed``: ``windows``
    of them drawn by that seed (without replacement, kept in file order), from every part of the file
    rather than its beginning alone."""
    import numpy as np
    import torch

    from ratplus_titan.data.token_file import open_token_file, token_windows

    available = token_windows(open_token_file(path, vocab_size), seq_len)
    if len(available) == 0:
        raise ValueError(f"{path} holds fewer than seq_len + 1 = {seq_len + 1} tokens")
    n = len(available) if windows <= 0 else min(windows, len(available))
    if seed is not None:
        available = available[np.sort(np.random.default_rng(seed).choice(len(available), n, replace=False))]
    return torch.from_numpy(available[:n].astype(np.int64))


def bucket_edges(seq_len: int, edges: Sequence[int] = DEFAULT_BUCKETS) -> list[tuple[int, int]]:
    """``[(0, e0), (e0, e1), ..., (ek, seq_len)]`` for the edges inside ``(0, seq_len)``."""
    cuts = [0, *(e for e in edges if 0 < e < seq_len), seq_len]
    return list(zip(cuts[:-1], cuts[1:]))


def heldout_loss(
    lm, windows: torch.Tensor, batch_size: int, edges: Sequence[int] = DEFAULT_BUCKETS, progress: str | None = None
) -> dict:
    """Mean cross-entropy of ``lm`` (a ``RATPlusLM``, under its current pattern) on ``windows [N, T + 1]``.

    Returns ``{"loss", "perplexity", "tokens", "by_position": {"a-b": loss}}``; sums are accumulated in
    float64 over every position of every window. ``progress``: a progress bar (stderr) with this label.
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    seq_len = windows.shape[1] - 1
    buckets = bucket_edges(seq_len, edges)
    position_sum = torch.zeros(seq_len, dtype=torch.float64)
    bar = tqdm(total=windows.shape[0], desc=progress, unit="window", disable=progress is None, file=sys.stderr)
    with torch.no_grad(), bar:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size]
            logits = lm(batch[:, :-1])  # [B, T, V]
            targets = batch[:, 1:].to(logits.device)
            nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
            position_sum += nll.view(batch.shape[0], seq_len).double().sum(0).cpu()
            del logits, nll
            bar.update(batch.shape[0])
    n = windows.shape[0]
    loss = float(position_sum.sum() / (n * seq_len))
    by_position = {f"{a}-{b}": float(position_sum[a:b].sum() / (n * (b - a))) for a, b in buckets}
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": n * seq_len, "by_position": by_position}


def load(model_dir: str | Path, seq_len: int, dtype: str | None = None, device: str | None = None):
    """A ``RATPlusLM`` for full-sequence evaluation of windows of ``seq_len`` tokens."""
    from ratplus_titan.inference import RATPlusLM

    return RATPlusLM.from_pretrained(model_dir, pattern="dense", dtype=dtype, device=device, max_seq_len=seq_len)


def evaluate_pattern(
    lm, windows: torch.Tensor, spec: str, batch_size: int, edges: Sequence[int] = DEFAULT_BUCKETS, progress: bool = False
) -> dict:
    """``{"pattern", "kv_rows", "loss", "perplexity", "tokens", "by_position", "seconds"}`` of ``lm`` under ``spec``.

    ``spec``: one pattern, one per layer comma-separated, or ``config`` (the pattern recorded in the
    export; ``"pattern"`` then names it). ``progress``: a progress bar on stderr.
    """
    recorded = spec.strip() == cli.RECORDED_PATTERN
    lm.set_pattern(lm.args.patterns if recorded else cli.parse_patterns(spec))  # args: as loaded from config.json
    if recorded:
        spec = cli.describe_patterns(lm.patterns)
    start = time.monotonic()
    loss = heldout_loss(lm, windows, batch_size, edges, progress=spec if progress else None)
    row = {"pattern": spec, "kv_rows": kv_rows(lm, windows.shape[1] - 1), **loss}
    row["seconds"] = round(time.monotonic() - start, 2)
    return row


def evaluate(
    model_dir: str | Path,
    data: str | Path,
    patterns: Sequence[str],
    seq_len: int,
    windows: int = 256,
    batch_size: int = 8,
    dtype: str | None = None,
    device: str | None = None,
    quiet: bool = False,
    edges: Sequence[int] = DEFAULT_BUCKETS,
) -> list[dict]:
    """One row per pattern (see :func:`evaluate_pattern`), the model loaded once."""
    lm = load(model_dir, seq_len, dtype, device)
    tokens = read_windows(data, seq_len, windows, lm.args.vocab_size)
    return evaluate_loaded(lm, tokens, patterns, batch_size, edges, None if quiet else model_dir)


def evaluate_loaded(
    lm, windows: torch.Tensor, patterns: Sequence[str], batch_size: int, edges: Sequence[int], label=None,
    progress: bool = False,
) -> list[dict]:
    """:func:`evaluate_pattern` for each pattern; each row printed (prefixed by ``label``) unless ``label``
    is None; ``progress``: a progress bar on stderr while a pattern runs."""
    rows = []
    for spec in patterns:
        rows.append(evaluate_pattern(lm, windows, spec, batch_size, edges, progress=progress))
        if label is not None:
            print_row(label, rows[-1])
    return rows


def print_row(model_dir: str | Path, row: dict) -> None:
    print(f"perplexity: {model_dir} {row['pattern']:>22s}: loss {row['loss']:.4f}  ppl {row['perplexity']:8.2f}  "
          f"({row['tokens']:,} tokens, {row['seconds']:.1f} s)", flush=True)  # fmt: skip


def kv_rows(lm, seq_len: int) -> int:
    """KV rows per layer and head a decoder reads for the last token of a ``seq_len`` sequence, averaged over layers."""
    rows = [pattern_rows(p, seq_len) for p in lm.patterns]
    return round(sum(rows) / len(rows))


def pattern_rows(pattern, seq_len: int) -> int:
    from ratplus_titan.head_groups import HeadGroups
    from ratplus_titan.pattern import Pattern

    if isinstance(pattern, Pattern):
        return pattern.cache_rows(seq_len)
    if isinstance(pattern, HeadGroups):
        return round(sum(n * pattern_rows(p, seq_len) for n, p in pattern.groups) / pattern.n_heads)
    # top-k block: sinks + the selected blocks + the query's own block
    return min(seq_len, pattern.sinks + (pattern.top_k + 1) * pattern.block_size)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="ratplus-perplexity",
        description="Held-out loss / perplexity of an exported RAT+ model under attention patterns.",
    )
    parser.add_argument("model_dir", help="folder written by ratplus-export")
    parser.add_argument("data", help="uint16 .bin token file (python -m ratplus_titan.data.pretokenize)")
    cli.add_pattern_argument(parser, repeat=True)
    parser.add_argument("--seq-len", type=cli.positive_int, default=2048, help="window length (default: %(default)s)")
    parser.add_argument("--windows", type=cli.non_negative_int, default=256,
                        help="windows to evaluate, 0 = all (default: %(default)s)")  # fmt: skip
    parser.add_argument("--batch-size", type=cli.positive_int, default=8, help="windows per forward (default: %(default)s)")
    parser.add_argument("--dtype", choices=cli.DTYPES, default=None, help="default: the exported dtype")
    parser.add_argument("--device", type=cli.device, default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--output", help="write the rows as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    patterns = [cli.describe_patterns(p) for p in (args.patterns or [None])]
    with cli.user_errors(parser.prog):  # a bad model folder or token file: one line naming it
        lm = load(args.model_dir, args.seq_len, args.dtype, args.device)
        windows = read_windows(args.data, args.seq_len, args.windows, lm.args.vocab_size)
    cli.warn_beyond_model_length(parser.prog, "--seq-len", args.seq_len, lm.model_max_seq_len)
    rows = evaluate_loaded(lm, windows, patterns, args.batch_size, DEFAULT_BUCKETS, args.model_dir, progress=not args.quiet)
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
