"""Per-head-group hybrids: the layer against an independent float64 reference, training, validation."""

import math

import pytest
import torch

from ratplus_titan.head_groups import HeadGroups, parse_layer_pattern
from ratplus_titan.kernels.recurrence_dispatch import gated_recurrence
from ratplus_titan.model import RATPlusModel, RATPlusModelArgs
from ratplus_titan.model.model import RATPlusLayer, apply_rope, rope_cache
from ratplus_titan.pattern import DENSE, Pattern
from ratplus_titan.topk import TopKPattern


def tiny_args(**kwargs):
    return RATPlusModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=97, max_seq_len=64, **kwargs)


def loop_mask(seq_len, dilation, window, sinks):
    """DESIGN §2 by loops."""
    return torch.tensor([[j <= t and ((dilation != -1 and (j + 1) % dilation == 0) or t - j <= window or j < sinks)
                          for j in range(seq_len)] for t in range(seq_len)])  # fmt: skip


def softmax_attention64(q, k, v, mask):
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


def test_layer_with_groups_equals_dense_and_sparse_references():
    """[2 heads dense, 2 heads d4w2s1]: the first heads attend causally, the last under the loop mask."""
    torch.manual_seed(0)
    args = tiny_args(init_std=0.1)
    groups = HeadGroups(((2, DENSE), (2, Pattern(4, 2, 1))))
    layer = RATPlusLayer(args, groups).double()
    for module in layer.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.1)
    seq_len = 40
    u = torch.randn(2, seq_len, args.dim, dtype=torch.float64)
    cos_sin = rope_cache(args.head_dim, seq_len, args.rope_theta).double()
    out = layer(u, cos_sin)

    o, q, k, x, f = layer.project(u)  # [B, T, H, hd]
    k, x = gated_recurrence(f, k, x)
    q, k, v = (t.transpose(1, 2) for t in (apply_rope(q, cos_sin), apply_rope(k, cos_sin), x))  # [B, H, T, hd]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    sparse = loop_mask(seq_len, 4, 2, 1)
    attn = torch.cat([softmax_attention64(q[:, :2], k[:, :2], v[:, :2], causal),
                      softmax_attention64(q[:, 2:], k[:, 2:], v[:, 2:], sparse)], dim=1)  # fmt: skip
    expected = u + layer.out_proj((attn.transpose(1, 2) * torch.sigmoid(o)).flatten(2))
    torch.testing.assert_close(out, expected)
    # the check can fail: the groups are not the same pattern on every head
    for pattern in (DENSE, Pattern(4, 2, 1)):
        assert not torch.allclose(layer(u, cos_sin, pattern), expected)


def test_training_step_through_the_model():
    torch.manual_seed(1)
    args = tiny_args(head_groups=["2:dense+2:d4w2s1", "1:d8w0s0+3:d-1w4s2"])
    assert [str(p) for p in args.patterns] == ["2:dense+2:d4w2s1", "1:d8w0s0+3:d-1w4s2"]
    model = RATPlusModel(args)
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 97, (2, 33))
    losses = []
    for _ in range(3):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # FLOPs count each group's real pairs: between the all-dense and all-sparse counts
    _, flops = args.get_nparams_and_flops(model, 64)
    _, dense = args.get_nparams_and_flops(model, 64, [DENSE] * 2)
    assert flops < dense


def test_job_config_section_sets_head_groups():
    from types import SimpleNamespace

    from ratplus_titan.config import RATPlus

    args = tiny_args()
    section = RATPlus(head_groups=["2:dense+2:d16w0s0"])
    args.update_from_config(SimpleNamespace(ratplus=section, training=SimpleNamespace(seq_len=32)))
    assert args.patterns == [HeadGroups(((2, DENSE), (2, Pattern(16))))] * 2
    with pytest.raises(ValueError, match="seq_len=8 cannot serve pattern d16w0s0"):
        args.update_from_config(SimpleNamespace(ratplus=section, training=SimpleNamespace(seq_len=8)))


def test_tensor_parallel_shard_cuts_groups_at_rank_bounds():
    groups = parse_layer_pattern("1:dense+2:d4w2s1+5:d8w0s0")
    assert [str(groups.shard(r, 2)) for r in range(2)] == ["1:dense+2:d4w2s1+1:d8w0s0", "4:d8w0s0"]
    assert [str(groups.shard(r, 4)) for r in range(4)] == ["1:dense+1:d4w2s1", "1:d4w2s1+1:d8w0s0", "2:d8w0s0", "2:d8w0s0"]
    with pytest.raises(ValueError, match="n_heads=8 is not divisible by tensor_parallel_degree=3"):
        groups.shard(0, 3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"head_groups": ["2:dense+1:d4w2s1"]}, r"ratplus.head_groups '2:dense\+1:d4w2s1': head counts 2 \+ 1 = 3 do not sum to n_heads=4"),
        ({"head_groups": ["2:dense", "2:d4w2s1"]}, r"ratplus.head_groups\[0\].*n_heads=4.*joined by '\+'"),
        ({"head_groups": ["2:dense+2:topk4k1s0"]}, "ratplus.head_groups: .*top-k block attention, which is inference only"),
        ({"head_groups": ["dense", "dense", "dense"]}, "ratplus.head_groups: 3 patterns given for a model of 2 layers"),
        ({"head_groups": ["2:dense+2:d0w0s0"]}, "ratplus.head_groups: .*dilation=0 is invalid"),
        ({"head_groups": ["0:dense+4:d4w2s1"]}, r"ratplus.head_groups: .*n_heads=0 is invalid"),
        ({"head_groups": ["2:dense+2:d4w2s1"], "dilation": 8}, "head_groups and ratplus.dilation/local_window/sinks are both set"),
    ],
)
def test_bad_head_groups_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_args(**kwargs)


def test_spec_round_trip():
    for spec in ("2:dense+2:d4w2s1", "8:dense+8:d64w0s0", "4:topk64k8s4-quest+12:d16w256s4"):
        assert str(parse_layer_pattern(spec)) == spec
    assert parse_layer_pattern("1:topk8k2s0+3:dense") == HeadGroups(((1, TopKPattern(8, 2)), (3, DENSE)))
    with pytest.raises(ValueError, match="'<n_heads>:<pattern>' groups joined by '\\+'"):
        parse_layer_pattern("dense:2+d4w2s1:2")
