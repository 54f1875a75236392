"""The ``ratplus-generate`` command line (``ratplus_titan/generate.py``): output, and bad input as one line."""

import json
import shutil

import pytest

from ratplus_titan.generate import build_parser, main
from ratplus_titan.inference import RATPlusLM
from tests.cli_errors import cli_error


def test_cli_generates_and_reports(export_dir, capsys):
    assert main([str(export_dir), "--prompt", "Hello", "--pattern", "d4w8s2", "--max-new-tokens", "4",
                 "--device", "cpu", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "cache memory" in out and "bytes" in out
    assert main([str(export_dir), "--prompt", "a", "--prompt", "bcd", "--pattern", "dense,d4w8s2",
                 "--max-new-tokens", "3", "--device", "cpu", "--temperature", "0.7", "--seed", "1"]) == 0
    assert "[1] bcd" in capsys.readouterr().out


def test_cli_help_documents_every_option(capsys):
    parser = build_parser()
    for action in parser._actions:
        assert action.help, f"option {action.option_strings or action.dest} has no help text"
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--max-new-tokens" in capsys.readouterr().out


@pytest.mark.parametrize(
    "options, fragments",
    [
        (["--pattern", "d0w256s4"], ["argument --pattern", "Pattern.dilation=0", "allowed values are -1"]),
        (["--pattern", "dwx"], ["argument --pattern", "'dwx' is invalid", "'d<dilation>w<window>s<sinks>'", "topk"]),
        (["--pattern", "topk64k0s4-best"], ["argument --pattern", "'topk64k0s4-best'", "score='best' is invalid", "quest, moba, ratplus"]),
        (["--pattern", "d4w8s2,d4w8"], ["argument --pattern", "layer 1 of 2", "'d4w8' is invalid"]),
        (["--max-new-tokens", "-1"], ["argument --max-new-tokens", "-1 is invalid", "integers >= 1"]),
        (["--max-new-tokens", "0"], ["argument --max-new-tokens", "integers >= 1"]),
        (["--max-seq-len", "0"], ["argument --max-seq-len", "integers >= 1"]),
        (["--temperature", "-1"], ["argument --temperature", "numbers >= 0"]),
        (["--top-p", "1.5"], ["argument --top-p", "numbers in (0, 1]"]),
        (["--top-k", "-2"], ["argument --top-k", "integers >= 0"]),
        (["--stop", ""], ["argument --stop", "empty string"]),
        (["--dtype", "float64"], ["argument --dtype", "'float32', 'bfloat16', 'float16'"]),
        (["--device", "tpu:0"], ["argument --device", "not a torch device"]),
        (["--decode-mode", "fast"], ["argument --decode-mode", "'auto', 'eager', 'graph', 'compile'"]),
    ],
)
def test_bad_arguments_fail_before_anything_loads(tmp_path, capsys, options, fragments):
    """MODEL_DIR does not even exist: the values are checked first, by argparse."""
    line = cli_error(capsys, main, [str(tmp_path / "missing"), "--prompt", "Hi", *options], fragments)
    assert line.startswith("ratplus-generate: error: argument ")


def _copy(export_dir, tmp_path):
    bad = tmp_path / "model"
    shutil.copytree(export_dir, bad)
    return bad


def test_truncated_safetensors_names_the_file(export_dir, tmp_path, capsys):
    bad = _copy(export_dir, tmp_path)
    weights = bad / "model.safetensors"
    for size in (weights.stat().st_size // 2, 6):
        weights.write_bytes((export_dir / "model.safetensors").read_bytes()[:size])
        line = cli_error(capsys, main, [str(bad), "--prompt", "Hi", "--device", "cpu"])
        assert f"{weights} cannot be read" in line and "truncated or corrupted" in line, line
    weights.unlink()
    assert f"{weights} not found" in cli_error(capsys, main, [str(bad), "--prompt", "Hi", "--device", "cpu"])


def test_corrupted_config_names_the_file_and_field(export_dir, tmp_path, capsys):
    bad = _copy(export_dir, tmp_path)
    config_file = bad / "config.json"
    good = json.loads(config_file.read_text())
    argv = [str(bad), "--prompt", "Hi", "--device", "cpu", "--pattern", "config"]

    config_file.write_text(config_file.read_text()[:60])  # cut short
    line = cli_error(capsys, main, argv)
    assert f"{config_file} is not valid JSON" in line, line
    config_file.write_bytes(b"\xff\xfe garbage")
    assert f"{config_file} is not valid JSON" in cli_error(capsys, main, argv)
    config_file.write_text(json.dumps({**good, "format": "other"}))
    assert "format 'other' is not 'ratplus-titan'" in cli_error(capsys, main, argv)
    config_file.write_text(json.dumps({k: v for k, v in good.items() if k != "pattern"}))
    assert f"{config_file} has no 'pattern' field" in cli_error(capsys, main, argv)
    config_file.write_text(json.dumps({**good, "pattern": {"dilation": 0, "local_window": 8, "sinks": 2}}))
    line = cli_error(capsys, main, argv)
    assert str(config_file) in line and "dilation=0 is invalid: allowed values are -1" in line, line
    config_file.write_text(json.dumps({**good, "model_args": {**good["model_args"], "dim": "32"}}))
    assert str(config_file) in cli_error(capsys, main, argv)
    config_file.write_text(json.dumps({**good, "model_args": {**good["model_args"], "dim": 64}}))
    line = cli_error(capsys, main, argv)  # the tensors no longer fit the config
    assert f"{bad / 'model.safetensors'} tensor 'tok_embeddings.weight' has shape (32000, 32), expected (32000, 64)" in line


def test_missing_folder_and_tokenizer(export_dir, tmp_path, capsys):
    line = cli_error(capsys, main, [str(tmp_path / "missing"), "--prompt", "Hi"])
    assert f"{tmp_path / 'missing' / 'config.json'} not found" in line
    bad = _copy(export_dir, tmp_path)
    (bad / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    assert f"{bad / 'tokenizer.model'} cannot be read as a SentencePiece model" in cli_error(
        capsys, main, [str(bad), "--prompt", "Hi", "--device", "cpu"]
    )
    (bad / "tokenizer.model").unlink()
    assert "holds no tokenizer.model or tokenizer.json" in cli_error(capsys, main, [str(bad), "--prompt", "Hi"])


@pytest.mark.parametrize(
    "options, fragments",
    [
        (["--pattern", "dense,dense,dense"], ["3 patterns given for a model of 2 layers"]),
        (["--pattern", "3:dense+1:d4w8s2"], ["head counts 3 + 1 = 4 do not sum to n_heads=2"]),
        (["--max-seq-len", "4"], ["prompt 0 has", "max_seq_len=4"]),
        (["--decode-mode", "graph"], ["decode mode 'graph' needs a CUDA device", "auto or eager"]),
    ],
)
def test_requests_the_model_cannot_serve(export_dir, capsys, options, fragments):
    cli_error(capsys, main, [str(export_dir), "--prompt", "Hi", "--device", "cpu", "--pattern", "d4w8s2", *options], fragments)


def test_a_failure_while_generating_keeps_its_traceback(export_dir, monkeypatch):
    """Only loading is a user error; an exception in the generation loop is a bug, raised as is."""

    def broken(self, *args, **kwargs):
        raise ValueError("a bug in the decode loop")
        yield

    monkeypatch.setattr(RATPlusLM, "stream", broken)
    with pytest.raises(ValueError, match="a bug in the decode loop"):
        main([str(export_dir), "--prompt", "Hi", "--device", "cpu", "--pattern", "d4w8s2"])


def test_non_finite_weights_are_refused_naming_the_tensor_and_the_file(export_dir, tmp_path, capsys):
    from ratplus_titan.adapters.layout import load_export
    from tests.corrupt import poison

    bad = _copy(export_dir, tmp_path)
    weights = bad / "model.safetensors"
    tensor = load_export(export_dir).state_dict["layers.1.ffn.fc1.weight"]
    poison(weights, tensor, count=5)
    line = cli_error(capsys, main, [str(bad), "--prompt", "Hi", "--device", "cpu"])
    assert line == (
        f"ratplus-generate: error: {weights}: tensor 'layers.1.ffn.fc1.weight' holds 5 NaN/inf values (of "
        f"{tensor.numel():,}): the file is corrupted, or training had diverged when it was saved; export the model "
        "again from a good checkpoint"
    )


def _generate(export_dir, capsys, *options):
    code = main([str(export_dir), "--prompt", "Hello", "--max-new-tokens", "2", "--device", "cpu", *options])
    out, err = capsys.readouterr()
    assert code == 0
    return out, err


def test_default_is_the_recorded_pattern_and_the_summary_names_it(export_dir, capsys):
    """export_dir was adapted for d4w8s2: no --pattern, and --pattern config, both run it, and say so."""
    for options in ([], ["--pattern", "config"]):
        out, err = _generate(export_dir, capsys, *options)
        (summary,) = [line for line in out.splitlines() if line.startswith("# pattern ")]
        assert summary.startswith("# pattern d4w8s2: "), summary
        assert err == ""
    out, _ = _generate(export_dir, capsys, "--pattern", "dense,d4w8s2")
    assert "# pattern dense,d4w8s2: " in out


def test_an_unadapted_pattern_is_one_warning_line(export_dir, capsys):
    _, err = _generate(export_dir, capsys, "--pattern", "d16w256s4")
    assert err.splitlines() == [
        "ratplus-generate: warning: checkpoint was adapted for pattern d4w8s2 but runs with d16w256s4 (layers "
        "[0, 1] differ): quality may drop; adapt to this pattern first, or run the recorded pattern ('config')"
    ]


def test_a_length_beyond_the_model_is_one_warning_line(export_dir, capsys):
    """max_seq_len of export_dir is 64; RoPE runs past it, so this is a warning, not an error."""
    out, err = _generate(export_dir, capsys, "--max-seq-len", "100")
    assert err.splitlines() == [
        "ratplus-generate: warning: --max-seq-len 100 is longer than the model's max_seq_len=64 (config.json): "
        "positions past it were never trained, so results there may be worse"
    ]
    assert "max_seq_len 100)" in out
    _, err = _generate(export_dir, capsys, "--max-seq-len", "64")
    assert err == ""
