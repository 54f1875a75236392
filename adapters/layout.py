"""The exported-model folder: what ``ratplus-export`` writes and ``RATPlusLM.from_pretrained`` reads.

::

    OUT/model.safetensors   RATPlusModel state dict (our names, head-interleaved in_proj)
    OUT/config.json         {"format", "version", "model_args", "pattern", "dtype", "in_proj_layout"}
    OUT/tokenizer.model     (or tokenizer.json)

``in_proj`` rows: ours are ``[head][part][hd]`` (so tensor parallel splits whole heads);
the official rat-plus order is ``[part][head][hd]`` with parts ``o, q, k, x, f``.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ratplus_titan.cli import DTYPES
from ratplus_titan.data.tokenizer import TOKENIZER_FILES, resolve_tokenizer_file
from ratplus_titan.model.args import RATPlusModelArgs

from .folder import leftovers, written_folder

FORMAT = "ratplus-titan"
VERSION = 1
ARG_FIELDS = ("dim", "n_layers", "n_heads", "vocab_size", "ffn_multiplier", "norm_eps", "rope_theta", "max_seq_len", "apply_re")
CONFIG_FIELDS = ("format", "version", "model_args", "pattern", "dtype", "in_proj_layout")


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


def source_dtype(state_dict: dict[str, torch.Tensor]) -> str:
    """The dtype the tensors are stored in; if they differ, the one all of them convert to without loss."""
    dtypes = {tensor.dtype for tensor in state_dict.values()}
    return str(functools.reduce(torch.promote_types, dtypes)).removeprefix("torch.")


def pattern_fields(args: RATPlusModelArgs) -> dict:
    """The pattern set on ``args`` as config.json's ``"pattern"`` holds it (and a checkpoint's training record)."""
    pattern = {"dilation": args.dilation, "local_window": args.local_window, "sinks": args.sinks}
    if args.head_groups:
        pattern["head_groups"] = list(args.head_groups)
    return pattern


def pattern_setting(fields: dict) -> tuple:
    """``pattern_fields`` back as ``args.set_pattern``'s arguments (a ``KeyError`` names a missing field)."""
    return fields["dilation"], fields["local_window"], fields["sinks"], fields.get("head_groups")


def check_finite(
    state_dict: dict[str, torch.Tensor], source: str | Callable[[str, torch.Tensor], str], fix: str
) -> None:
    """Raise naming the first tensor that holds a NaN or an infinity, and its file.

    ``source``: the file, or a function of (name, tensor) naming it; ``fix``: what the user can do.
    """
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point():
            continue
        bad = int(tensor.numel() - torch.isfinite(tensor).sum())
        if bad:
            where = source(name, tensor) if callable(source) else source
            raise ValueError(
                f"{where}: tensor {name!r} holds {bad:,} NaN/inf values (of {tensor.numel():,}): the file is "
                f"corrupted, or training had diverged when it was saved; {fix}"
            )


def is_export(path: Path) -> bool:
    return (path / "config.json").is_file()


def save_export(
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor],
    args: RATPlusModelArgs,
    dtype: str | None = None,
    tokenizer_path: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model.safetensors``, ``config.json`` and the tokenizer as the folder ``out_dir``.

    The folder is written beside ``out_dir`` and then takes its place (``folder.written_folder``): it
    is the complete old export or the complete new one, never a mix. An existing non-empty ``out_dir``
    is replaced only with ``overwrite``, and only if it is an export.
    ``dtype``: of the written tensors; default ``source_dtype(state_dict)`` (nothing is rounded).
    """
    from safetensors.torch import save_file

    check_state_dict(args, state_dict)
    if tokenizer_path is not None:
        tokenizer_path = resolve_tokenizer_file(tokenizer_path, field="tokenizer")  # before anything is written
    out_dir = Path(out_dir)
    dtype = dtype or source_dtype(state_dict)
    torch_dtype = getattr(torch, dtype)
    tensors = {name: t.detach().to("cpu", torch_dtype).contiguous() for name, t in state_dict.items()}
    config = {
        "format": FORMAT,
        "version": VERSION,
        "model_args": args_to_dict(args),
        "pattern": pattern_fields(args),
        "dtype": dtype,
        "in_proj_layout": "head_interleaved",
    }
    with written_folder(out_dir, overwrite, is_export, "a folder written by ratplus-export") as folder:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": FORMAT})
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, folder / tokenizer_path.name)
    return out_dir


def read_config(config_file: Path) -> dict:
    """An export's ``config.json``, with the fields ``load_export`` reads; errors name the file."""
    if not config_file.is_file():
        folder = config_file.parent
        previous = [path for path, _ in leftovers(folder) if path.name.startswith(f"{folder.name}.old-")]
        if not folder.exists() and previous:
            raise FileNotFoundError(
                f"{folder} does not exist: an export replacing it was interrupted, and {previous[-1]} holds the "
                f"previous export; rename it to {folder.name}, or export again"
            )
        raise FileNotFoundError(f"{config_file} not found: is {folder} a folder written by ratplus-export?")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_file} is not valid JSON ({err}): the file is corrupted; export the model again") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_file}: format {found!r} is not {FORMAT!r}: not a folder written by ratplus-export")
    missing = [name for name in ("model_args", "pattern", "dtype") if name not in config]
    if missing:
        raise ValueError(f"{config_file} has no {missing[0]!r} field (ratplus-export writes {', '.join(CONFIG_FIELDS)})")
    if not isinstance(getattr(torch, str(config["dtype"]), None), torch.dtype):
        raise ValueError(f"{config_file}: dtype {config['dtype']!r} is not a torch dtype (e.g. {', '.join(DTYPES)})")
    return config


def args_from_config(config: dict, config_file: Path) -> RATPlusModelArgs:
    """The model args of a ``read_config`` result, with the recorded pattern set; errors name the file."""
    try:
        args = args_from_dict(dict(config["model_args"]))
        args.set_pattern(*pattern_setting(config["pattern"]))
    except KeyError as err:
        raise ValueError(f"{config_file}: field {err.args[0]!r} is missing (in model_args or pattern)") from None
    except ValueError as err:
        raise ValueError(f"{config_file}: {err}") from None
    except (TypeError, AttributeError) as err:  # a value of the wrong kind (a string for a number, ...)
        raise ValueError(
            f"{config_file}: model_args {config['model_args']} and pattern {config['pattern']} do not describe a "
            f"model ({err}): numbers must be numbers, apply_re true/false"
        ) from None
    return args


def load_weights(weights: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors`` -> tensors; an unreadable file is a ``ValueError`` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: is {weights.parent} a folder written by ratplus-export?")
    try:
        return load_file(str(weights))
    except SafetensorError as err:
        raise ValueError(f"{weights} cannot be read ({err}): the file is truncated or corrupted; export the model again") from None


def load_export(path: str | Path) -> ExportedModel:
    """Read an exported folder, checking every tensor against the config.

    ``args`` has the recorded pattern set (``args.patterns``); ``pattern`` holds it as written.
    """
    path = Path(path)
    config_file = path / "config.json"
    config = read_config(config_file)
    # The args carry the recorded pattern too, so save_export(load_export(p)) writes the same config.
    args = args_from_config(config, config_file)
    weights = path / "model.safetensors"
    state_dict = load_weights(weights)
    check_state_dict(args, state_dict, source=str(weights))
    check_finite(state_dict, str(weights), fix="export the model again from a good checkpoint")
    tokenizer = next((path / f for f in TOKENIZER_FILES if (path / f).exists()), None)
    return ExportedModel(args, state_dict, config["pattern"], config["dtype"], tokenizer)
