"""Exported folder -> a DCP checkpoint torchtitan 0.2.2 loads as a model-only initial checkpoint.

``python -m ratplus_titan.adapters.to_dcp EXPORT_DIR DCP_OUT`` writes ``DCP_OUT/.metadata`` and
one ``.distcp`` shard holding the model's state dict under the names torchtitan's ``ModelWrapper``
uses (plain FQNs at the top level: ``tok_embeddings.weight``, ``layers.{i}.seq_layer.in_proj.weight``,
...), plus the export's pattern as a training record (``ratplus_titan.training_record``), which a
model-only load ignores. Start a run from it with::

    [checkpoint]
    enable = true
    initial_load_path = "DCP_OUT"
    initial_load_model_only = true

torchtitan reads ``initial_load_path`` only while ``{dump_folder}/{checkpoint.folder}`` does not
exist yet; DCP reshards the full tensors onto whatever FSDP/TP layout the run uses.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from ratplus_titan import cli

from .folder import check_writable, written_folder


def is_dcp_checkpoint(path: Path) -> bool:
    return (path / ".metadata").is_file()


def export_to_dcp(export_dir: str | Path, dcp_out: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write the model of an exported folder as a single-process DCP checkpoint.

    ``float32`` by default: the dtype of torchtitan's (FSDP mixed-precision) master weights.
    DCP casts on load anyway, so a bf16 checkpoint also loads, with bf16-rounded weights.
    ``dcp_out`` is written whole and then put in place (``folder.written_folder``); a non-empty one is
    replaced only with ``overwrite``, and only if it is a DCP checkpoint.
    """
    import torch
    import torch.distributed.checkpoint as dcp

    from ratplus_titan.training_record import RECORD_KEY, TrainingRecord

    from .layout import load_export

    what = "a DCP checkpoint (with a .metadata file)"
    check_writable(Path(dcp_out), overwrite, is_dcp_checkpoint, what)  # before the model is read
    exported = load_export(export_dir)
    torch_dtype = getattr(torch, dtype)
    state_dict = {name: tensor.to(torch_dtype).contiguous() for name, tensor in exported.state_dict.items()}
    # the pattern recorded in config.json, as a training run records its own (ratplus-export reads it back)
    state_dict[RECORD_KEY] = TrainingRecord(exported.pattern, exported.args.apply_re).to_tensor()
    with written_folder(dcp_out, overwrite, is_dcp_checkpoint, what) as folder:
        with warnings.catch_warnings():  # the single-process save is the intent, not a fallback
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state_dict, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)
    return Path(dcp_out)


def pattern_settings(pattern: dict) -> str:
    """The ``[ratplus]`` job-config lines of the pattern an export was trained/adapted for."""
    return "\n".join(f"{key} = {pattern[key]}" for key in ("dilation", "local_window", "sinks"))


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m ratplus_titan.adapters.to_dcp",
        description="Write an exported RAT+ folder (ratplus-export / ratplus-import-official) as a DCP checkpoint "
        "for torchtitan's checkpoint.initial_load_path (model only).",
    )
    parser.add_argument("export_dir", help="folder with model.safetensors and config.json")
    parser.add_argument("dcp_out", help="DCP folder to write (give it as checkpoint.initial_load_path)")
    parser.add_argument("--dtype", choices=cli.DTYPES, default="float32", help="dtype of the stored tensors")
    parser.add_argument("--overwrite", action="store_true", help="replace DCP_OUT if it is a DCP checkpoint")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    options = parser.parse_args(argv)
    from .layout import read_config

    with cli.user_errors(parser.prog):
        out = export_to_dcp(options.export_dir, options.dcp_out, options.dtype, options.overwrite).resolve()
        pattern = read_config(Path(options.export_dir) / "config.json")["pattern"]
    print(
        f"to_dcp: wrote {out}\n"
        f"start from it with: --checkpoint.enable --checkpoint.initial_load_path {out} "
        "(initial_load_model_only is true by default)\n"
        f"the export was trained/adapted for this [ratplus] pattern:\n{pattern_settings(pattern)}"
    )


if __name__ == "__main__":
    main()
