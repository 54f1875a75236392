"""ratplus-export on DCP checkpoints written by 2-rank FSDP2 (gloo, CPU), through torchtitan's own
CheckpointManager and through plain ``dcp.save``; and export -> DCP -> torchtitan initial load."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from ratplus_titan.adapters import export as export_module
from ratplus_titan.adapters import to_dcp
from ratplus_titan.adapters.layout import expected_shapes, load_export
from ratplus_titan.model.model import RATPlusModel
from ratplus_titan.pattern import Pattern


def _workers() -> ModuleType:
    folder = str(Path(__file__).parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # spawn hands sys.path to the children
    return importlib.import_module("_fsdp_workers")


@pytest.fixture(scope="module")
def fsdp_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    workers = _workers()
    workers.spawn(workers.save_worker, str(root))
    return root


def _reference_model(root: Path) -> RATPlusModel:
    model = RATPlusModel(_workers().small_args())
    model.load_state_dict(torch.load(root / "reference.pt", weights_only=True))
    return model.eval()


def _exported_model(out: Path) -> RATPlusModel:
    exported = load_export(out)
    model = RATPlusModel(exported.args)
    model.load_state_dict(exported.state_dict)
    return model.eval()


def _tokens() -> torch.Tensor:
    return torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(7))


@pytest.mark.slow  # two spawned processes: ~45 s on a 2-core machine, shared by the module
def test_torchtitan_dcp_layout(fsdp_checkpoints: Path) -> None:
    """The key facts the exporter relies on, checked on what torchtitan 0.2.2 wrote."""
    import torch.distributed.checkpoint as dcp

    model_keys = set(expected_shapes(_workers().small_args()))
    full = dcp.FileSystemReader(str(fsdp_checkpoints / "run" / "checkpoint" / "step-3")).read_metadata()
    keys = set(full.state_dict_metadata)
    assert model_keys <= keys  # model tensors at the top level, plain FQNs (ModelWrapper)
    roots = {key.split(".")[0] for key in keys - model_keys}
    assert roots <= {"optimizer", "lr_scheduler", "train_state", "dataloader"}, roots
    assert "optimizer.state.layers.0.seq_layer.in_proj.weight.exp_avg" in keys
    # the last-step save with last_save_model_only holds the model only, in export_dtype
    last = dcp.FileSystemReader(str(fsdp_checkpoints / "run" / "checkpoint" / "step-5")).read_metadata()
    assert set(last.state_dict_metadata) == model_keys
    assert last.state_dict_metadata["norm.weight"].properties.dtype == torch.bfloat16
    plain = dcp.FileSystemReader(str(fsdp_checkpoints / "plain" / "checkpoint" / "step-3")).read_metadata()
    assert set(plain.state_dict_metadata) == model_keys


@pytest.mark.slow  # two spawned processes: ~45 s on a 2-core machine, shared by the module
@pytest.mark.parametrize("pattern", [Pattern(), Pattern(4, 3, 1)], ids=str)
def test_export_of_fsdp_checkpoint_matches_unsharded_model(fsdp_checkpoints: Path, tmp_path: Path, pattern) -> None:
    reference = _reference_model(fsdp_checkpoints)
    out = tmp_path / "export"
    export_module.main(
        [str(fsdp_checkpoints / "run" / "checkpoint"), str(out), "--step", "3", "--n-heads", "4", "--dtype", "float32",
         "--pattern", str(pattern)]
    )
    model = _exported_model(out)
    config = json.loads((out / "config.json").read_text())
    assert config["pattern"] == {"dilation": pattern.dilation, "local_window": pattern.local_window, "sinks": pattern.sinks}
    assert config["model_args"]["n_heads"] == 4 and config["model_args"]["apply_re"] is True
    assert (out / "tokenizer.model").read_bytes() == export_module.default_tokenizer().read_bytes()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    model.set_patterns([pattern] * model.args.n_layers)
    reference.set_patterns([pattern] * reference.args.n_layers)
    with torch.no_grad():
        torch.testing.assert_close(model(_tokens()), reference(_tokens()), rtol=0, atol=0)


@pytest.mark.slow  # two spawned processes: ~45 s on a 2-core machine, shared by the module
@pytest.mark.parametrize("which", ["latest", "plain"])
def test_export_latest_and_plain_checkpoints(fsdp_checkpoints: Path, tmp_path: Path, which: str) -> None:
    reference = _reference_model(fsdp_checkpoints)
    if which == "latest":  # checkpoint/ -> step-5: model only, saved in bf16
        source, dtype, tol = fsdp_checkpoints / "run" / "checkpoint", "bfloat16", 2e-2
    else:
        source, dtype, tol = fsdp_checkpoints / "plain" / "checkpoint" / "step-3", "float32", 0.0
    out = tmp_path / "export"
    export_module.main([str(source), str(out), "--n-heads", "4", "--dtype", dtype, "--no-tokenizer"])
    assert not (out / "tokenizer.model").exists()
    model = _exported_model(out).float()
    with torch.no_grad():
        torch.testing.assert_close(model(_tokens()), reference(_tokens()), rtol=tol, atol=tol)


@pytest.mark.slow  # two spawned processes: ~45 s on a 2-core machine, shared by the module
def test_export_of_tensor_parallel_checkpoint(fsdp_checkpoints: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    export_module.main([str(fsdp_checkpoints / "tp" / "step-1"), str(out), "--n-heads", "4", "--dtype", "float32"])
    model, reference = _exported_model(out), _workers().make_model(seed=0).eval()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    with torch.no_grad():
        torch.testing.assert_close(model(_tokens()), reference(_tokens()), rtol=0, atol=0)


@pytest.mark.slow  # two spawned processes: ~45 s on a 2-core machine, shared by the module
def test_export_errors(fsdp_checkpoints: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = str(fsdp_checkpoints / "run" / "checkpoint" / "step-3")
    with pytest.raises(ValueError, match="match no flavor"):  # head count is never guessed
        export_module.export_dcp(source, tmp_path / "a")
    with pytest.raises(KeyError, match="layers.2.seq_layer.input_norm.weight"):  # wrong flavor: names the tensor
        export_module.export_dcp(source, tmp_path / "b", flavor="debugmodel")
    with pytest.raises(ValueError, match="seq_layer.in_proj.weight"):  # wrong apply_re: names the tensor
        export_module.export_dcp(source, tmp_path / "c", n_heads=4, apply_re=False)
    with pytest.raises(FileNotFoundError, match="no step-4"):
        export_module.export_dcp(fsdp_checkpoints / "run" / "checkpoint", tmp_path / "d", n_heads=4, step=4)
    with pytest.raises(SystemExit) as exit_info:
        export_module.main([source, str(tmp_path / "e"), "--flavor", "debugmodel"])
    assert exit_info.value.code == 1
    assert "layers.2.seq_layer.input_norm.weight" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_module.main([source, str(tmp_path / "f"), "--pattern", "d4w3s1", "--dilation", "4"])


@pytest.mark.slow  # two spawned processes: ~45 s on a 2-core machine, shared by the module
def test_export_to_dcp_loads_through_torchtitan_on_two_ranks(fsdp_checkpoints: Path) -> None:
    """export -> to_dcp -> a fresh 2-rank FSDP2 model loads it via checkpoint.initial_load_path
    (done inside the fixture's processes: see ``_fsdp_workers.save_worker``)."""
    loaded = torch.load(fsdp_checkpoints / "loaded.pt", weights_only=True)
    reference = torch.load(fsdp_checkpoints / "reference.pt", weights_only=True)
    assert set(loaded) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(loaded[name], tensor), name
    fresh = _workers().make_model(seed=1234).state_dict()
    assert not torch.equal(fresh["layers.0.seq_layer.in_proj.weight"], reference["layers.0.seq_layer.in_proj.weight"])


def test_cli_help() -> None:
    for main in (export_module.main, to_dcp.main):
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0
