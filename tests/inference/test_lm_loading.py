"""RATPlusLM.from_pretrained on an exported folder (``export_dir``, conftest.py) and bad inputs."""

import json
import warnings

import pytest
import torch

from ratplus_titan.inference import RATPlusLM
from ratplus_titan.model.args import RATPlusModelArgs
from ratplus_titan.pattern import Pattern


def test_from_pretrained_runs_the_requested_pattern(export_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the adapted pattern: no warning
        lm = RATPlusLM.from_pretrained(export_dir, pattern="d4w8s2", device="cpu", max_seq_len=48, max_batch_size=2)
    assert lm.patterns == [Pattern(4, 8, 2)] * 2 and lm.dtype == torch.float32
    assert lm.tokenizer is not None and lm.tokenizer.vocab_size == 32000
    recorded = RATPlusLM.from_pretrained(export_dir, pattern=None, device="cpu")
    assert recorded.patterns == lm.patterns and recorded.max_seq_len == 64
    assert RATPlusLM.from_pretrained(export_dir, device="cpu").patterns == lm.patterns  # the default: recorded
    results = lm.generate(["Hello world", "A"], max_new_tokens=5, stop_on_eos=False)
    assert all(len(r.tokens) == 5 and isinstance(r.text, str) for r in results)
    # text prompts go through the folder's tokenizer, with BOS
    ids = lm.tokenizer.encode("Hello world", add_bos=True)
    assert ids[0] == lm.tokenizer.bos_id
    assert lm.generate([ids], max_new_tokens=5, stop_on_eos=False)[0].tokens == results[0].tokens


def test_unadapted_pattern_warns_naming_the_adapted_one(export_dir):
    with pytest.warns(UserWarning, match="adapted for pattern d4w8s2"):
        RATPlusLM.from_pretrained(export_dir, pattern="d16w256s4", device="cpu")
    with pytest.warns(UserWarning, match=r"adapted for pattern d4w8s2 but runs with dense,d8w4s0 "):
        RATPlusLM.from_pretrained(export_dir, pattern=["dense", "d8w4s0"], device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RATPlusLM.from_pretrained(export_dir, pattern="dense", device="cpu")  # dense attention always serves


def test_checkpoint_shape_errors_come_from_check_state_dict(export_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("model.safetensors", "tokenizer.model"):
        (bad / name).write_bytes((export_dir / name).read_bytes())
    config = json.loads((export_dir / "config.json").read_text())
    config["model_args"]["dim"] = 64
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has shape"):
        RATPlusLM.from_pretrained(bad, device="cpu")
    args = RATPlusModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=100)
    with pytest.raises(KeyError, match="missing tensor"):
        RATPlusLM(args, state_dict={"norm.weight": torch.ones(32)})


def test_bad_patterns_fail_clearly():
    args = RATPlusModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=100)
    with pytest.raises(ValueError, match="3 patterns given for a model of 2 layers"):
        RATPlusLM(args, pattern=["dense"] * 3)
    with pytest.raises(ValueError, match="invalid"):
        RATPlusLM(args, pattern="d16x")
