"""ratplus-export on DCP checkpoints written by 2-rank FSDP2 (gloo, CPU), through torchtitan's own
CheckpointManager and through plain ``dcp.save``; and export -> DCP -> torchtitan initial load.
Single-process checkpoints (``dcp.save`` without a process group) for the dtype kept and bad input."""

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
from tests.adapters.test_official import float64_steps, max_error_to_official, official_state_dict, save_official
from tests.cli_errors import cli_error
from tests.corrupt import poison


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
    assert exit_info.value.code == 2
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


# ---- single-process checkpoints: the dtype kept, and bad input ---------------------------------


def _save_dcp(folder: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    import torch.distributed.checkpoint as dcp

    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        dcp.save(state_dict, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)
    return folder


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """``checkpoint/step-2`` holding the fp32 model tensors, as torchtitan's master weights are."""
    state_dict = _workers().make_model(seed=0).state_dict()
    root = tmp_path_factory.mktemp("single") / "checkpoint"
    _save_dcp(root / "step-2", state_dict)
    return root, state_dict


def test_export_keeps_the_checkpoints_dtype(saved_model, tmp_path: Path, capsys) -> None:
    root, state_dict = saved_model
    export_module.main([str(root), str(tmp_path / "default"), "--n-heads", "4", "--no-tokenizer"])
    assert "(float32 tensors, the checkpoint's dtype" in capsys.readouterr().out
    exported = load_export(tmp_path / "default")
    assert exported.dtype == "float32"
    for name, tensor in state_dict.items():
        assert exported.state_dict[name].dtype == torch.float32 and torch.equal(exported.state_dict[name], tensor), name
    export_module.main([str(root), str(tmp_path / "bf16"), "--n-heads", "4", "--no-tokenizer", "--dtype", "bfloat16"])
    assert "(bfloat16 tensors, converted by --dtype)" in capsys.readouterr().out
    assert load_export(tmp_path / "bf16").dtype == "bfloat16"
    bf16_dcp = _save_dcp(tmp_path / "bf16_dcp", {k: v.bfloat16() for k, v in state_dict.items()})
    export_module.main([str(bf16_dcp), str(tmp_path / "from_bf16"), "--n-heads", "4", "--no-tokenizer"])
    assert load_export(tmp_path / "from_bf16").dtype == "bfloat16"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_official_import_to_dcp_and_export_stay_exact(tmp_path: Path, monkeypatch) -> None:
    """fp32 official checkpoint -> import -> DCP -> export, no --dtype anywhere: the logits still match
    test_official's float64 reference to rounding."""
    from ratplus_titan.adapters import official

    sd = official_state_dict()
    official.main([str(save_official(tmp_path / "o.pth", sd, monkeypatch)), str(tmp_path / "imported"), "--n-heads", "4"])
    to_dcp.main([str(tmp_path / "imported"), str(tmp_path / "dcp")])
    export_module.main([str(tmp_path / "dcp"), str(tmp_path / "exported"), "--n-heads", "4", "--no-tokenizer"])
    assert load_export(tmp_path / "exported").dtype == "float32"
    float64_steps(monkeypatch)
    assert max_error_to_official(tmp_path / "exported", sd) < 1e-10


@pytest.mark.parametrize(
    "options, fragments",
    [
        (["--n-heads", "0"], ["argument --n-heads", "integers >= 1"]),
        (["--step", "-1"], ["argument --step", "integers >= 0"]),
        (["--max-seq-len", "x"], ["argument --max-seq-len", "not a token count"]),
        (["--flavor", "13B"], ["argument --flavor", "'13B' is unknown: allowed values are debugmodel", "1B"]),
        (["--pattern", "topk64k8s4-quest"], ["argument --pattern", "inference only"]),
        (["--local-window", "-1"], ["argument --local-window", "Pattern.local_window=-1", ">= 0"]),
        (["--dtype", "half"], ["argument --dtype", "'float32', 'bfloat16', 'float16'"]),
    ],
)
def test_bad_arguments_fail_before_anything_loads(tmp_path: Path, capsys, options, fragments) -> None:
    line = cli_error(capsys, export_module.main, [str(tmp_path / "missing"), str(tmp_path / "out"), *options], fragments)
    assert line.startswith("ratplus-export: error: ")


def test_export_shows_its_stages_on_a_terminal_only(saved_model, tmp_path: Path, capsys, monkeypatch) -> None:
    import sys

    root, _ = saved_model
    export_module.main([str(root), str(tmp_path / "a"), "--n-heads", "4", "--no-tokenizer"])
    assert "reading" not in capsys.readouterr().err  # a log or a pipe: no progress lines
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    export_module.main([str(root), str(tmp_path / "b"), "--n-heads", "4", "--no-tokenizer"])
    assert capsys.readouterr().err.splitlines() == [
        f"ratplus-export: reading the model tensors of {root / 'step-2'}",
        f"ratplus-export: note: {root / 'step-2'} records no training pattern (saved before ratplus-titan recorded "
        "it): config.json gets dense; pass --pattern to record the pattern it was trained/adapted for",
        f"ratplus-export: writing {tmp_path / 'b'}",
    ]


def test_non_finite_weights_are_refused_naming_the_tensor_and_the_shard(saved_model, tmp_path: Path, capsys) -> None:
    """A shard overwritten in place (same size) so that the embedding holds NaN: nothing is exported."""
    import shutil

    root, state_dict = saved_model
    bad = tmp_path / "checkpoint" / "step-2"
    shutil.copytree(root / "step-2", bad)
    (shard,) = bad.glob("*.distcp")
    poison(shard, state_dict["tok_embeddings.weight"], count=3)
    out = tmp_path / "out"
    line = cli_error(capsys, export_module.main, [str(bad), str(out), "--n-heads", "4"])
    assert line == (
        f"ratplus-export: error: {shard}: tensor 'tok_embeddings.weight' holds 3 NaN/inf values (of "
        f"{state_dict['tok_embeddings.weight'].numel():,}): the file is corrupted, or training had diverged when it "
        "was saved; export an earlier step (checkpoint/step-N), or copy this one again"
    )
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_broken_checkpoint_folders_name_the_file(saved_model, tmp_path: Path, capsys) -> None:
    import shutil

    root, _ = saved_model
    bad = tmp_path / "checkpoint" / "step-2"
    shutil.copytree(root / "step-2", bad)
    out = str(tmp_path / "out")
    (shard,) = bad.glob("*.distcp")
    data = shard.read_bytes()

    shard.write_bytes(data[: len(data) // 3])
    line = cli_error(capsys, export_module.main, [str(bad), out, "--n-heads", "4"])
    assert line == f"ratplus-export: error: {shard} is truncated: {len(data) // 3} bytes, the .metadata needs {len(data)}; copy it again"
    shard.write_bytes(data[:100] + bytes(len(data) - 100))  # the right size, its first tensor's archive overwritten
    line = cli_error(capsys, export_module.main, [str(bad), out, "--n-heads", "4"])
    assert f"{bad}: reading the tensors fails (" in line and line.endswith("a shard is corrupted"), line
    shard.unlink()
    line = cli_error(capsys, export_module.main, [str(bad.parent), out, "--n-heads", "4"])  # checkpoint/: takes step-2
    assert f"{bad} lacks 1 of the 1 shard files its .metadata lists ({shard.name})" in line

    metadata = bad / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:50])
    line = cli_error(capsys, export_module.main, [str(bad), out, "--n-heads", "4"])
    assert f"{metadata} cannot be read" in line and "truncated or corrupted" in line
    assert "no step-7; steps found: 2" in cli_error(capsys, export_module.main, [str(bad.parent), out, "--step", "7"])
    metadata.unlink()
    assert f"{bad} holds no DCP checkpoint" in cli_error(capsys, export_module.main, [str(bad), out])
    assert "is not a folder" in cli_error(capsys, export_module.main, [str(tmp_path / "missing"), out])
    assert not (tmp_path / "out").exists()
