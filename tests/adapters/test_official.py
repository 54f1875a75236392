"""ratplus-import-official: the imported model computes what the official model computes.

``official_logits`` below is an independent float64 reading of DESIGN §1-2 that consumes
the official state dict as the official code names and orders it (``in_proj`` rows
``[o; q; k; x; f]``), one time step and one query at a time. Random official-format
``.pth`` files (``_orig_mod.`` names, the split ``fgate_proj`` variant, the attention-only
``apply_re=false`` variant, an EasyDict config beside the weights) are imported, loaded into
``RATPlusModel`` in float64 and compared with it under dense and sparse patterns.
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from ratplus_titan.adapters import official, to_dcp
from ratplus_titan.adapters.layout import load_export, save_export
from ratplus_titan.model.model import RATPlusModel
from ratplus_titan.pattern import Pattern
from tests.cli_errors import cli_error

EMB, HEAD, FINAL_NORM = "embedding.wte.weight", "head.lm_head.weight", "backbone.ln.weight"


# ---- the official model, written out --------------------------------------------------------


def _official_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official names without ``_orig_mod.``, float64; a split forget gate stays a separate tensor."""
    return {k.replace("_orig_mod.", ""): v.double() for k, v in state_dict.items()}


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """``x [T, hd]``: position t rotates pair (i, i + hd/2) by angle t * base^(-2i/hd)."""
    seq_len, hd = x.shape
    half = hd // 2
    out = torch.empty_like(x)
    for t in range(seq_len):
        for i in range(half):
            angle = t * base ** (-2.0 * i / hd)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[t, i], x[t, i + half]
            out[t, i] = a * c - b * s
            out[t, i + half] = b * c + a * s
    return out


def visible(t: int, j: int, dilation: int, window: int, sinks: int) -> bool:
    """DESIGN §2: key j is visible to query t (j <= t) if dilated, local, or a sink."""
    if j > t:
        return False
    dilated = dilation != -1 and (j + 1) % dilation == 0
    return dilated or t - j <= window or j < sinks


def official_logits(
    state_dict: dict[str, torch.Tensor], tokens: torch.Tensor, n_heads: int, pattern: tuple[int, int, int] = (1, 0, 0)
) -> torch.Tensor:
    """``tokens [B, T]`` -> logits ``[B, T, V]``, float64, straight from the official tensors."""
    p = _official_tensors(state_dict)
    wte = p[EMB]
    d = wte.shape[1]
    hd = d // n_heads
    n_layers = 1 + max(int(k.split(".")[2]) for k in p if k.startswith("backbone.layers."))
    batch_logits = []
    for sequence in tokens:
        seq_len = sequence.shape[0]
        u = wte[sequence]  # [T, d]
        for i in range(n_layers):
            layer = f"backbone.layers.{i}."
            # RAT+ sequence layer
            z = rmsnorm(u, p[layer + "seq_layer.input_norm.weight"])
            proj = z @ p[layer + "seq_layer.in_proj.weight"].T
            o, q, k, x = (proj[:, n * d : (n + 1) * d] for n in range(4))
            if layer + "seq_layer.fgate_proj.weight" in p:
                f = z @ p[layer + "seq_layer.fgate_proj.weight"].T
            elif proj.shape[1] == 5 * d:
                f = proj[:, 4 * d : 5 * d]
            else:
                f = None
            attn = torch.zeros(seq_len, d, dtype=torch.float64)
            for h in range(n_heads):
                cols = slice(h * hd, (h + 1) * hd)
                if f is None:  # attention-only baseline: keys and values are k and x
                    keys, values = k[:, cols], x[:, cols]
                else:
                    keys, values = torch.zeros(seq_len, hd, dtype=torch.float64), torch.zeros(seq_len, hd, dtype=torch.float64)
                    key_state = torch.zeros(hd, dtype=torch.float64)
                    value_state = torch.zeros(hd, dtype=torch.float64)
                    for t in range(seq_len):
                        a = torch.sigmoid(f[t, cols])
                        key_state = a * key_state + (1 - a) * k[t, cols]
                        value_state = a * value_state + (1 - a) * x[t, cols]
                        keys[t], values[t] = key_state, value_state
                q_rot, k_rot = rope(q[:, cols]), rope(keys)
                for t in range(seq_len):
                    seen = [j for j in range(seq_len) if visible(t, j, *pattern)]
                    scores = torch.stack([q_rot[t] @ k_rot[j] for j in seen]) * hd**-0.5
                    weights = torch.softmax(scores, dim=0)
                    attn[t, cols] = sum(w * values[j] for w, j in zip(weights, seen))
            u = u + (attn * torch.sigmoid(o)) @ p[layer + "seq_layer.out_proj.weight"].T
            # FFN, exact GELU
            hidden = rmsnorm(u, p[layer + "hidden_layer.ln.weight"]) @ p[layer + "hidden_layer.fc1.weight"].T
            hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
            u = u + hidden @ p[layer + "hidden_layer.fc2.weight"].T
        u = rmsnorm(u, p[FINAL_NORM])
        batch_logits.append(u @ p.get(HEAD, wte).T)
    return torch.stack(batch_logits)


# ---- random official checkpoints --------------------------------------------------------------


def official_state_dict(
    dim: int = 64, n_layers: int = 2, vocab: int = 97, apply_re: bool = True, variant: str = "plain", seed: int = 0
) -> dict[str, torch.Tensor]:
    """A random fp32 official ``task`` state dict; ``variant``: plain, compiled (``_orig_mod.``), fgate_split."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    embedding = randn(vocab, dim, std=0.25)
    sd = {EMB: embedding}
    for i in range(n_layers):
        seq = f"backbone.layers.{i}.seq_layer."
        ffn = f"backbone.layers.{i}.hidden_layer."
        in_proj = randn((5 if apply_re else 4) * dim, dim, std=0.3)
        sd[seq + "input_norm.weight"] = 1 + randn(dim, std=0.2)
        if variant == "fgate_split":
            sd[seq + "in_proj.weight"], sd[seq + "fgate_proj.weight"] = in_proj[: 4 * dim], in_proj[4 * dim :]
        else:
            sd[seq + "in_proj.weight"] = in_proj
        sd[seq + "out_proj.weight"] = randn(dim, dim, std=0.1)
        sd[ffn + "ln.weight"] = 1 + randn(dim, std=0.2)
        sd[ffn + "fc1.weight"] = randn(4 * dim, dim, std=0.1)
        sd[ffn + "fc2.weight"] = randn(dim, 4 * dim, std=0.05)
    sd[FINAL_NORM] = 1 + randn(dim, std=0.2)
    sd[HEAD] = embedding  # tied: one tensor under two names, as the official task saves it
    if variant == "compiled":  # torch.compile per layer and on the whole task
        sd = {("_orig_mod." + k).replace(".seq_layer.", "._orig_mod.seq_layer."): v for k, v in sd.items()}
    return sd


def _easydict_module() -> types.ModuleType:
    """A stand-in for the ``easydict`` package (a dict whose items are also attributes)."""
    module = types.ModuleType("easydict")

    class EasyDict(dict):
        def __init__(self, values: dict | None = None, **kwargs) -> None:
            super().__init__()
            for key, value in {**(values or {}), **kwargs}.items():
                setattr(self, key, value)

        def __setattr__(self, name: str, value) -> None:
            if isinstance(value, dict) and not isinstance(value, EasyDict):
                value = EasyDict(value)
            super().__setattr__(name, value)
            super().__setitem__(name, value)

        __setitem__ = __setattr__

    EasyDict.__module__, EasyDict.__qualname__ = "easydict", "EasyDict"
    module.EasyDict = EasyDict
    return module


def save_official(path: Path, state_dict: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> Path:
    """``torch.save`` as the official trainer does, EasyDict config included (easydict absent at load)."""
    easydict = _easydict_module()
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "easydict", easydict)
        cell = {"_name_": "ratplus", "d_model": 64, "d_head": 16, "num_head": 4, "apply_re": True}
        config = easydict.EasyDict({"model": {"backbone": {"d_model": 64, "seq_cell": cell}}, "seed": 0})
        torch.save({"task": state_dict, "config": config, "step": 9, "optimizer": {"state": {}}}, path)
    return path


def _load_float64(out: Path, pattern: Pattern | None = None) -> RATPlusModel:
    exported = load_export(out)
    model = RATPlusModel(exported.args).double()
    model.load_state_dict({k: v.double() for k, v in exported.state_dict.items()})
    if pattern is not None:
        model.set_patterns([pattern] * exported.args.n_layers)
    return model.eval()


TOKENS = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(3))
PATTERNS = [Pattern(), Pattern(4, 3, 1), Pattern(-1, 2, 2)]


# ---- the proof ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize(
    "variant, apply_re", [("plain", True), ("compiled", True), ("fgate_split", True), ("plain", False)],
    ids=["plain", "compiled", "fgate_split", "no_re"],
)
def test_import_matches_official_model(tmp_path: Path, monkeypatch, variant: str, apply_re: bool, pattern) -> None:
    sd = official_state_dict(apply_re=apply_re, variant=variant)
    path = save_official(tmp_path / "official.pth", sd, monkeypatch)
    out = tmp_path / "export"
    official.main([str(path), str(out), "--n-heads", "4", "--dtype", "float32", "--pattern", str(pattern)])
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"] == {
        "dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 97, "ffn_multiplier": 4, "norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_seq_len": 4096, "apply_re": apply_re,
    }
    assert config["pattern"] == {"dilation": pattern.dilation, "local_window": pattern.local_window, "sinks": pattern.sinks}
    model = _load_float64(out, pattern)
    expected = official_logits(sd, TOKENS, n_heads=4, pattern=(pattern.dilation, pattern.local_window, pattern.sinks))
    with torch.no_grad():
        diff = (model(TOKENS) - expected).abs().max().item()
    assert diff < 1e-5, diff


def _float64_rope_cache(head_dim: int, max_seq_len: int, theta: float, device=None) -> torch.Tensor:
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq).repeat(1, 2)
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def _float64_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos_sin[:, 0, None, :] + torch.cat([-second, first], dim=-1) * cos_sin[:, 1, None, :]


def _float64_recurrence(gate_logits: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
    a = torch.sigmoid(gate_logits)
    key_state, value_state, key_states, value_states = 0, 0, [], []
    for t in range(keys.shape[1]):
        key_state = a[:, t] * key_state + (1 - a[:, t]) * keys[:, t]
        value_state = a[:, t] * value_state + (1 - a[:, t]) * values[:, t]
        key_states.append(key_state)
        value_states.append(value_state)
    return torch.stack(key_states, 1), torch.stack(value_states, 1)


def float64_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``RATPlusModel`` compute RoPE and the recurrence in float64 too (it keeps them in fp32)."""
    import ratplus_titan.model.model as model_module

    monkeypatch.setattr(model_module, "rope_cache", _float64_rope_cache)
    monkeypatch.setattr(model_module, "apply_rope", _float64_rope)
    monkeypatch.setattr(model_module, "gated_recurrence", _float64_recurrence)


def max_error_to_official(out: Path, sd: dict[str, torch.Tensor]) -> float:
    """Largest logit difference between the export ``out`` (in float64) and ``official_logits`` over ``PATTERNS``."""
    errors = []
    for pattern in PATTERNS:
        model = _load_float64(out, pattern)
        expected = official_logits(sd, TOKENS, n_heads=4, pattern=(pattern.dilation, pattern.local_window, pattern.sinks))
        with torch.no_grad():
            errors.append((model(TOKENS) - expected).abs().max().item())
    return max(errors)


@pytest.mark.parametrize("apply_re", [True, False])
def test_import_is_exact_with_float64_rope_and_recurrence(tmp_path: Path, monkeypatch, apply_re: bool) -> None:
    """The model computes RoPE and the recurrence in fp32 even for float64 activations, which is
    all that separates it from the reference above (~2e-6 on logits of ~8). With float64
    stand-ins for those two steps the import agrees to rounding: nothing else differs."""
    sd = official_state_dict(apply_re=apply_re)
    out = tmp_path / "export"
    official.main([str(save_official(tmp_path / "o.pth", sd, monkeypatch)), str(out), "--n-heads", "4", "--dtype", "float32"])
    float64_steps(monkeypatch)
    assert max_error_to_official(out, sd) < 1e-10


def test_import_keeps_the_checkpoints_dtype(tmp_path: Path, monkeypatch, capsys) -> None:
    """Without --dtype an fp32 checkpoint is written in fp32, as exact as with --dtype float32;
    --dtype bfloat16 still converts (and then the logits are only ~1e-2 close)."""
    sd = official_state_dict()
    path = save_official(tmp_path / "o.pth", sd, monkeypatch)
    official.main([str(path), str(tmp_path / "default"), "--n-heads", "4"])
    assert "(float32 tensors, the checkpoint's dtype" in capsys.readouterr().out
    official.main([str(path), str(tmp_path / "fp32"), "--n-heads", "4", "--dtype", "float32"])
    official.main([str(path), str(tmp_path / "bf16"), "--n-heads", "4", "--dtype", "bfloat16"])
    assert "(bfloat16 tensors, converted by --dtype)" in capsys.readouterr().out.splitlines()[-1]
    default, fp32 = load_export(tmp_path / "default"), load_export(tmp_path / "fp32")
    assert default.dtype == "float32" and all(t.dtype == torch.float32 for t in default.state_dict.values())
    assert all(torch.equal(default.state_dict[name], t) for name, t in fp32.state_dict.items())
    assert load_export(tmp_path / "bf16").dtype == "bfloat16"
    float64_steps(monkeypatch)
    assert max_error_to_official(tmp_path / "default", sd) < 1e-10
    assert max_error_to_official(tmp_path / "bf16", sd) > 1e-3
    torch.save({"task": {k: v.bfloat16() for k, v in sd.items()}}, tmp_path / "bf16.pth")  # a bf16 checkpoint stays bf16
    official.main([str(tmp_path / "bf16.pth"), str(tmp_path / "from_bf16"), "--n-heads", "4", "--no-tokenizer"])
    assert load_export(tmp_path / "from_bf16").dtype == "bfloat16"


def test_comparison_sees_a_wrong_row_order(tmp_path: Path, monkeypatch) -> None:
    """Loading the official in_proj rows unpermuted (or with the wrong head count) is caught."""
    sd = official_state_dict()
    out = tmp_path / "export"
    official.main([str(save_official(tmp_path / "o.pth", sd, monkeypatch)), str(out), "--n-heads", "4", "--dtype", "float32"])
    expected = official_logits(sd, TOKENS, n_heads=4)
    model = _load_float64(out)
    with torch.no_grad():
        for i in range(2):
            model.layers[str(i)].seq_layer.in_proj.weight.copy_(sd[f"backbone.layers.{i}.seq_layer.in_proj.weight"])
        assert (model(TOKENS) - expected).abs().max().item() > 1e-2
    official.main([str(tmp_path / "o.pth"), str(tmp_path / "two_heads"), "--n-heads", "2", "--dtype", "float32"])
    with torch.no_grad():
        assert (_load_float64(tmp_path / "two_heads")(TOKENS) - expected).abs().max().item() > 1e-2


def test_head_count_from_the_files_config(tmp_path: Path, monkeypatch) -> None:
    """Without --n-heads the EasyDict config saved beside the weights gives it (d_model 64 / d_head 16)."""
    sd = official_state_dict()
    out = tmp_path / "export"
    official.main([str(save_official(tmp_path / "o.pth", sd, monkeypatch)), str(out), "--dtype", "float32"])
    assert load_export(out).args.n_heads == 4
    with torch.no_grad():
        diff = (_load_float64(out)(TOKENS) - official_logits(sd, TOKENS, n_heads=4)).abs().max().item()
    assert diff < 1e-5


def test_default_head_count_is_d_over_128(tmp_path: Path) -> None:
    sd = official_state_dict(dim=256, n_layers=1, vocab=50, seed=1)
    torch.save({"task": sd}, tmp_path / "o.pth")  # no config in the file
    out = tmp_path / "export"
    official.main([str(tmp_path / "o.pth"), str(out), "--no-tokenizer"])
    exported = load_export(out)
    # no --dtype: the checkpoint's own dtype (fp32 here) is kept
    assert exported.args.n_heads == 2 and exported.dtype == "float32" and exported.tokenizer_path is None
    assert all(t.dtype == torch.float32 for t in exported.state_dict.values())


def test_plain_state_dict_file_and_trust_pickle(tmp_path: Path, monkeypatch) -> None:
    """A bare ``{"task": ...}`` file loads weights-only. A file that even placeholders cannot read
    is refused (naming the class) unless ``--trust-pickle`` is given."""
    sd = official_state_dict(seed=2)
    torch.save({"task": sd}, tmp_path / "o.pth")
    official.main([str(tmp_path / "o.pth"), str(tmp_path / "a"), "--n-heads", "4", "--no-tokenizer"])
    assert load_export(tmp_path / "a").args.apply_re

    module = types.ModuleType("odd_module")

    class OddList(list):
        pass

    OddList.__module__, OddList.__qualname__ = "odd_module", "OddList"
    module.OddList = OddList
    monkeypatch.setitem(sys.modules, "odd_module", module)
    torch.save({"task": sd, "resume_kwargs": OddList([1, 2])}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="odd_module.OddList.*--trust-pickle"):
        official.import_official(tmp_path / "odd.pth", tmp_path / "b", n_heads=4)
    official.main([str(tmp_path / "odd.pth"), str(tmp_path / "c"), "--n-heads", "4", "--trust-pickle", "--no-tokenizer"])
    assert load_export(tmp_path / "c").args.n_heads == 4


def test_wrapper_names_are_dropped() -> None:
    """``_orig_mod.``, FSDP/activation-checkpoint wrapper names and a DDP ``module.`` prefix."""
    plain_args, plain = official.convert_official(official_state_dict(), n_heads=4)
    wrapped = {
        "module." + k.replace(".hidden_layer.", "._fsdp_wrapped_module._checkpoint_wrapped_module.hidden_layer."): v
        for k, v in official_state_dict(variant="compiled").items()
    }
    args, converted = official.convert_official(wrapped, n_heads=4)
    assert args == plain_args and set(converted) == set(plain)
    assert all(torch.equal(converted[name], plain[name]) for name in plain)


# ---- bad input ---------------------------------------------------------------------------------


def _convert_error(sd: dict[str, torch.Tensor]) -> str:
    with pytest.raises((KeyError, ValueError)) as info:
        official.convert_official(sd, n_heads=4)
    return str(info.value)


def test_errors_name_the_tensor(tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture) -> None:
    base = official_state_dict()
    missing = {k: v for k, v in base.items() if k != "backbone.layers.1.hidden_layer.fc2.weight"}
    assert "backbone.layers.1.hidden_layer.fc2.weight" in _convert_error(missing)
    assert "backbone.layers.0.seq_layer.out_proj.bias" in _convert_error(
        {**base, "backbone.layers.0.seq_layer.out_proj.bias": torch.zeros(64)}
    )
    assert "backbone.layers.1.hidden_layer.fc1.weight" in _convert_error(
        {**base, "backbone.layers.1.hidden_layer.fc1.weight": torch.zeros(128, 64)}
    )
    assert "backbone.layers.1.seq_layer.in_proj.weight" in _convert_error(  # 5d in layer 0, 4d in layer 1
        {**base, "backbone.layers.1.seq_layer.in_proj.weight": torch.zeros(256, 64)}
    )
    untied = {**base, HEAD: base[HEAD] + 1}
    assert HEAD in _convert_error(untied)
    split = official_state_dict(variant="fgate_split")
    assert "fgate_proj" in _convert_error({**split, "backbone.layers.0.seq_layer.fgate_proj.weight": torch.zeros(32, 64)})
    # through the CLI: exit status 2 and the tensor named on stderr
    path = save_official(tmp_path / "untied.pth", untied, monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        official.main([str(path), str(tmp_path / "out"), "--n-heads", "4"])
    assert exit_info.value.code == 2 and HEAD in capsys.readouterr().err
    torch.save({"something": 1}, tmp_path / "not_official.pth")
    with pytest.raises(SystemExit):
        official.main([str(tmp_path / "not_official.pth"), str(tmp_path / "out2")])
    assert "holds no state dict" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, fragments",
    [
        (["--n-heads", "0"], ["argument --n-heads", "integers >= 1"]),
        (["--max-seq-len", "-4"], ["argument --max-seq-len", "integers >= 1"]),
        (["--pattern", "dwx"], ["argument --pattern", "'dwx' is invalid", "'d<dilation>w<window>s<sinks>'"]),
        (["--pattern", "topk64k8s4"], ["argument --pattern", "inference only"]),
        (["--dilation", "0"], ["argument --dilation", "Pattern.dilation=0", "allowed values are -1"]),
        (["--sinks", "1,x"], ["argument --sinks", "'1,x' is not an integer"]),
        (["--pattern", "d4w3s1", "--dilation", "4"], ["give --pattern or --dilation/--local-window/--sinks"]),
        (["--dtype", "fp8"], ["argument --dtype", "'float32', 'bfloat16', 'float16'"]),
    ],
)
def test_bad_arguments_fail_before_anything_loads(tmp_path: Path, capsys, options, fragments) -> None:
    line = cli_error(capsys, official.main, [str(tmp_path / "missing.pth"), str(tmp_path / "out"), *options], fragments)
    assert line.startswith("ratplus-import-official: error: ")


def test_unreadable_checkpoints_name_the_file(tmp_path: Path, monkeypatch, capsys) -> None:
    path = save_official(tmp_path / "o.pth", official_state_dict(), monkeypatch)
    data = path.read_bytes()
    out = str(tmp_path / "out")
    for size in (len(data) // 2, 1000, 10, 0):  # cut short: the zip directory, the pickle, the header
        path.write_bytes(data[:size])
        line = cli_error(capsys, official.main, [str(path), out, "--n-heads", "4"])
        assert f"{path} cannot be read by torch.load" in line and "truncated or corrupted" in line, line
    assert f"{tmp_path / 'none.pth'}" in cli_error(capsys, official.main, [str(tmp_path / "none.pth"), out])
    assert "Is a directory" in cli_error(capsys, official.main, [str(tmp_path), out])
    path.write_bytes(data)
    line = cli_error(capsys, official.main, [str(path), out, "--n-heads", "4", "--tokenizer", str(tmp_path / "no.model")])
    assert "no.model" in line and "does not exist" in line
    assert not (tmp_path / "out").exists()  # checked before anything is written
    line = cli_error(capsys, official.main, [str(path), out, "--n-heads", "3"])
    assert "model.dim=64 is not divisible by n_heads=3" in line


def test_non_finite_weights_are_refused_naming_the_tensor_and_the_file(tmp_path: Path, monkeypatch, capsys) -> None:
    sd = official_state_dict(variant="compiled")
    name = "_orig_mod.backbone.layers.1._orig_mod.seq_layer.out_proj.weight"
    sd[name] = sd[name].clone()
    sd[name][3, :2] = torch.tensor([float("inf"), float("nan")])
    path = save_official(tmp_path / "o.pth", sd, monkeypatch)
    out = tmp_path / "out"
    line = cli_error(capsys, official.main, [str(path), str(out), "--n-heads", "4"])
    assert line == (
        f"ratplus-import-official: error: {path}: tensor {name!r} holds 2 NaN/inf values (of 4,096): the file is "
        "corrupted, or training had diverged when it was saved; convert an earlier or intact copy of the checkpoint"
    )
    assert not out.exists()


def test_export_folder_rejects_bad_tensors(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "export"
    official.main([str(save_official(tmp_path / "o.pth", official_state_dict(), monkeypatch)), str(out), "--n-heads", "4"])
    exported = load_export(out)
    bad = dict(exported.state_dict)
    bad["layers.0.ffn.fc1.weight"] = bad["layers.0.ffn.fc1.weight"][:10]
    with pytest.raises(ValueError, match="layers.0.ffn.fc1.weight"):
        save_export(tmp_path / "bad", bad, exported.args)
    del bad["layers.0.ffn.fc1.weight"]
    with pytest.raises(KeyError, match="layers.0.ffn.fc1.weight"):
        save_export(tmp_path / "bad", bad, exported.args)


# ---- round trips --------------------------------------------------------------------------------


def test_export_round_trip(tmp_path: Path, monkeypatch) -> None:
    """import -> load_export -> save_export -> load_export: same config, tensors and tokenizer."""
    first = tmp_path / "first"
    official.main([str(save_official(tmp_path / "o.pth", official_state_dict(), monkeypatch)), str(first),
                   "--n-heads", "4", "--pattern", "d16w256s4"])
    exported = load_export(first)
    second = save_export(tmp_path / "second", exported.state_dict, exported.args, exported.dtype, exported.tokenizer_path)
    again = load_export(second)
    assert json.loads((first / "config.json").read_text()) == json.loads((second / "config.json").read_text())
    assert again.pattern == {"dilation": 16, "local_window": 256, "sinks": 4}
    assert set(again.state_dict) == set(exported.state_dict)
    for name, tensor in exported.state_dict.items():
        assert torch.equal(again.state_dict[name], tensor), name
    assert (second / "tokenizer.model").read_bytes() == (first / "tokenizer.model").read_bytes()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # single-process DCP load is the intent
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_to_dcp_round_trip(tmp_path: Path, monkeypatch, dtype: str) -> None:
    """export -> DCP -> a fresh model: with dcp.load, and with torchtitan's CheckpointManager
    (``initial_load_path``, model only), as an adaptation run starts."""
    import torch.distributed.checkpoint as dcp
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.lr_scheduler import LRSchedulersContainer
    from torchtitan.components.optimizer import OptimizersContainer
    from torchtitan.config import Checkpoint as CheckpointConfig

    out = tmp_path / "export"
    official.main([str(save_official(tmp_path / "o.pth", official_state_dict(), monkeypatch)), str(out),
                   "--n-heads", "4", "--dtype", dtype])
    exported = load_export(out)
    dcp_out = tmp_path / "dcp"
    to_dcp.main([str(out), str(dcp_out)])
    assert (dcp_out / ".metadata").is_file()
    with pytest.raises(SystemExit):  # refuses to write into a non-empty folder
        to_dcp.main([str(out), str(dcp_out)])

    fresh = RATPlusModel(exported.args)
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=str(dcp_out), no_dist=True)
    for name, tensor in exported.state_dict.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], tensor.float()), name

    torch.manual_seed(5)
    model = RATPlusModel(exported.args)
    model.init_weights()
    optimizers = OptimizersContainer([model], torch.optim.AdamW, {"lr": 1e-3})
    manager = CheckpointManager(
        dataloader=None,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=LRSchedulersContainer(optimizers, lambda step: 1.0),
        states={},
        checkpoint_config=CheckpointConfig(enable=True, initial_load_path=str(dcp_out), initial_load_model_only=True),
        sd_adapter=None,
        base_folder=str(tmp_path / "run"),
    )
    assert manager.load()
    manager.close()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, exported.state_dict[name].float()), name


def test_cli_help() -> None:
    with pytest.raises(SystemExit) as exit_info:
        official.main(["--help"])
    assert exit_info.value.code == 0
