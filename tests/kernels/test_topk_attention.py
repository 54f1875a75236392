"""Top-k block attention against block selection and masks written out by loops, in float64."""

import math

import pytest
import torch

from ratplus_titan.head_groups import parse_layer_pattern
from ratplus_titan.inference.topk_cache import TopKLayerCache
from ratplus_titan.kernels.pattern_attention_dispatch import pattern_attention
from ratplus_titan.kernels.topk_attention import topk_attention_reference, topk_decode_attention
from ratplus_titan.topk import SCORES, TopKPattern


def brute_force_blocks(q, k, t, block_size, top_k, score):
    """The blocks query ``q [hd]`` at position ``t`` selects among keys ``k [T, hd]``, by loops."""
    scored = []
    for b in range(t // block_size):  # earlier blocks, all complete
        block = k[b * block_size : (b + 1) * block_size]
        if score == "quest":
            value = 0.0
            for c in range(k.shape[1]):
                lo, hi = min(block[:, c].tolist()), max(block[:, c].tolist())
                value += max(q[c].item() * lo, q[c].item() * hi)
        elif score == "moba":
            value = sum(q[c].item() * sum(block[:, c].tolist()) / block_size for c in range(k.shape[1]))
        else:
            last = k[(b + 1) * block_size - 1]
            value = sum(q[c].item() * last[c].item() for c in range(k.shape[1]))
        scored.append((value, b))
    scored.sort(key=lambda pair: -pair[0])
    return {b for _, b in scored[:top_k]}


def loop_mask(q, k, block_size, top_k, sinks, score):
    """``[B, H, T, T]``: own block (causal), sinks, and the brute-force selected blocks."""
    batch, heads, seq_len, _ = q.shape
    mask = torch.zeros(batch, heads, seq_len, seq_len, dtype=torch.bool)
    for b, h, t in ((b, h, t) for b in range(batch) for h in range(heads) for t in range(seq_len)):
        chosen = brute_force_blocks(q[b, h, t], k[b, h], t, block_size, top_k, score)
        for j in range(t + 1):
            mask[b, h, t, j] = j // block_size == t // block_size or j < sinks or j // block_size in chosen
    return mask


def softmax_attention64(q, k, v, mask):
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v.double()


def qkv(seq_len, batch=2, heads=2, head_dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq_len, head_dim, generator=gen, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("seq_len,block_size,top_k,sinks", [(37, 4, 2, 0), (40, 5, 3, 2), (23, 3, 1, 7)])
def test_selected_blocks_equal_brute_force(score, seq_len, block_size, top_k, sinks):
    q, k, v = qkv(seq_len)
    pattern = TopKPattern(block_size, top_k, score, sinks)
    t = torch.arange(seq_len)
    selected = pattern.selected_blocks(pattern.scores(q, pattern.summaries(k)), t)  # [B, H, T, NB]
    for b, h, i in ((b, h, i) for b in range(2) for h in range(2) for i in range(seq_len)):
        got = set(torch.nonzero(selected[b, h, i]).flatten().tolist())
        assert got == brute_force_blocks(q[b, h, i], k[b, h], i, block_size, top_k, score), (b, h, i)
    # and the attention is the softmax over exactly that key set
    mask = loop_mask(q, k, block_size, top_k, sinks, score)
    torch.testing.assert_close(topk_attention_reference(q, k, v, pattern), softmax_attention64(q, k, v, mask))
    # the check can fail: the selection differs from simply taking the latest blocks
    latest = torch.tensor([[max(0, i // block_size - top_k) <= j // block_size for j in range(seq_len)] for i in range(seq_len)])
    assert not torch.equal(mask, mask & latest)


@pytest.mark.parametrize("score", SCORES)
def test_all_blocks_is_dense_causal(score):
    seq_len, block_size = 33, 4
    q, k, v = qkv(seq_len, seed=1)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    pattern = TopKPattern(block_size, (seq_len - 1) // block_size, score)
    assert pattern.covers_all(seq_len)
    expected = softmax_attention64(q, k, v, causal)
    torch.testing.assert_close(topk_attention_reference(q, k, v, pattern), expected)
    torch.testing.assert_close(pattern_attention(q, k, v, pattern), expected)  # dispatch: SDPA causal
    fewer = TopKPattern(block_size, (seq_len - 1) // block_size - 1, score)
    assert not fewer.covers_all(seq_len)
    assert not torch.allclose(topk_attention_reference(q, k, v, fewer), expected)


@pytest.mark.parametrize("score", SCORES)
def test_top_k_zero_is_own_block_and_sinks(score):
    seq_len, block_size, sinks = 30, 4, 3
    q, k, v = qkv(seq_len, seed=2)
    mask = torch.tensor([[j <= t and (j // block_size == t // block_size or j < sinks) for j in range(seq_len)]
                         for t in range(seq_len)])  # fmt: skip
    pattern = TopKPattern(block_size, 0, score, sinks)
    torch.testing.assert_close(topk_attention_reference(q, k, v, pattern), softmax_attention64(q, k, v, mask))
    torch.testing.assert_close(pattern_attention(q, k, v, pattern), softmax_attention64(q, k, v, mask))


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("block_size,top_k,sinks", [(4, 2, 0), (5, 1, 7), (3, 3, 2)])
def test_decode_over_the_cache_equals_the_reference(score, block_size, top_k, sinks):
    """Rows stored one step at a time (ragged: each sequence at its own position) give the reference's rows."""
    seq_len, batch, heads, head_dim = 29, 3, 2, 4
    q, k, v = qkv(seq_len, batch, heads, head_dim, seed=3)
    pattern = TopKPattern(block_size, top_k, score, sinks)
    full = topk_attention_reference(q, k, v, pattern)  # [B, H, T, hd]
    cache = TopKLayerCache(pattern, batch, seq_len, heads, head_dim, torch.float64, recurrent=False)
    starts = torch.tensor([0, 6, 13])
    cache.fill(k.transpose(1, 2), v.transpose(1, 2), starts)  # prefill of different lengths
    pos = starts.clone()
    while int(pos.min()) < seq_len:
        t = pos.clamp(max=seq_len - 1)
        batch_idx = torch.arange(batch)
        q_t, k_t, v_t = q[batch_idx, :, t], k[batch_idx, :, t], v[batch_idx, :, t]  # [B, H, hd]
        out = topk_decode_attention(pattern, q_t, cache.k, cache.v, cache.summaries, t, k_t, v_t)
        for b in range(batch):
            if pos[b] < seq_len:
                torch.testing.assert_close(out[b], full[b, :, t[b]], msg=f"sequence {b}, t={int(t[b])}")
        cache.store(t, k_t, v_t)
        pos = pos + 1


def test_spec_round_trip_and_bad_values_name_the_field():
    for spec in ("topk64k8s4-ratplus", "topk16k2s0-quest", "topk1k0s4-moba"):
        assert str(parse_layer_pattern(spec)) == spec
    assert parse_layer_pattern("topk64k8s4") == TopKPattern(64, 8, "ratplus", 4)
    with pytest.raises(ValueError, match="top_k=-1"):
        TopKPattern(8, -1)
    with pytest.raises(ValueError, match="block_size=0"):
        TopKPattern(0, 2)
    with pytest.raises(ValueError, match="score='max'.*quest, moba, ratplus"):
        TopKPattern(8, 2, "max")
    with pytest.raises(ValueError, match="sinks=-2"):
        TopKPattern(8, 2, sinks=-2)
    with pytest.raises(ValueError, match="block_size=0"):
        parse_layer_pattern("topk0k2s0")
    with pytest.raises(ValueError, match="topk<block_size>k<top_k>s<sinks>"):
        parse_layer_pattern("topk64k8")
