"""``ratplus-export``: a torchtitan DCP checkpoint -> the exported-model folder (``layout.py``).

torchtitan 0.2.2 (``components/checkpoint.py``) writes ``{dump_folder}/{checkpoint.folder}/step-N/``
(a ``.metadata`` file plus ``__R_0.distcp`` shards). Its ``ModelWrapper`` puts the model's
tensors at the top level of the DCP state dict under their plain FQNs
(``tok_embeddings.weight``, ``layers.0.seq_layer.in_proj.weight``, ...: ``get_model_state_dict``
drops the ``_orig_mod.``/``_checkpoint_wrapped_module.`` wrapper names); everything else
lives under ``optimizer.``, ``lr_scheduler.``, ``dataloader.``, ``train_state``. A
``last_save_model_only`` (or step-0 seed) checkpoint holds only the model keys.

DCP stores each tensor as its global (unsharded) shape, so a checkpoint saved under any
FSDP/TP layout loads here into plain full CPU tensors, without a process group.

The pattern recorded in config.json is ``--pattern`` if given, else the one the checkpoint was
trained with (``ratplus_titan.training_record``, saved by ``RATPlusTrainer``), else dense (a
checkpoint saved before the record existed; a note says so).

torch, torchtitan and the model are imported inside the functions that use them, so that
``--help`` and bad arguments answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ratplus_titan import cli

if TYPE_CHECKING:
    import torch

    from ratplus_titan.model.args import RATPlusModelArgs

Progress = Callable[[str], None]

# First FQN component of every model tensor torchtitan writes for a RAT+ model
# ("output" only shows up if someone saved an untied head: check_state_dict then names it).
MODEL_ROOTS = ("tok_embeddings", "layers", "norm", "output")
# Module-wrapper names that may appear inside FQNs written by other tools.
WRAPPER_NAMES = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")
_STEP_DIR = re.compile(r"^step-(\d+)$")


def default_tokenizer() -> Path:
    """The LLaMA-2 SentencePiece model shipped with the package."""
    import ratplus_titan

    return Path(ratplus_titan.__file__).parent / "assets" / "llama2" / "tokenizer.model"


# ---- finding and reading the DCP checkpoint ----------------------------------------------


def find_checkpoint(path: str | Path, step: int | None = None) -> Path:
    """``path`` is a DCP folder (has ``.metadata``) or a folder of ``step-N`` DCP folders."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder: give a torchtitan checkpoint/ or checkpoint/step-N folder")
    if (path / ".metadata").is_file():
        if step is not None:
            match = _STEP_DIR.match(path.name)
            if match is None or int(match[1]) != step:
                raise ValueError(f"--step {step} was given but {path} is itself a DCP checkpoint ({path.name})")
        return path
    steps = {}
    for child in path.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / ".metadata").is_file():
            steps[int(match[1])] = child
    if not steps:
        raise FileNotFoundError(f"{path} holds no DCP checkpoint: no .metadata and no step-N/.metadata inside")
    if step is None:
        return steps[max(steps)]
    if step not in steps:
        raise FileNotFoundError(f"{path} has no step-{step}; steps found: {', '.join(map(str, sorted(steps)))}")
    return steps[step]


def canonical_name(key: str) -> str:
    """Drop module-wrapper components (``_orig_mod`` etc.) from a tensor name."""
    return ".".join(part for part in key.split(".") if part not in WRAPPER_NAMES)


def read_metadata(checkpoint_dir: Path):
    """The DCP ``.metadata`` of ``checkpoint_dir``; an unreadable one is a ``ValueError`` naming it."""
    import torch.distributed.checkpoint as dcp

    try:
        return dcp.FileSystemReader(str(checkpoint_dir)).read_metadata()
    except (EOFError, pickle.UnpicklingError, RuntimeError) as err:
        raise ValueError(
            f"{checkpoint_dir / '.metadata'} cannot be read ({type(err).__name__}: {err}): the file is truncated or "
            "corrupted; copy the step-N folder again"
        ) from None


def read_tensors(checkpoint_dir: Path, wanted: dict[str, torch.Tensor]) -> None:
    """``dcp.load`` of ``wanted`` (full tensors, filled in place) in this process; a failure names the folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():  # the single-process load is the intent, not a fallback
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(wanted, storage_reader=dcp.FileSystemReader(str(checkpoint_dir)), no_dist=True)
        except CheckpointException as err:  # a BaseException: one per failed rank, here rank 0
            reasons = "; ".join(f"{type(e).__name__}: {str(e).split('. ')[0]}" for e, _ in err.failures.values())
            raise ValueError(f"{checkpoint_dir}: reading the tensors fails ({reasons}): a shard is corrupted") from None


def load_dcp_model_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a DCP checkpoint as a full CPU tensor in its saved dtype.

    Non-model entries (optimizer, lr_scheduler, dataloader, train_state) are not read. A tensor
    holding a NaN or an infinity is a ``ValueError`` naming it and the shard file it is stored in.
    """
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .layout import check_finite

    checkpoint_dir = Path(checkpoint_dir)
    metadata = read_metadata(checkpoint_dir)
    wanted: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for key, meta in metadata.state_dict_metadata.items():
        name = canonical_name(key)
        if not isinstance(meta, TensorStorageMetadata) or name.split(".")[0] not in MODEL_ROOTS:
            continue
        if name in names.values():
            raise ValueError(f"{checkpoint_dir}: tensor {name!r} is stored twice (as {key!r} and another name)")
        wanted[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        names[key] = name
    if not wanted:
        sample = ", ".join(sorted(metadata.state_dict_metadata)[:5])
        raise ValueError(
            f"{checkpoint_dir} holds no model tensors (names starting with {', '.join(MODEL_ROOTS)}); "
            f"its first entries are: {sample}"
        )
    check_shard_files(checkpoint_dir, metadata)
    read_tensors(checkpoint_dir, wanted)
    check_finite(
        wanted,
        lambda key, tensor: ", ".join(str(checkpoint_dir / f) for f in files_with_non_finite(metadata, key, tensor)),
        fix="export an earlier step (checkpoint/step-N), or copy this one again",
    )
    return {names[key]: tensor for key, tensor in wanted.items()}


def read_training_record(checkpoint_dir: Path):
    """The checkpoint's ``TrainingRecord`` (the pattern it was trained with), or None if it has none."""
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from ratplus_titan.training_record import RECORD_KEY, TrainingRecord

    meta = read_metadata(checkpoint_dir).state_dict_metadata.get(RECORD_KEY)
    if meta is None:
        return None
    if not isinstance(meta, TensorStorageMetadata) or meta.properties.dtype != torch.uint8:
        raise ValueError(f"{checkpoint_dir}: {RECORD_KEY!r} is not a uint8 tensor; pass --pattern instead")
    wanted = {RECORD_KEY: torch.empty(tuple(meta.size), dtype=torch.uint8)}
    read_tensors(checkpoint_dir, wanted)
    return TrainingRecord.from_tensor(wanted[RECORD_KEY], str(checkpoint_dir))


def files_with_non_finite(metadata, key: str, tensor: torch.Tensor) -> list[str]:
    """The shard files (relative paths) holding the chunks of DCP tensor ``key`` that are not all finite."""
    import torch
    from torch.distributed.checkpoint.metadata import MetadataIndex

    files = []
    for chunk in metadata.state_dict_metadata[key].chunks:
        part = tensor[tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes))]
        if not bool(torch.isfinite(part).all()):
            files.append(metadata.storage_data[MetadataIndex(key, chunk.offsets)].relative_path)
    return sorted(set(files))


def check_shard_files(checkpoint_dir: Path, metadata) -> None:
    """Every shard file the ``.metadata`` names exists and is long enough (a copy cut short shows here)."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    missing = sorted(name for name in needed if not (checkpoint_dir / name).is_file())
    if missing:
        raise FileNotFoundError(
            f"{checkpoint_dir} lacks {len(missing)} of the {len(needed)} shard files its .metadata lists "
            f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}): copy the whole step-N folder"
        )
    for name, size in sorted(needed.items()):
        found = (checkpoint_dir / name).stat().st_size
        if found < size:
            raise ValueError(
                f"{checkpoint_dir / name} is truncated: {found} bytes, the .metadata needs {size}; copy it again"
            )


# ---- model arguments ------------------------------------------------------------------------


def shape_summary(state_dict: dict[str, torch.Tensor]) -> dict[str, int | bool]:
    """dim, vocab_size, n_layers, ffn_multiplier and apply_re read off the tensor shapes."""
    if "tok_embeddings.weight" not in state_dict:
        raise KeyError("checkpoint is missing tensor 'tok_embeddings.weight'")
    vocab_size, dim = state_dict["tok_embeddings.weight"].shape
    layer_ids = {int(name.split(".")[1]) for name in state_dict if name.startswith("layers.")}
    n_layers = max(layer_ids) + 1 if layer_ids else 0
    in_proj = state_dict.get("layers.0.seq_layer.in_proj.weight")
    fc1 = state_dict.get("layers.0.ffn.fc1.weight")
    return {
        "dim": int(dim),
        "vocab_size": int(vocab_size),
        "n_layers": n_layers,
        "ffn_multiplier": int(fc1.shape[0] // dim) if fc1 is not None else 4,
        "apply_re": bool(in_proj is None or in_proj.shape[0] == 5 * dim),
    }


def resolve_args(
    state_dict: dict[str, torch.Tensor],
    flavor: str | None = None,
    n_heads: int | None = None,
    apply_re: bool | None = None,
    max_seq_len: int | None = None,
    source: str = "checkpoint",
) -> RATPlusModelArgs:
    """Model args for ``state_dict``: from ``flavor`` (checked against the shapes) or read off the shapes.

    Without a flavor the head count cannot be read off any shape, so it comes from
    ``n_heads`` or from the flavor whose sizes match; a wrong head count would silently
    scramble the head-interleaved ``in_proj``, so it is never guessed.
    """
    from ratplus_titan.model.args import RATPlusModelArgs
    from ratplus_titan.model.flavors import ratplus_flavors

    from .layout import check_state_dict

    found = shape_summary(state_dict)
    if apply_re is None:
        apply_re = bool(found["apply_re"])
    if flavor is not None:
        if flavor not in ratplus_flavors:
            raise ValueError(f"flavor {flavor!r} is unknown: allowed values are {', '.join(ratplus_flavors)}")
        base = ratplus_flavors[flavor]
        changes: dict = {"apply_re": apply_re}
    else:
        sizes = {key: found[key] for key in ("dim", "vocab_size", "n_layers", "ffn_multiplier")}
        matching = [name for name, a in ratplus_flavors.items() if all(getattr(a, k) == v for k, v in sizes.items())]
        if n_heads is None and not matching:
            raise ValueError(
                f"{source}: sizes {sizes} match no flavor ({', '.join(ratplus_flavors)}); "
                "give --flavor, or --n-heads so the model can be described from the shapes"
            )
        base = ratplus_flavors[matching[0]] if matching else RATPlusModelArgs()
        changes = {**sizes, "apply_re": apply_re}
    if n_heads is not None:
        changes["n_heads"] = n_heads
    if max_seq_len is not None:
        changes["max_seq_len"] = max_seq_len
    # A fresh instance: the flavor table's entries are shared and must not be mutated.
    args = dataclasses.replace(base, **changes)
    check_state_dict(args, state_dict, source=source)
    return args


# ---- the pattern recorded in config.json -----------------------------------------------------


def pattern_values(field: str):
    """argparse type of ``--dilation``/``--local-window``/``--sinks``: an int, or one per layer (comma-separated)."""

    def parse(text: str) -> int | list[int]:
        from ratplus_titan.pattern import Pattern

        try:
            values = [int(v) for v in text.split(",")]
            for value in values:
                Pattern(**{field: value})  # names the field and its allowed values
        except ValueError as err:
            message = str(err) if field in str(err) else f"{text!r} is not an integer or a comma-separated list of them"
            raise argparse.ArgumentTypeError(message) from None
        return values[0] if len(values) == 1 else values

    parse.__name__ = field
    return parse


def add_pattern_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "pattern",
        "the attention pattern the weights were trained/adapted for, recorded in config.json (default: the "
        "pattern the checkpoint was trained with, if it records one; else dense)",
    )
    group.add_argument(
        "--pattern",
        type=cli.pattern_list(training=True),
        help="'dense', 'd<D>w<W>s<S>' (e.g. d16w256s4) or head groups (e.g. '8:dense+8:d64w0s0'): one for every "
        "layer, or one per layer comma-separated",
    )
    group.add_argument("--dilation", type=pattern_values("dilation"), help="D: an int, or one per layer (comma-separated); -1 = none")
    group.add_argument("--local-window", type=pattern_values("local_window"), help="W: an int or one per layer")
    group.add_argument("--sinks", type=pattern_values("sinks"), help="S: an int or one per layer")


def pattern_from_arguments(parser: argparse.ArgumentParser, options: argparse.Namespace) -> tuple | None:
    """``(dilation, local_window, sinks[, head_groups])`` from the CLI (``args.set_pattern``'s arguments), or None."""
    from ratplus_titan.pattern import Pattern

    parts = (options.dilation, options.local_window, options.sinks)
    if options.pattern is not None:
        if any(p is not None for p in parts):
            parser.error("give --pattern or --dilation/--local-window/--sinks, not both")
        patterns = options.pattern
        if len(patterns) == 1 and isinstance(patterns[0], Pattern):
            pattern = patterns[0]
            return pattern.dilation, pattern.local_window, pattern.sinks
        return 1, 0, 0, [str(p) for p in patterns]  # head groups, or one per layer: checked against the model by set_pattern
    if all(p is None for p in parts):
        return None
    dilation, window, sinks = parts
    return (1 if dilation is None else dilation, 0 if window is None else window, 0 if sinks is None else sinks)


def apply_pattern(args: RATPlusModelArgs, pattern: tuple | None) -> None:
    if pattern is not None:
        args.set_pattern(*pattern)  # validates (and names the layer for per-layer lists)


# ---- the exporter --------------------------------------------------------------------------


def export_dcp(
    checkpoint: str | Path,
    out_dir: str | Path,
    flavor: str | None = None,
    n_heads: int | None = None,
    apply_re: bool | None = None,
    max_seq_len: int | None = None,
    pattern: tuple | None = None,
    dtype: str | None = None,
    tokenizer: str | Path | None = None,
    step: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    note: Progress | None = None,
) -> Path:
    """Read the model tensors of a torchtitan DCP checkpoint and write the exported folder.

    ``pattern``: ``set_pattern``'s arguments; None takes the checkpoint's training record (else dense).
    ``dtype``: of the exported tensors; default the checkpoint's (``layout.source_dtype``).
    ``overwrite``: replace an existing export at ``out_dir``. ``progress``: called with a line per
    stage; ``note``: with a line saying where the recorded pattern came from.
    """
    from .layout import expected_shapes, is_export, save_export

    say, tell = progress or (lambda line: None), note or (lambda line: None)
    check_output(out_dir, overwrite, is_export)
    checkpoint_dir = find_checkpoint(checkpoint, step)
    say(f"reading the model tensors of {checkpoint_dir}")
    state_dict = load_dcp_model_state_dict(checkpoint_dir)
    args = resolve_args(state_dict, flavor, n_heads, apply_re, max_seq_len, source=str(checkpoint_dir))
    if pattern is None:
        record = read_training_record(checkpoint_dir)
        pattern = (1, 0, 0) if record is None else record.pattern_setting  # dense: whatever the flavor table holds
        apply_pattern(args, pattern)
        if record is None:
            tell(f"note: {checkpoint_dir} records no training pattern (saved before ratplus-titan recorded it): "
                 "config.json gets dense; pass --pattern to record the pattern it was trained/adapted for")  # fmt: skip
        else:
            tell(f"pattern {cli.describe_patterns(args.patterns)}: the one the checkpoint was trained with "
                 "(--pattern overrides it)")  # fmt: skip
    apply_pattern(args, pattern)
    state_dict = {name: state_dict[name] for name in expected_shapes(args)}
    say(f"writing {out_dir}")
    return save_export(out_dir, state_dict, args, dtype=dtype, tokenizer_path=tokenizer, overwrite=overwrite)


def check_output(out_dir: str | Path, overwrite: bool, is_export: Callable[[Path], bool]) -> None:
    """Refuse a non-empty ``out_dir`` before a long read (``save_export`` checks again when it writes)."""
    from .folder import check_writable

    check_writable(Path(out_dir), overwrite, is_export, "a folder written by ratplus-export")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="ratplus-export",
        description="Export a torchtitan DCP checkpoint of a RAT+ model (saved under any FSDP/TP layout) "
        "to a folder with model.safetensors, config.json and the tokenizer.",
    )
    parser.add_argument("checkpoint", help="a checkpoint/step-N folder, or a checkpoint/ folder (takes the latest step)")
    parser.add_argument("out_dir", help="folder to write")
    parser.add_argument(
        "--step", type=cli.non_negative_int, help="with a checkpoint/ folder: the step to export (default: latest)"
    )
    parser.add_argument(
        "--flavor",
        type=flavor_name,
        help="model flavor (ratplus_titan/model/flavors.py, e.g. 1B); default: read the sizes off the tensors "
        "(a matching flavor gives the head count)",
    )
    parser.add_argument("--n-heads", type=cli.positive_int, help="number of heads (needed when no flavor matches the sizes)")
    parser.add_argument(
        "--max-seq-len", type=cli.token_count, help="max_seq_len recorded in config.json (default: the flavor's)"
    )
    parser.add_argument(
        "--apply-re",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether the model has the recurrence (forget gate); default: read off the in_proj shape",
    )
    add_pattern_arguments(parser)
    add_output_arguments(parser)
    return parser


def flavor_name(text: str) -> str:
    """argparse type of ``--flavor``: a name in the flavor table (imported here, not for ``--help``)."""
    from ratplus_titan.model.flavors import ratplus_flavors

    if text not in ratplus_flavors:
        raise argparse.ArgumentTypeError(f"{text!r} is unknown: allowed values are {', '.join(ratplus_flavors)}")
    return text


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it holds an earlier export")
    parser.add_argument(
        "--dtype",
        choices=cli.DTYPES,
        help="convert the exported tensors to this dtype (default: keep the checkpoint's dtype)",
    )
    parser.add_argument("--tokenizer", help="tokenizer file or folder to copy (default: the shipped LLaMA-2 tokenizer)")
    parser.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer")


def tokenizer_from_arguments(options: argparse.Namespace) -> Path | None:
    if options.no_tokenizer:
        return None
    return Path(options.tokenizer) if options.tokenizer else default_tokenizer()


def report_written(prog: str, out_dir: Path, requested_dtype: str | None) -> None:
    """One line: where the export went and in which dtype (read back from its config.json)."""
    dtype = json.loads((Path(out_dir) / "config.json").read_text())["dtype"]
    how = "converted by --dtype" if requested_dtype else "the checkpoint's dtype; --dtype converts"
    print(f"{prog}: wrote {out_dir} ({dtype} tensors, {how})")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    options = parser.parse_args(argv)
    pattern = pattern_from_arguments(parser, options)
    with cli.user_errors(parser.prog):
        out = export_dcp(
            options.checkpoint,
            options.out_dir,
            flavor=options.flavor,
            n_heads=options.n_heads,
            apply_re=options.apply_re,
            max_seq_len=options.max_seq_len,
            pattern=pattern,
            dtype=options.dtype,
            tokenizer=tokenizer_from_arguments(options),
            step=options.step,
            overwrite=options.overwrite,
            progress=cli.progress(parser.prog),
            note=lambda line: cli.note(parser.prog, line),
        )
    report_written(parser.prog, out, options.dtype)


if __name__ == "__main__":
    main()
