"""Structure of the RAT+ model: head-interleaved projection, pattern overrides."""

import torch

from ratplus_titan.model import RATPlusModel, RATPlusModelArgs
from ratplus_titan.model.model import RATPlusLayer
from ratplus_titan.pattern import Pattern


def tiny_args(**kwargs):
    return RATPlusModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=97, max_seq_len=64, **kwargs)


def test_a_column_split_of_in_proj_gives_whole_heads_of_every_part():
    """What tensor parallel relies on: rank r's rows of in_proj compute heads r*H/tp .. of o, q, k, x, f."""
    torch.manual_seed(0)
    args = tiny_args()
    layer = RATPlusLayer(args, Pattern())
    u = torch.randn(2, 9, args.dim)
    full = layer.project(u)  # 5 x [B, T, H, hd]
    tp = 2
    rows = layer.in_proj.weight.shape[0] // tp
    for rank in range(tp):
        shard = RATPlusLayer(args, Pattern())
        shard.load_state_dict(layer.state_dict())
        shard.in_proj.weight = torch.nn.Parameter(layer.in_proj.weight[rank * rows : (rank + 1) * rows])
        heads = slice(rank * args.n_heads // tp, (rank + 1) * args.n_heads // tp)
        for part_full, part_shard in zip(full, shard.project(u)):
            torch.testing.assert_close(part_shard, part_full[:, :, heads])


def test_pattern_override_equals_configured_pattern():
    torch.manual_seed(1)
    model = RATPlusModel(tiny_args())
    model.init_weights()
    tokens = torch.randint(0, 97, (2, 40))
    dense = model(tokens)
    sparse = model(tokens, Pattern(8))
    model.set_patterns([Pattern(8)] * 2)
    torch.testing.assert_close(model(tokens), sparse)
    # Position 0 sees only itself under both patterns; later positions lose keys under d8w0s0.
    torch.testing.assert_close(dense[:, :1], sparse[:, :1])
    assert not torch.allclose(dense[:, 20:], sparse[:, 20:])


def test_init_weights_follow_design():
    torch.manual_seed(2)
    model = RATPlusModel(RATPlusModelArgs(dim=256, n_layers=2, n_heads=2, vocab_size=1000))
    model.init_weights()
    weight = model.layers["0"].seq_layer.in_proj.weight
    assert abs(weight.std().item() - 0.02) < 0.001 and abs(weight.mean().item()) < 0.001
    assert torch.equal(model.norm.weight, torch.ones(256))
