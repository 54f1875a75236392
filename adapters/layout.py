"""The exported-model folder: what ``ratplus-export`` writes and ``RATPlusLM.from_pretrained`` reads.

::

    OUT/model.safetensors   RATPlusModel state dict (our names, head-interleaved in_proj)
    OUT/config.json         {"format", "version", "model_args", "pattern", "dtype", "in_proj_layout"}
    OUT/tokenizer.model     (or tokenizer.json)

``in_proj`` rows: ours are ``[head][part][hd]`` (so tensor parallel splits whole heads);
the official rat-plus order is ``[part][head][hd]`` with parts ``o, q, k, x, f``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ratplus_titan.model.args import RATPlusModelArgs

FORMAT = "ratplus-titan"
VERSION = 1
ARG_FIELDS = ("dim", "n_layers", "n_heads", "vocab_size", "ffn_multiplier", "norm_eps", "rope_theta", "max_seq_len", "apply_re")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def official_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[parts * d, d_in]`` rows ordered ``[part][head][hd]`` -> ``[head][part][hd]``."""
    n_parts = weight.shape[0] // weight.shape[1] if weight.shape[0] % weight.shape[1] == 0 else None
    if n_parts is None:
        raise ValueError(f"in_proj weight of shape {tuple(weight.shape)} is not parts x d_model rows")
    head_dim = weight.shape[1] // n_heads
    return weight.reshape(n_parts, n_heads, head_dim, -1).transpose(0, 1).reshape(weight.shape)


def interleaved_to_official(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of ``official_to_interleaved``."""
    n_parts = weight.shape[0] // weight.shape[1]
    head_dim = weight.shape[1] // n_heads
    return weight.reshape(n_heads, n_parts, head_dim, -1).transpose(0, 1).reshape(weight.shape)


def expected_shapes(args: RATPlusModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor of a ``RATPlusModel`` state dict and its shape."""
    d, parts = args.dim, 5 if args.apply_re else 4
    shapes = {"tok_embeddings.weight": (args.vocab_size, d), "norm.weight": (d,)}
    for i in range(args.n_layers):
        prefix = f"layers.{i}."
        shapes[prefix + "seq_layer.input_norm.weight"] = (d,)
        shapes[prefix + "seq_layer.in_proj.weight"] = (parts * d, d)
        shapes[prefix + "seq_layer.out_proj.weight"] = (d, d)
        shapes[prefix + "ffn.norm.weight"] = (d,)
        shapes[prefix + "ffn.fc1.weight"] = (args.ffn_multiplier * d, d)
        shapes[prefix + "ffn.fc2.weight"] = (d, args.ffn_multiplier * d)
    return shapes


def check_state_dict(args: RATPlusModelArgs, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise naming the first missing, unexpected or wrongly shaped tensor."""
    expected = expected_shapes(args)
    missing = [name for name in expected if name not in state_dict]
    if missing:
        raise KeyError(f"{source} is missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = [name for name in state_dict if name not in expected]
    if unexpected:
        raise KeyError(f"{source} has unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != shape:
            raise ValueError(f"{source} tensor {name!r} has shape {tuple(state_dict[name].shape)}, expected {shape}")


def args_to_dict(args: RATPlusModelArgs) -> dict:
    return {name: getattr(args, name) for name in ARG_FIELDS}


def args_from_dict(values: dict) -> RATPlusModelArgs:
    unknown = set(values) - set(ARG_FIELDS)
    if unknown:
        raise ValueError(f"config.json model_args has unknown fields {sorted(unknown)}; allowed: {', '.join(ARG_FIELDS)}")
    return RATPlusModelArgs(**values)


@dataclass
class ExportedModel:
    args: RATPlusModelArgs
    state_dict: dict[str, torch.Tensor]
    pattern: dict  # {"dilation", "local_window", "sinks"[, "head_groups"]}: the pattern the weights were trained/adapted for
    dtype: str
    tokenizer_path: Path | None


def save_export(
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor],
    args: RATPlusModelArgs,
    dtype: str = "bfloat16",
    tokenizer_path: str | Path | None = None,
) -> Path:
    """Write ``model.safetensors``, ``config.json`` and the tokenizer into ``out_dir``."""
    from safetensors.torch import save_file

    check_state_dict(args, state_dict)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    tensors = {name: t.detach().to("cpu", torch_dtype).contiguous() for name, t in state_dict.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": FORMAT})
    pattern = {"dilation": args.dilation, "local_window": args.local_window, "sinks": args.sinks}
    if args.head_groups:
        pattern["head_groups"] = list(args.head_groups)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "model_args": args_to_dict(args),
        "pattern": pattern,
        "dtype": dtype,
        "in_proj_layout": "head_interleaved",
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer_path is not None:
        tokenizer_path = Path(tokenizer_path)
        if tokenizer_path.is_dir():
            found = [tokenizer_path / f for f in TOKENIZER_FILES if (tokenizer_path / f).exists()]
            if not found:
                raise FileNotFoundError(f"no {' or '.join(TOKENIZER_FILES)} in {tokenizer_path}")
            tokenizer_path = found[0]
        shutil.copyfile(tokenizer_path, out_dir / tokenizer_path.name)
    return out_dir


def load_export(path: str | Path) -> ExportedModel:
    """Read an exported folder, checking every tensor against the config.

    ``args`` has the recorded pattern set (``args.patterns``); ``pattern`` holds it as written.
    """
    from safetensors.torch import load_file

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: is {path} a folder written by ratplus-export?")
    config = json.loads(config_file.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{config_file}: format {config.get('format')!r} is not {FORMAT!r}")
    args = args_from_dict(config["model_args"])
    # The args carry the recorded pattern too, so save_export(load_export(p)) writes the same config.
    recorded = config["pattern"]
    args.set_pattern(recorded["dilation"], recorded["local_window"], recorded["sinks"], recorded.get("head_groups"))
    state_dict = load_file(str(path / "model.safetensors"))
    check_state_dict(args, state_dict, source=str(path / "model.safetensors"))
    tokenizer = next((path / f for f in TOKENIZER_FILES if (path / f).exists()), None)
    return ExportedModel(args, state_dict, config["pattern"], config["dtype"], tokenizer)
