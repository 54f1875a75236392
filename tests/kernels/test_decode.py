"""Decode attention: the reference against a float64 loop, and the Triton kernels against the reference
(compiled on a GPU, in Triton's interpreter on the CPU: ``tests/device.py``)."""

import pytest
import torch

from ratplus_titan.kernels.decode import decode_attention_reference
from ratplus_titan.kernels.decode_dispatch import decode_attention
from tests.device import needs_interpreter


def loop_float64(q, k_cache, v_cache, valid, k_new, v_new):
    """Softmax over the valid rows plus the new row, one (sequence, head) at a time."""
    batch, heads, _, head_dim = k_cache.shape
    out = torch.empty(batch, heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            keys = torch.cat([k_cache[b, h, valid[b]], k_new[b, h, None]]).double()
            values = torch.cat([v_cache[b, h, valid[b]], v_new[b, h, None]]).double()
            probs = torch.softmax(keys @ q[b, h].double() / head_dim**0.5, dim=0)
            out[b, h] = probs @ values
    return out


def random_case(batch, heads, rows, head_dim, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k_new, v_new = (torch.randn(batch, heads, head_dim, generator=gen, dtype=dtype) * 2 for _ in range(3))
    k_cache, v_cache = (torch.randn(batch, heads, rows, head_dim, generator=gen, dtype=dtype) * 2 for _ in range(2))
    valid = torch.rand(batch, rows, generator=gen) < 0.7
    valid[0] = False  # a sequence that sees only itself (e.g. position 0)
    if batch > 2:
        valid[2, : rows // 2] = True  # a ragged prefix
        valid[2, rows // 2 :] = False
    return q, k_cache, v_cache, valid, k_new, v_new


@pytest.mark.parametrize("batch,heads,rows,head_dim", [(1, 1, 1, 4), (3, 2, 37, 16), (4, 3, 300, 24), (2, 2, 0, 8)])
def test_reference_matches_float64_loop(batch, heads, rows, head_dim):
    case = random_case(batch, heads, rows, head_dim, seed=rows)
    expected = loop_float64(*case)
    torch.testing.assert_close(decode_attention_reference(*case).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decode_attention(*case).double(), expected, rtol=1e-5, atol=1e-5)  # CPU dispatch
    # valid rows given as counts (a prefix per sequence)
    counts = torch.arange(batch) * rows // max(batch - 1, 1)
    prefix = torch.arange(rows)[None, :] < counts[:, None]
    expected = loop_float64(case[0], case[1], case[2], prefix, *case[4:])
    torch.testing.assert_close(decode_attention_reference(case[0], case[1], case[2], counts, *case[4:]).double(),
                               expected, rtol=1e-5, atol=1e-5)


def test_reference_bfloat16_close():
    case = random_case(2, 2, 64, 16, seed=5, dtype=torch.bfloat16)
    expected = loop_float64(*case)
    torch.testing.assert_close(decode_attention_reference(*case).double(), expected, rtol=0.05, atol=0.05)


# Kernel paths (DecodeConfig fields): the split path; the flat path with whole heads per program (no merge),
# with heads cut between programs (stream-K: partials merged by the last-arriving program), one program
# for everything, one tile per program (every head merged from many partials), register prefetch.
# row_stats: softmax statistics per row slot (merged at a head's end) or per head (reduced every tile).
KERNEL_CONFIGS = {
    "flat": {},
    "split": {"kernel": "split"},
    "flat-prefetch": {"flat_prefetch": True, "flat_block_n": 32},
    "flat-head-stats": {"flat_row_stats": False},
    "flat-head-stats-prefetch-streamk": {"flat_row_stats": False, "flat_prefetch": True, "flat_programs_per_sm": 5,
                                         "flat_block_n": 16, "flat_whole_heads": False},
    "flat-streamk": {"flat_programs_per_sm": 7, "flat_block_n": 16, "flat_whole_heads": False},
    "flat-one-program": {"flat_programs_per_sm": 1, "flat_block_n": 128},
    "flat-one-tile-per-program": {"flat_programs_per_sm": 4096, "flat_block_n": 16, "flat_prefetch": True},
}


TRITON_CASES = [(1, 1, 1, 4), (3, 2, 37, 16), (2, 2, 700, 8), (4, 3, 300, 24), (2, 1, 0, 8), (5, 2, 1030, 32)]


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual - expected).abs().max().item()


@needs_interpreter
@pytest.mark.parametrize("config", list(KERNEL_CONFIGS))
def test_triton_kernel_matches_reference(config, monkeypatch, device):
    """Small sizes, several splits (rows > 256), ragged masks, rows not a multiple of the block, empty caches;
    then the cache update kernel. Compiled on a GPU, interpreted on the CPU (``tests/device.py``)."""
    from ratplus_titan.kernels import decode_triton
    from ratplus_titan.kernels.decode import cache_update_reference

    monkeypatch.setattr(decode_triton, "CONFIG", decode_triton.DecodeConfig(**KERNEL_CONFIGS[config]))
    gen = torch.Generator().manual_seed(0)
    for batch, heads, rows, head_dim in TRITON_CASES:
        case = [x.to(device) for x in random_case(batch, heads, rows, head_dim, seed=rows + 1)]
        expected = decode_attention_reference(*case)
        err = max_err(decode_triton.decode_attention_triton(*case), expected)
        assert err < 1e-5, (batch, heads, rows, head_dim, err)
        # non-contiguous cache (a [B, R, H, hd] buffer seen as [B, H, R, hd])
        k_cache, v_cache = (c.transpose(1, 2).contiguous().transpose(1, 2) for c in case[1:3])
        assert max_err(decode_triton.decode_attention_triton(case[0], k_cache, v_cache, *case[3:]), expected) < 1e-5
        # counts instead of a mask: rows [0, count) valid, one count per sequence (ragged, 0 and R included)
        counts = torch.randint(0, rows + 1, (batch,), generator=gen)
        counts[0] = rows
        prefix = (torch.arange(rows)[None, :] < counts[:, None]).to(device)
        expected = decode_attention_reference(case[0], case[1], case[2], prefix, *case[4:])
        got = decode_triton.decode_attention_triton(case[0], case[1], case[2], counts.to(device), *case[4:])
        assert max_err(got, expected) < 1e-5, ("counts", batch, heads, rows)

    # cache update: the moved row is read before the new row overwrites its slot (move_src == slot)
    for move_from_new in (False, True):
        batch, heads, rows, head_dim = 6, 3, 20, 12
        k_cache, v_cache = (torch.randn(batch, heads, rows, head_dim, generator=gen).to(device) for _ in range(2))
        k_new, v_new = (torch.randn(batch, heads, head_dim, generator=gen).to(device) for _ in range(2))
        slot = torch.randint(0, rows, (batch,), generator=gen)
        move_src = slot.clone()
        move_dst = (slot + 1 + torch.randint(0, rows - 1, (batch,), generator=gen)) % rows
        move, write = (torch.rand(batch, generator=gen) < 0.5 for _ in range(2))
        index = [x.to(device) for x in (move_src, move_dst, move, slot, write)]
        expected = [k_cache.clone(), v_cache.clone()]
        cache_update_reference(*expected, k_new, v_new, *index, move_from_new)
        decode_triton.cache_update_triton(k_cache, v_cache, k_new, v_new, *index, move_from_new)
        assert torch.equal(k_cache, expected[0]) and torch.equal(v_cache, expected[1]), move_from_new
        assert not torch.equal(expected[0], k_cache.clone().zero_())


@needs_interpreter
def test_lm_decode_with_triton_kernels(device):
    """The whole decode path on the Triton kernels (attention and cache update) equals the full forward."""
    from ratplus_titan.inference import RATPlusLM
    from ratplus_titan.model.args import RATPlusModelArgs

    torch.manual_seed(0)
    args = RATPlusModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=50, max_seq_len=64, init_std=0.1)
    lm = RATPlusLM(args, pattern=["d4w6s3", "d3w0s1"], max_seq_len=40, max_batch_size=2, decode_backend="triton",
                   device=device)  # fmt: skip
    tokens = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(1))
    full = lm(tokens)
    lm.prefill([tokens[0, :3].tolist(), tokens[1, :11].tolist()])
    err = 0.0
    for i in range(29):
        step = lm.decode_step(torch.stack([tokens[0, 3 + i], tokens[1, 11 + i]]))
        err = max(err, max_err(step[0], full[0, 3 + i]), max_err(step[1], full[1, 11 + i]))
    assert err < 1e-4, err


@pytest.mark.parametrize("batch,heads,rows", [(1, 1, 0), (1, 16, 1000), (64, 16, 516), (3, 4, 70000), (7, 3, 129), (2, 16, 16384)])
@pytest.mark.parametrize("per_sm,block_n,whole_heads,sms", [(4, 64, True, 132), (4, 64, False, 132), (2, 128, True, 1),
                                                            (7, 16, False, 3), (1000, 16, True, 1)])
def test_flat_plan_covers_every_tile_once(monkeypatch, batch, heads, rows, per_sm, block_n, whole_heads, sms):
    """The partition: runs of equal length cover the tiles once, at most ``slots`` programs, the contributor bound holds."""
    import math

    from ratplus_titan.kernels import decode_triton as dt

    monkeypatch.setattr(dt, "_num_sms", lambda device: sms)
    config = dt.DecodeConfig(flat_programs_per_sm=per_sm, flat_block_n=block_n, flat_whole_heads=whole_heads)
    plan = dt.flat_plan(batch, heads, rows, torch.device("cpu"), config)
    nb = plan.tiles_per_head
    assert nb == max(1, math.ceil(rows / block_n)) and plan.total_tiles == batch * heads * nb
    assert plan.num_programs <= per_sm * sms
    assert (plan.num_programs - 1) * plan.tiles_per_program < plan.total_tiles <= plan.num_programs * plan.tiles_per_program
    # the most programs one head meets, by brute force over the heads
    most = max(((h + 1) * nb - 1) // plan.tiles_per_program - (h * nb) // plan.tiles_per_program + 1 for h in range(batch * heads))
    assert most <= plan.max_contributors
    assert plan.merge == (most > 1)
    stream_k = math.ceil(plan.total_tiles / (per_sm * sms))
    assert plan.tiles_per_program == stream_k or (whole_heads and plan.tiles_per_program % nb == 0
                                                 and plan.tiles_per_program <= stream_k * (1 + config.flat_whole_heads_slack))
