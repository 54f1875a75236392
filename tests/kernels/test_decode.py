"""Decode attention: the reference against a float64 loop, and the Triton split-K kernel (TRITON_INTERPRET=1) against the reference."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ratplus_titan.kernels.decode import decode_attention, decode_attention_reference


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


TRITON_SCRIPT = textwrap.dedent(
    """
    import torch
    from ratplus_titan.kernels.decode import decode_attention_reference
    from ratplus_titan.kernels.decode_triton import decode_attention_triton, split_plan
    from tests_decode_cases import CASES, random_case

    for batch, heads, rows, head_dim in CASES:
        case = random_case(batch, heads, rows, head_dim, seed=rows + 1)
        expected = decode_attention_reference(*case)
        got = decode_attention_triton(*case)
        err = (got - expected).abs().max().item()
        print(batch, heads, rows, head_dim, split_plan(batch, heads, rows, torch.device("cpu")), err)
        assert err < 1e-5, (batch, heads, rows, head_dim, err)
        # non-contiguous cache (a [B, R, H, hd] buffer seen as [B, H, R, hd])
        k_cache, v_cache = (c.transpose(1, 2).contiguous().transpose(1, 2) for c in case[1:3])
        got = decode_attention_triton(case[0], k_cache, v_cache, *case[3:])
        assert (got - expected).abs().max().item() < 1e-5
        # counts instead of a mask: rows [0, count) valid, one count per sequence (ragged, 0 and R included)
        counts = torch.randint(0, rows + 1, (batch,))
        counts[0] = rows
        prefix = torch.arange(rows)[None, :] < counts[:, None]
        expected = decode_attention_reference(case[0], case[1], case[2], prefix, *case[4:])
        got = decode_attention_triton(case[0], case[1], case[2], counts, *case[4:])
        assert (got - expected).abs().max().item() < 1e-5, ("counts", batch, heads, rows)

    # cache update: the moved row is read before the new row overwrites its slot (move_src == slot)
    from ratplus_titan.kernels.decode import cache_update_reference
    from ratplus_titan.kernels.decode_triton import cache_update_triton

    gen = torch.Generator().manual_seed(0)
    for move_from_new in (False, True):
        batch, heads, rows, head_dim = 6, 3, 20, 12
        k_cache, v_cache = (torch.randn(batch, heads, rows, head_dim, generator=gen) for _ in range(2))
        k_new, v_new = (torch.randn(batch, heads, head_dim, generator=gen) for _ in range(2))
        slot = torch.randint(0, rows, (batch,), generator=gen)
        move_src = slot.clone()
        move_dst = (slot + 1 + torch.randint(0, rows - 1, (batch,), generator=gen)) % rows
        move, write = (torch.rand(batch, generator=gen) < 0.5 for _ in range(2))
        expected = [k_cache.clone(), v_cache.clone()]
        cache_update_reference(*expected, k_new, v_new, move_src, move_dst, move, slot, write, move_from_new)
        cache_update_triton(k_cache, v_cache, k_new, v_new, move_src, move_dst, move, slot, write, move_from_new)
        assert torch.equal(k_cache, expected[0]) and torch.equal(v_cache, expected[1]), move_from_new
        assert not torch.equal(expected[0], k_cache.clone().zero_())
    print("ok")
    """
)


def test_triton_kernel_matches_reference_interpreted(tmp_path):
    """Small sizes, several splits (rows > 256), ragged masks, rows not a multiple of the block, empty caches."""
    cases = [(1, 1, 1, 4), (3, 2, 37, 16), (2, 2, 700, 8), (4, 3, 300, 24), (2, 1, 0, 8), (5, 2, 1030, 32)]
    (tmp_path / "tests_decode_cases.py").write_text(
        f"CASES = {cases!r}\n" + textwrap.dedent(
            """
            import torch
            """
        ) + _source_of(random_case)
    )
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")


def _source_of(function) -> str:
    import inspect

    return inspect.getsource(function)


LM_SCRIPT = textwrap.dedent(
    """
    import torch
    from ratplus_titan.inference import RATPlusLM
    from ratplus_titan.model.args import RATPlusModelArgs

    torch.manual_seed(0)
    args = RATPlusModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=50, max_seq_len=64, init_std=0.1)
    lm = RATPlusLM(args, pattern=["d4w6s3", "d3w0s1"], max_seq_len=40, max_batch_size=2, decode_backend="triton")
    tokens = torch.randint(0, 50, (2, 40))
    full = lm(tokens)
    lengths = [3, 11]
    lm.prefill([tokens[0, :3].tolist(), tokens[1, :11].tolist()])
    err = 0.0
    for i in range(29):
        step = lm.decode_step(torch.stack([tokens[0, 3 + i], tokens[1, 11 + i]]))
        err = max(err, (step[0] - full[0, 3 + i]).abs().max().item(), (step[1] - full[1, 11 + i]).abs().max().item())
    print(err)
    assert err < 1e-4, err
    print("ok")
    """
)


def test_lm_decode_with_triton_kernels_interpreted():
    """The whole decode path on the Triton kernels (attention and cache update) equals the full forward."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", LM_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")
