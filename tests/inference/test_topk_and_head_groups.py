"""Top-k block attention and head-group hybrids in ``RATPlusLM``: prefill + decode equals the full forward."""

import pytest
import torch

from ratplus_titan.head_groups import HeadGroups
from ratplus_titan.inference import RATPlusLM
from ratplus_titan.inference.cache import HeadGroupCache, LayerCache
from ratplus_titan.inference.topk_cache import TopKLayerCache
from ratplus_titan.model.args import RATPlusModelArgs
from ratplus_titan.pattern import DENSE, Pattern
from ratplus_titan.topk import TopKPattern
from tests.inference.test_decode_matches_forward import (
    MAX_SEQ_LEN,
    TOL,
    decode_logits,
    max_diff,
    tiny_lm,
)

PATTERNS = {
    "topk-quest": "topk8k2s2-quest",
    "topk-moba": "topk8k2s2-moba",
    "topk-ratplus": "topk8k2s2-ratplus",
    "topk-k0": "topk6k0s3-ratplus",  # own block + sinks only
    "groups": "2:dense+2:d4w2s1",
    "groups-topk": "1:topk5k1s1-quest+3:d8w4s0",
    "hybrid": ["2:dense+2:d4w2s1", "topk8k1s0-moba", "d4w8s2"],  # per layer and per head group
}


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("prompt_lengths,total", [([3], 56), ([1, 13, 30], 64)], ids=["short", "ragged"])
def test_decode_equals_forward(name, prompt_lengths, total):
    lm = tiny_lm(PATTERNS[name])
    sequences = torch.randint(0, 100, (len(prompt_lengths), total), generator=torch.Generator().manual_seed(total))
    full = lm(sequences)  # [B, T, V] under the pattern(s)
    decoded = decode_logits(lm, sequences.tolist(), prompt_lengths, total)
    for b in range(len(prompt_lengths)):
        assert max_diff(decoded[b], full[b]) < TOL, f"sequence {b}"
    # The check can fail: the pattern changes these logits by far more than TOL.
    assert max_diff(full, tiny_lm("dense")(sequences)) > 1e-2


def test_score_types_select_differently():
    sequences = torch.randint(0, 100, (1, 64), generator=torch.Generator().manual_seed(3))
    logits = {score: tiny_lm(f"topk8k2s2-{score}")(sequences) for score in ("quest", "moba", "ratplus")}
    assert max_diff(logits["quest"], logits["moba"]) > 1e-2 and max_diff(logits["moba"], logits["ratplus"]) > 1e-2


def test_topk_covering_every_block_is_dense():
    sequences = torch.randint(0, 100, (2, 64), generator=torch.Generator().manual_seed(4))
    dense = tiny_lm("dense")(sequences)
    assert max_diff(tiny_lm("topk8k7s0-quest")(sequences), dense) < TOL  # (64 - 1) // 8 = 7 earlier blocks at most
    decoded = decode_logits(tiny_lm("topk8k7s0-quest"), sequences.tolist(), [5, 20], 64)
    assert all(max_diff(decoded[b], dense[b]) < TOL for b in range(2))


def test_caches_per_pattern_kind():
    lm = tiny_lm(PATTERNS["hybrid"])
    lm.prefill([[1, 2, 3]])
    groups, topk, plain = lm.cache.layers
    args = lm.args
    assert isinstance(groups, HeadGroupCache) and isinstance(topk, TopKLayerCache) and isinstance(plain, LayerCache)
    dense_group, sparse_group = groups.groups
    assert dense_group.k.shape == (1, 2, MAX_SEQ_LEN, args.head_dim)  # every row
    assert sparse_group.k.shape == (1, 2, Pattern(4, 2, 1).cache_rows(MAX_SEQ_LEN), args.head_dim)  # 1 + 2 + T/4
    assert groups.key_state.shape == (1, args.n_heads, args.head_dim)  # the recurrence state is the layer's
    assert dense_group.key_state.numel() == sparse_group.key_state.numel() == 0
    # top-k keeps every row, plus one summary (the closing key for moba: the mean) per complete block
    assert topk.k.shape == (1, args.n_heads, MAX_SEQ_LEN, args.head_dim)
    assert topk.summaries.shape == (1, args.n_heads, MAX_SEQ_LEN // 8, 1, args.head_dim)
    assert sum(b.numel() * b.element_size() for b in lm.cache.buffers()) == lm.cache.total_bytes() + 8
    assert lm.cache_bytes(1) == lm.cache.bytes_per_sequence()
    lm.free_cache()
    assert lm.cache_bytes(2) == 2 * tiny_lm(PATTERNS["hybrid"]).setup_cache(1).bytes_per_sequence()  # meta estimate


def test_pattern_objects_and_bad_inputs():
    args = RATPlusModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=100, max_seq_len=128)
    lm = RATPlusLM(args, pattern=[HeadGroups(((3, DENSE), (1, TopKPattern(4, 1)))), TopKPattern(4, 2, "quest")])
    assert [str(p) for p in lm.patterns] == ["3:dense+1:topk4k1s0-ratplus", "topk4k2s0-quest"]
    with pytest.raises(ValueError, match=r"pattern '3:dense\+2:d4w2s1': head counts 3 \+ 2 = 5 do not sum to n_heads=4"):
        lm.set_pattern("3:dense+2:d4w2s1")
    with pytest.raises(ValueError, match=r"pattern\[1\]: TopKPattern.block_size=0 is invalid"):
        lm.set_pattern(["dense", "topk0k1s0"])


def test_export_records_head_groups(tmp_path):
    """A model trained with head groups exports them; ``pattern=None`` runs them, another sparse pattern warns."""
    import json

    from ratplus_titan.adapters.layout import save_export
    from ratplus_titan.model.model import RATPlusModel

    args = RATPlusModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=100, max_seq_len=64, head_groups=["2:dense+2:d4w2s1"])
    model = RATPlusModel(args)
    model.init_weights()
    save_export(tmp_path, model.state_dict(), args, dtype="float32")
    assert json.loads((tmp_path / "config.json").read_text())["pattern"]["head_groups"] == ["2:dense+2:d4w2s1"]
    lm = RATPlusLM.from_pretrained(tmp_path, pattern=None, device="cpu")
    assert [str(p) for p in lm.patterns] == ["2:dense+2:d4w2s1"] * 2
    with pytest.warns(UserWarning, match="adapted for pattern 2:dense\\+2:d4w2s1 but runs with topk8k1s0"):
        RATPlusLM.from_pretrained(tmp_path, pattern="topk8k1s0", device="cpu")
