"""Prefill + token-by-token decode with the sparse cache equals the full-sequence forward under the same pattern."""

import math

import pytest
import torch

from ratplus_titan.inference import RATPlusLM
from ratplus_titan.model.args import RATPlusModelArgs
from ratplus_titan.pattern import Pattern

MAX_SEQ_LEN = 80
TOL = 1e-4

PATTERNS = {
    "dense": "dense",
    "d4w8s2": "d4w8s2",
    "d8w4s0": "d8w4s0",
    "d-1w8s2": "d-1w8s2",  # no dilation: sliding window + sinks
    "d3w0s1": "d3w0s1",  # no window: dilated rows + sinks only
    "d4w6s3": "d4w6s3",  # the first position past the sinks closes a stretch
    "d3w4s5": "d3w4s5",  # sinks hold dilated positions too
    "d2w40s2": "d2w40s2",  # formula >= T: the full row layout with a mask
    "hybrid": ["dense", "d4w8s2", "d-1w8s2"],
}


def tiny_lm(pattern, apply_re=True, n_layers=3, seed=0):
    torch.manual_seed(seed)
    # init_std 0.1: attention weights are far from uniform, so a wrong key set moves the logits a lot
    args = RATPlusModelArgs(dim=64, n_layers=n_layers, n_heads=4, vocab_size=100, max_seq_len=128, init_std=0.1, apply_re=apply_re)
    return RATPlusLM(args, pattern=pattern, max_seq_len=MAX_SEQ_LEN, max_batch_size=4)


def decode_logits(lm, sequences, prompt_lengths, total):
    """Prefill ``sequences[b][:prompt_lengths[b]]`` then feed the rest token by token -> per-sequence logits rows."""
    out = [[] for _ in sequences]
    logits = lm.prefill([s[:n] for s, n in zip(sequences, prompt_lengths)], all_logits=True)  # [B, T, V]
    for b, n in enumerate(prompt_lengths):
        out[b].extend(logits[b, :n])
    for i in range(total - min(prompt_lengths)):
        # each sequence feeds its own next token; sequences already at `total` feed a dummy
        tokens = torch.tensor([s[n + i] if n + i < total else 0 for s, n in zip(sequences, prompt_lengths)])
        step = lm.decode_step(tokens)
        for b, n in enumerate(prompt_lengths):
            if n + i < total:
                out[b].append(step[b])
    return [torch.stack(rows) for rows in out]


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize(
    "prompt_lengths,total",
    [
        ([3], 24),  # prompt shorter than sinks + window; decode crosses it
        ([7], 72),  # many dilation boundaries while decoding
        ([1, 13, 30], 64),  # ragged batch
    ],
    ids=["short", "long", "ragged"],
)
def test_decode_equals_forward(name, prompt_lengths, total):
    lm = tiny_lm(PATTERNS[name])
    gen = torch.Generator().manual_seed(total)
    sequences = torch.randint(0, 100, (len(prompt_lengths), total), generator=gen)
    full = lm(sequences)  # [B, T, V] under the pattern
    decoded = decode_logits(lm, sequences.tolist(), prompt_lengths, total)
    for b in range(len(prompt_lengths)):
        assert max_diff(decoded[b], full[b]) < TOL, f"sequence {b}"
    # The check can fail: the pattern changes these logits by far more than TOL.
    if not all(p.covers_all(total) for p in lm.patterns):
        dense = tiny_lm("dense")(sequences)
        assert max_diff(full, dense) > 1e-2


@pytest.mark.parametrize("name", ["d4w8s2", "d3w0s1", "hybrid"])
def test_ragged_batch_equals_each_sequence_alone(name):
    lm = tiny_lm(PATTERNS[name])
    lengths, total = [2, 17, 9], 50
    sequences = torch.randint(0, 100, (3, total), generator=torch.Generator().manual_seed(1)).tolist()
    batched = decode_logits(lm, sequences, lengths, total)
    for b, n in enumerate(lengths):
        alone = decode_logits(lm, [sequences[b]], [n], total)[0]
        assert max_diff(batched[b], alone) < TOL


@pytest.mark.parametrize("name", ["d4w8s2", "dense"])
def test_attention_only_baseline(name):
    """``apply_re = False``: keys/values are k, x directly and the cache holds no recurrence state."""
    lm = tiny_lm(PATTERNS[name], apply_re=False, n_layers=2)
    sequences = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(2))
    decoded = decode_logits(lm, sequences.tolist(), [5, 11], 40)
    full = lm(sequences)
    assert all(max_diff(decoded[b], full[b]) < TOL for b in range(2))
    assert lm.cache.state_bytes_per_sequence() == 0


def expected_rows(pattern: Pattern, max_seq_len: int) -> int:
    """DESIGN §4 written out: sinks + window + ceil(T / D) rows, never more than T (dense: T)."""
    if pattern.dilation == 1:
        return max_seq_len
    dilated = 0 if pattern.dilation == -1 else math.ceil(max_seq_len / pattern.dilation)
    return min(max_seq_len, pattern.sinks + pattern.local_window + dilated)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_cache_memory_matches_formula(name):
    lm = tiny_lm(PATTERNS[name])
    lm.prefill([[1, 2, 3]])
    cache, args = lm.cache, lm.args
    expected_kv = 0
    for layer, pattern in zip(cache.layers, lm.patterns):
        rows = expected_rows(pattern, MAX_SEQ_LEN)
        assert layer.k.shape == layer.v.shape == (1, args.n_heads, rows, args.head_dim)
        expected_kv += 2 * rows * args.dim * layer.k.element_size()
        assert layer.key_state.shape == layer.value_state.shape == (1, args.n_heads, args.head_dim)
        assert layer.key_state.dtype == torch.float32
    assert cache.kv_bytes_per_sequence() == expected_kv
    assert cache.bytes_per_sequence() == expected_kv + 2 * args.n_layers * args.dim * 4
    assert lm.cache_bytes(1) == cache.bytes_per_sequence()
    # every buffer of the cache is accounted for
    assert sum(b.numel() * b.element_size() for b in cache.buffers()) == cache.total_bytes() + cache.pos.numel() * 8
    if name in ("d4w8s2", "d8w4s0", "d-1w8s2", "d3w0s1"):
        assert cache.kv_bytes_per_sequence() < 2 * args.n_layers * MAX_SEQ_LEN * args.dim * 4  # fewer than T rows
