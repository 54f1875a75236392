"""``python -m ratplus_titan.adapters.to_dcp`` on bad input: one line naming the file, exit status 2.

(The round trip export -> DCP -> torchtitan is in test_official.py and test_export.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ratplus_titan.adapters import to_dcp
from ratplus_titan.adapters.layout import save_export
from ratplus_titan.model.args import RATPlusModelArgs
from ratplus_titan.model.model import RATPlusModel
from tests.cli_errors import cli_error

PROG = "python -m ratplus_titan.adapters.to_dcp"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    args = RATPlusModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=101, max_seq_len=64)
    model = RATPlusModel(args)
    model.init_weights()
    out = tmp_path_factory.mktemp("export")
    save_export(out, model.state_dict(), args)
    return out


def test_writes_a_dcp_checkpoint_and_names_the_pattern(export_dir: Path, tmp_path: Path, capsys) -> None:
    to_dcp.main([str(export_dir), str(tmp_path / "dcp")])
    out = capsys.readouterr().out
    assert (tmp_path / "dcp" / ".metadata").is_file()
    assert f"wrote {(tmp_path / 'dcp').resolve()}" in out and "dilation = 1" in out


def test_bad_input_is_one_line_naming_the_file(export_dir: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    out = str(tmp_path / "dcp")
    assert "argument --dtype" in cli_error(capsys, to_dcp.main, [str(bad), out, "--dtype", "int8"])
    line = cli_error(capsys, to_dcp.main, [str(tmp_path / "missing"), out])
    assert line == f"{PROG}: error: {tmp_path / 'missing' / 'config.json'} not found: is {tmp_path / 'missing'} a folder written by ratplus-export?"

    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert f"{weights} cannot be read" in cli_error(capsys, to_dcp.main, [str(bad), out])
    shutil.copy(export_dir / "model.safetensors", weights)

    config_file = bad / "config.json"
    config_file.write_text(config_file.read_text()[:-20])
    assert f"{config_file} is not valid JSON" in cli_error(capsys, to_dcp.main, [str(bad), out])
    config = json.loads((export_dir / "config.json").read_text())
    config_file.write_text(json.dumps({**config, "dtype": "float99"}))
    assert f"{config_file}: dtype 'float99' is not a torch dtype" in cli_error(capsys, to_dcp.main, [str(bad), out])
    shutil.copy(export_dir / "config.json", config_file)

    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / "something").write_text("")
    line = cli_error(capsys, to_dcp.main, [str(bad), out])
    assert line == f"{PROG}: error: {out} exists and is not empty: pass --overwrite to replace it"
    line = cli_error(capsys, to_dcp.main, [str(bad), out, "--overwrite"])  # replaces only a DCP checkpoint
    assert line == (f"{PROG}: error: {out} is not a DCP checkpoint (with a .metadata file): --overwrite replaces "
                    "only that; give a new or empty folder")  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "dcp").iterdir()) == ["something"]


def test_overwrite_replaces_the_whole_checkpoint(export_dir: Path, tmp_path: Path, capsys) -> None:
    """--overwrite replaces a DCP folder as a whole: no shard of the earlier checkpoint stays."""
    out = tmp_path / "dcp"
    to_dcp.main([str(export_dir), str(out)])
    (out / "__7_0.distcp").write_bytes(b"a shard of another checkpoint")
    to_dcp.main([str(export_dir), str(out), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == [".metadata", "__0_0.distcp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dcp"]
