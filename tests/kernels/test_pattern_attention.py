"""Pattern attention paths against softmax over a mask built from DESIGN §2 by loops, in float64."""

import itertools
import math

import pytest
import torch

from ratplus_titan.kernels.pattern_attention import pattern_attention_compact, pattern_attention_reference
from ratplus_titan.kernels.pattern_attention_dispatch import pattern_attention
from ratplus_titan.pattern import Pattern


def loop_mask(seq_len, dilation, window, sinks):
    """The pattern rules written out independently of ratplus_titan.pattern."""
    mask = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    for t in range(seq_len):
        for j in range(t + 1):
            dilated = dilation != -1 and (j + 1) % dilation == 0
            mask[t, j] = dilated or (t - j <= window) or (j < sinks)
    return mask


def softmax_attention64(q, k, v, mask):
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v.double()


CASES = [
    # (T, dilation, window, sinks)
    (1, 4, 0, 0), (5, 8, 2, 1), (7, 16, 3, 5),  # T < dilation, sinks > window
    (33, 1, 0, 0), (33, 1, 4, 2),  # dense
    (40, -1, 6, 2), (40, -1, 0, 0), (40, -1, 0, 3),  # no dilation
    (64, 4, 0, 0), (65, 4, 8, 2), (97, 7, 5, 9), (128, 16, 16, 4), (50, 3, 1, 1), (61, 5, 20, 30),
]


@pytest.mark.parametrize("seq_len,dilation,window,sinks", CASES)
def test_paths_match_explicit_mask(seq_len, dilation, window, sinks):
    pattern = Pattern(dilation, window, sinks)
    mask = loop_mask(seq_len, dilation, window, sinks)
    assert torch.equal(pattern.dense_mask(seq_len), mask)
    gen = torch.Generator().manual_seed(seq_len * 31 + dilation)
    q, k, v = (torch.randn(2, 3, seq_len, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    expected = softmax_attention64(q, k, v, mask)
    for name, out in [
        ("reference", pattern_attention_reference(q, k, v, pattern)),
        ("compact", pattern_attention_compact(q, k, v, pattern)),
        ("sdpa", pattern_attention(q, k, v, pattern, backend="sdpa")),
        ("auto", pattern_attention(q, k, v, pattern)),
    ]:
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10, msg=f"{name} path")


def test_compact_and_local_parts_are_disjoint_and_cover_the_pattern():
    for seq_len, dilation, window, sinks in itertools.product([1, 9, 40], [1, 2, 5, 16], [0, 3, 11], [0, 2, 7]):
        pattern = Pattern(dilation, window, sinks)
        q_idx = torch.arange(seq_len)[:, None]
        local = pattern.local_allows(q_idx, torch.arange(seq_len)[None, :])
        rows = torch.arange(pattern.num_dilated_rows(seq_len))
        compact = torch.zeros(seq_len, seq_len, dtype=torch.bool)
        compact[:, pattern.compact_position(rows)] = pattern.compact_allows(q_idx, rows[None, :])
        assert not (local & compact).any()
        assert torch.equal(local | compact, loop_mask(seq_len, dilation, window, sinks))


def test_gradients_of_compact_path_match_reference():
    pattern = Pattern(4, 3, 2)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, 2, 37, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    grad_out = torch.randn(1, 2, 37, 8, generator=gen, dtype=torch.float64)
    expected = torch.autograd.grad((softmax_attention64(*inputs, loop_mask(37, 4, 3, 2)) * grad_out).sum(), inputs)
    actual = torch.autograd.grad((pattern_attention_compact(*inputs, pattern) * grad_out).sum(), inputs)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)
