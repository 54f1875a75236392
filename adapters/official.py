"""``ratplus-import-official``: an official rat-plus ``.pth`` checkpoint -> the exported-model folder.

The official trainer saves ``{"task": state_dict, "config": EasyDict, "step", "optimizer", ...}``.
Its names and ours (DESIGN §6)::

    embedding.wte.weight                               tok_embeddings.weight
    backbone.layers.{i}.seq_layer.input_norm.weight    layers.{i}.seq_layer.input_norm.weight
    backbone.layers.{i}.seq_layer.in_proj.weight       layers.{i}.seq_layer.in_proj.weight  (rows permuted)
    backbone.layers.{i}.seq_layer.out_proj.weight      layers.{i}.seq_layer.out_proj.weight
    backbone.layers.{i}.hidden_layer.ln.weight         layers.{i}.ffn.norm.weight
    backbone.layers.{i}.hidden_layer.fc1.weight        layers.{i}.ffn.fc1.weight
    backbone.layers.{i}.hidden_layer.fc2.weight        layers.{i}.ffn.fc2.weight
    backbone.ln.weight                                 norm.weight
    head.lm_head.weight                                (tied: must equal the embedding)

``_orig_mod.`` (torch.compile) may appear anywhere in a name (so may FSDP/activation-checkpoint
wrapper names, and a DDP ``module.`` prefix; all are dropped). Older files keep the
forget-gate rows as ``...seq_layer.fgate_proj.weight`` (``d`` rows) beside a ``4d``-row
``in_proj``; they are appended after it. The official ``in_proj`` rows are ``[o; q; k; x; f]``,
each part ``[head][hd]``; ours are head-interleaved (``layout.official_to_interleaved``).

torch and the model are imported inside the functions that use them (``--help`` answers at once).
"""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ratplus_titan import cli

from .export import (
    Progress,
    add_output_arguments,
    add_pattern_arguments,
    apply_pattern,
    canonical_name,
    check_output,
    pattern_from_arguments,
    report_written,
    tokenizer_from_arguments,
)

if TYPE_CHECKING:
    import torch

    from ratplus_titan.model.args import RATPlusModelArgs

HEAD_DIM = 128  # the paper's head size for every flavor (DESIGN §1)
EMBEDDING = "embedding.wte.weight"
HEAD = "head.lm_head.weight"
FINAL_NORM = "backbone.ln.weight"
_LAYER = re.compile(r"^backbone\.layers\.(\d+)\.")
# official per-layer name -> ours
LAYER_NAMES = {
    "seq_layer.input_norm.weight": "seq_layer.input_norm.weight",
    "seq_layer.in_proj.weight": "seq_layer.in_proj.weight",
    "seq_layer.out_proj.weight": "seq_layer.out_proj.weight",
    "hidden_layer.ln.weight": "ffn.norm.weight",
    "hidden_layer.fc1.weight": "ffn.fc1.weight",
    "hidden_layer.fc2.weight": "ffn.fc2.weight",
}


# ---- reading the .pth safely ----------------------------------------------------------------


class _Placeholder:
    """Stands in for any class a checkpoint names outside ``torch.load``'s weights-only allowlist.

    Nothing of the named class runs: the object is rebuilt as an ``OrderedDict`` (which the
    weights-only unpickler may fill with items and attributes), enough to read past an
    ``EasyDict`` config and reach the tensors under ``"task"``.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> OrderedDict:  # type: ignore[misc]
        return OrderedDict()


def torch_load_checkpoint(path: str | Path, trust_pickle: bool = False) -> Any:
    """``torch.load`` weights-only; classes it refuses (e.g. ``easydict.EasyDict``) become placeholders.

    ``trust_pickle=True`` loads with ``weights_only=False`` instead, which runs whatever
    code the file names: only for files you trust, and only if the weights-only load fails.
    """
    import torch

    path = str(path)
    # mmap: the optimizer state that official files also hold is never read into memory.
    # The legacy (pre-zip) format cannot be mapped.
    with open(path, "rb") as f:
        mmap = zipfile.is_zipfile(f)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (EOFError, OSError, RuntimeError) as err:  # torch's reader (and mmap) on a cut-short or damaged file
        reason = str(err).split(". ")[0] if str(err) else type(err).__name__
        raise ValueError(f"{path} cannot be read by torch.load ({reason}): the file is truncated or corrupted") from None
    except pickle.UnpicklingError:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path) if mmap else []
        try:
            with torch.serialization.safe_globals([(_Placeholder, name) for name in unsafe]):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as second_error:
            if trust_pickle:
                return torch.load(path, map_location="cpu", weights_only=False)
            # torch's message wraps the actual reason (the line after "WeightsUnpickler error:") in advice
            text = str(second_error)
            lines = [line.strip() for line in text.partition("WeightsUnpickler error:")[2].splitlines() if line.strip()]
            reason = lines[0] if lines else text.strip().splitlines()[0]
            raise ValueError(
                f"{path}: a weights-only load fails, even with placeholders for {', '.join(unsafe) or 'no class'} "
                f"({reason}). If you trust this file, pass --trust-pickle."
            ) from None


def official_state_dict(checkpoint: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The ``"task"`` state dict of a loaded official checkpoint (or the object itself if it is one)."""
    import torch

    if isinstance(checkpoint, dict) and "task" in checkpoint:
        checkpoint = checkpoint["task"]
    if not isinstance(checkpoint, dict) or not any(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{source} holds no state dict: expected {{'task': state_dict}} as the official trainer saves")
    return {str(k): v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def heads_from_config(checkpoint: Any) -> int | None:
    """The head count recorded in the official file's config, if any.

    The official trainer saves its resolved config beside the weights:
    ``config.model.backbone.seq_cell`` holds ``num_head`` (and ``d_head``, ``d_model``).
    """
    try:
        backbone = checkpoint["config"]["model"]["backbone"]
        cell = backbone["seq_cell"]
    except (KeyError, TypeError, IndexError):
        return None
    if not isinstance(cell, dict):
        return None
    num_head, d_head = cell.get("num_head"), cell.get("d_head")
    d_model = cell.get("d_model", backbone.get("d_model"))
    if isinstance(num_head, int) and not isinstance(num_head, bool) and num_head > 0:
        return num_head
    if isinstance(d_head, int) and isinstance(d_model, int) and d_head > 0 and d_model % d_head == 0:
        return d_model // d_head
    return None


# ---- official names -> ours ------------------------------------------------------------------


def normalize_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper names (``_orig_mod.`` etc., a DDP ``module.`` prefix) and append
    ``fgate_proj`` rows to ``in_proj``."""
    import torch

    ddp = all(key.startswith("module.") for key in state_dict)
    clean: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        name = canonical_name(key.removeprefix("module.") if ddp else key)
        if name in clean:
            raise ValueError(f"tensor {name!r} appears twice (once as {key!r})")
        clean[name] = tensor
    for name in [n for n in clean if n.endswith(".seq_layer.fgate_proj.weight")]:
        gate = clean.pop(name)
        in_name = name.replace("fgate_proj", "in_proj")
        if in_name not in clean:
            raise KeyError(f"checkpoint has {name!r} but is missing tensor {in_name!r}")
        weight = clean[in_name]
        d = weight.shape[1]
        if weight.shape[0] != 4 * d or tuple(gate.shape) != (d, d):
            raise ValueError(
                f"{name!r} has shape {tuple(gate.shape)} beside {in_name!r} of shape {tuple(weight.shape)}: "
                f"expected ({d}, {d}) beside ({4 * d}, {d})"
            )
        clean[in_name] = torch.cat([weight, gate], dim=0)
    return clean


def infer_official_args(
    state_dict: dict[str, torch.Tensor], n_heads: int | None = None, max_seq_len: int = 4096
) -> RATPlusModelArgs:
    """Model args from the shapes of a normalized official state dict (default ``n_heads = d / 128``)."""
    from ratplus_titan.model.args import RATPlusModelArgs

    if EMBEDDING not in state_dict:
        raise KeyError(f"checkpoint is missing tensor {EMBEDDING!r}")
    vocab_size, dim = state_dict[EMBEDDING].shape
    layer_ids = {int(m[1]) for m in map(_LAYER.match, state_dict) if m}
    if not layer_ids:
        raise KeyError("checkpoint is missing tensor 'backbone.layers.0.seq_layer.in_proj.weight' (no layers found)")
    n_layers = max(layer_ids) + 1
    in_proj = state_dict.get("backbone.layers.0.seq_layer.in_proj.weight")
    if in_proj is None:
        raise KeyError("checkpoint is missing tensor 'backbone.layers.0.seq_layer.in_proj.weight'")
    if in_proj.shape[0] not in (4 * dim, 5 * dim):
        raise ValueError(
            f"tensor 'backbone.layers.0.seq_layer.in_proj.weight' has shape {tuple(in_proj.shape)}: "
            f"expected ({5 * dim}, {dim}) or, without the forget gate, ({4 * dim}, {dim})"
        )
    fc1 = state_dict.get("backbone.layers.0.hidden_layer.fc1.weight")
    ffn_multiplier = 4 if fc1 is None or fc1.shape[0] % dim else fc1.shape[0] // dim
    if n_heads is None:
        if dim % HEAD_DIM:
            raise ValueError(f"d_model={dim} is not a multiple of {HEAD_DIM}: give --n-heads")
        n_heads = dim // HEAD_DIM
    return RATPlusModelArgs(
        dim=int(dim),
        n_layers=n_layers,
        n_heads=n_heads,
        vocab_size=int(vocab_size),
        ffn_multiplier=int(ffn_multiplier),
        max_seq_len=max_seq_len,
        apply_re=in_proj.shape[0] == 5 * dim,
    )


def official_shapes(args: RATPlusModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor of a normalized official state dict and its shape (head excluded)."""
    d, hidden = args.dim, args.ffn_multiplier * args.dim
    parts = 5 if args.apply_re else 4
    per_layer = {
        "seq_layer.input_norm.weight": (d,),
        "seq_layer.in_proj.weight": (parts * d, d),
        "seq_layer.out_proj.weight": (d, d),
        "hidden_layer.ln.weight": (d,),
        "hidden_layer.fc1.weight": (hidden, d),
        "hidden_layer.fc2.weight": (d, hidden),
    }
    shapes = {EMBEDDING: (args.vocab_size, d), FINAL_NORM: (d,)}
    for i in range(args.n_layers):
        shapes.update({f"backbone.layers.{i}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def convert_official(
    state_dict: dict[str, torch.Tensor], n_heads: int | None = None, max_seq_len: int = 4096
) -> tuple[RATPlusModelArgs, dict[str, torch.Tensor]]:
    """Official state dict (raw names) -> our args and ``RATPlusModel`` state dict."""
    import torch

    from .layout import official_to_interleaved

    state_dict = normalize_official(state_dict)
    args = infer_official_args(state_dict, n_heads, max_seq_len)
    expected = official_shapes(args)
    missing = [name for name in expected if name not in state_dict]
    if missing:
        raise KeyError(f"checkpoint is missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = [name for name in state_dict if name not in expected and name != HEAD]
    if unexpected:
        raise KeyError(f"checkpoint has unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(state_dict[name].shape)}, expected {shape}")
    embedding = state_dict[EMBEDDING]
    # The LM head is tied to the embedding; a file may omit it, but if present it must be the same.
    if HEAD in state_dict and not torch.equal(state_dict[HEAD], embedding):
        raise ValueError(f"tensor {HEAD!r} differs from {EMBEDDING!r}: RAT+ ties the LM head to the embedding")
    ours = {"tok_embeddings.weight": embedding, "norm.weight": state_dict[FINAL_NORM]}
    for i in range(args.n_layers):
        for theirs, mine in LAYER_NAMES.items():
            tensor = state_dict[f"backbone.layers.{i}.{theirs}"]
            if mine == "seq_layer.in_proj.weight":
                tensor = official_to_interleaved(tensor, args.n_heads)
            ours[f"layers.{i}.{mine}"] = tensor
    return args, ours


def import_official(
    checkpoint: str | Path,
    out_dir: str | Path,
    n_heads: int | None = None,
    max_seq_len: int = 4096,
    pattern: tuple | None = None,
    dtype: str | None = None,
    tokenizer: str | Path | None = None,
    trust_pickle: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Read an official ``.pth`` and write the exported-model folder.

    Head count: ``n_heads``, else the file's config (``heads_from_config``), else ``d_model / 128``.
    ``dtype``: of the exported tensors; default the checkpoint's (``layout.source_dtype``).
    ``overwrite``: replace an existing export at ``out_dir``. ``progress``: called with a line per stage.
    A tensor holding a NaN or an infinity is a ``ValueError`` naming it and the file.
    """
    from .layout import check_finite, is_export, save_export

    say = progress or (lambda line: None)
    check_output(out_dir, overwrite, is_export)
    say(f"reading {checkpoint}")
    loaded = torch_load_checkpoint(checkpoint, trust_pickle)
    if n_heads is None:
        n_heads = heads_from_config(loaded)
    official = official_state_dict(loaded, str(checkpoint))
    check_finite(official, str(checkpoint), fix="convert an earlier or intact copy of the checkpoint")
    args, state_dict = convert_official(official, n_heads, max_seq_len)
    apply_pattern(args, pattern)
    say(f"writing {out_dir}")
    return save_export(out_dir, state_dict, args, dtype=dtype, tokenizer_path=tokenizer, overwrite=overwrite)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="ratplus-import-official",
        description="Convert an official rat-plus checkpoint (.pth holding {'task': state_dict}) into the "
        "ratplus-titan export folder (model.safetensors, config.json, tokenizer). Sizes and apply_re are "
        "read off the tensor shapes.",
    )
    parser.add_argument("checkpoint", help="official .pth file")
    parser.add_argument("out_dir", help="folder to write")
    parser.add_argument(
        "--n-heads", type=cli.positive_int, help=f"number of heads (default: the file's config, else d_model / {HEAD_DIM})"
    )
    parser.add_argument("--max-seq-len", type=cli.token_count, default=4096, help="max_seq_len recorded in config.json")
    add_pattern_arguments(parser)
    add_output_arguments(parser)
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="if the weights-only load fails, load with weights_only=False (runs code named in the file)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    options = parser.parse_args(argv)
    pattern = pattern_from_arguments(parser, options)
    with cli.user_errors(parser.prog):
        out = import_official(
            options.checkpoint,
            options.out_dir,
            n_heads=options.n_heads,
            max_seq_len=options.max_seq_len,
            pattern=pattern,
            dtype=options.dtype,
            tokenizer=tokenizer_from_arguments(options),
            trust_pickle=options.trust_pickle,
            overwrite=options.overwrite,
            progress=cli.progress(parser.prog),
        )
    report_written(parser.prog, out, options.dtype)


if __name__ == "__main__":
    main()
