"""Exported folder -> a DCP checkpoint torchtitan 0.2.2 loads as a model-only initial checkpoint.

``python -m ratplus_titan.adapters.to_dcp EXPORT_DIR DCP_OUT`` writes ``DCP_OUT/.metadata`` and
one ``.distcp`` shard holding exactly the model's state dict under the names torchtitan's
``ModelWrapper`` uses (plain FQNs at the top level: ``tok_embeddings.weight``,
``layers.{i}.seq_layer.in_proj.weight``, ...). Start a run from it with::

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

import torch

from ratplus_titan import cli

from .layout import load_export, read_config


def export_to_dcp(export_dir: str | Path, dcp_out: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write the model of an exported folder as a single-process DCP checkpoint.

    ``float32`` by default: the dtype of torchtitan's (FSDP mixed-precision) master weights.
    DCP casts on load anyway, so a bf16 checkpoint also loads, with bf16-rounded weights.
    """
    import torch.distributed.checkpoint as dcp

    exported = load_export(export_dir)
    dcp_out = Path(dcp_out)
    if dcp_out.exists() and any(dcp_out.iterdir()) and not overwrite:
        raise FileExistsError(f"{dcp_out} exists and is not empty (pass --overwrite to write into it)")
    dcp_out.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    state_dict = {name: tensor.to(torch_dtype).contiguous() for name, tensor in exported.state_dict.items()}
    with warnings.catch_warnings():  # the single-process save is the intent, not a fallback
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state_dict, storage_writer=dcp.FileSystemWriter(str(dcp_out)), no_dist=True)
    return dcp_out


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
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty DCP_OUT")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    options = parser.parse_args(argv)
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
