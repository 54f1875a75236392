"""ratplus_titan.cli: argument types, one-line errors, and what stays a traceback."""

from __future__ import annotations

import argparse

import pytest
import torch

from ratplus_titan import cli
from ratplus_titan.head_groups import HeadGroups
from ratplus_titan.pattern import Pattern
from ratplus_titan.topk import TopKPattern
from tests.cli_errors import cli_error


def _parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="tool")
    parser.add_argument("--count", type=cli.positive_int)
    parser.add_argument("--offset", type=cli.non_negative_int)
    parser.add_argument("--mass", type=cli.number_in(0.0, 1.0, low_open=True))
    parser.add_argument("--temperature", type=cli.number_in(0.0))
    parser.add_argument("--rate", type=cli.number_in(0.0, low_open=True))
    parser.add_argument("--lengths", type=cli.comma_list(cli.token_count))
    parser.add_argument("--names", type=cli.comma_list(cli.one_of(("a", "b"))))
    parser.add_argument("--pattern", type=cli.pattern_list(config=True))
    parser.add_argument("--train-pattern", type=cli.pattern_list(training=True))
    parser.add_argument("--device", type=cli.device)
    parser.add_argument("--dtype", choices=cli.DTYPES)
    return parser


def test_types_accept_good_values() -> None:
    options = _parser().parse_args(
        ["--count", "3", "--offset", "0", "--mass", "1", "--temperature", "0.7", "--lengths", "4096,16k", "--names",
         "b,a", "--pattern", "dense,d4w8s2", "--train-pattern", "8:dense+8:d64w0s0", "--device", "cpu"]
    )  # fmt: skip
    assert (options.count, options.offset, options.mass, options.temperature) == (3, 0, 1.0, 0.7)
    assert options.lengths == [4096, 16384] and options.names == ["b", "a"]
    assert options.pattern == [Pattern(), Pattern(4, 8, 2)]
    assert options.train_pattern == [HeadGroups(((8, Pattern()), (8, Pattern(64))))]
    assert _parser().parse_args(["--pattern", "config"]).pattern is None
    assert _parser().parse_args(["--pattern", "topk64k8s4-moba"]).pattern == [TopKPattern(64, 8, "moba", 4)]
    assert cli.describe_patterns([Pattern(), Pattern(4, 8, 2)]) == "dense,d4w8s2" and cli.describe_patterns(None) == "config"


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--count", "0"], ["argument --count", "0 is invalid", "integers >= 1"]),
        (["--count", "two"], ["argument --count", "'two' is not an integer", "integers >= 1"]),
        (["--offset", "-1"], ["argument --offset", "integers >= 0"]),
        (["--mass", "0"], ["argument --mass", "numbers in (0, 1]"]),
        (["--mass", "nan"], ["argument --mass", "numbers in (0, 1]"]),
        (["--temperature", "-0.5"], ["argument --temperature", "numbers >= 0"]),
        (["--temperature", "inf"], ["argument --temperature", "numbers >= 0"]),
        (["--rate", "0"], ["argument --rate", "numbers > 0"]),
        (["--lengths", "4096,0"], ["argument --lengths", "'0' is not a token count", "4k = 4096"]),
        (["--lengths", ","], ["argument --lengths", "is empty"]),
        (["--names", "a,c"], ["argument --names", "'c' is unknown", "allowed values are a, b"]),
        (["--pattern", "d0w256s4"], ["argument --pattern", "'d0w256s4'", "Pattern.dilation=0", "-1 (no dilated keys)"]),
        (["--pattern", "dwx"], ["argument --pattern", "pattern 'dwx' is invalid", "d<dilation>w<window>s<sinks>"]),
        (["--pattern", "dense,topk0k8s4"], ["layer 1 of 2", "TopKPattern.block_size=0", ">= 1"]),
        (["--pattern", "3:dense+x:d4w0s0"], ["argument --pattern", "'<n_heads>:<pattern>'"]),
        (["--train-pattern", "topk64k8s4"], ["argument --train-pattern", "inference only", "'d<D>w<W>s<S>'"]),
        (["--device", "gpu7"], ["argument --device", "'gpu7' is not a torch device", "cpu, cuda"]),
        (["--dtype", "int8"], ["argument --dtype", "'float32', 'bfloat16', 'float16'"]),
    ],
)
def test_bad_values_are_one_line_naming_field_and_allowed_values(capsys, argv, fragments) -> None:
    assert cli_error(capsys, _parser().parse_args, argv, fragments).startswith("tool: error: argument ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda(capsys) -> None:
    assert "CUDA is not available" in cli_error(capsys, _parser().parse_args, ["--device", "cuda:1"])


def _raise(err: BaseException):
    def run(argv) -> None:
        with cli.user_errors("tool"):
            raise err

    return run


@pytest.mark.parametrize(
    "err, text",
    [
        (ValueError("width=3 is invalid:\n allowed values are >= 4"), "tool: error: width=3 is invalid: allowed values are >= 4"),
        (KeyError("checkpoint is missing tensor 'norm.weight'"), "tool: error: checkpoint is missing tensor 'norm.weight'"),
        (FileNotFoundError(2, "No such file or directory", "/x/config.json"), "/x/config.json"),
    ],
)
def test_user_errors_become_one_line(capsys, err, text) -> None:
    assert text in cli_error(capsys, _raise(err), [])


@pytest.mark.parametrize("err", [RuntimeError("a bug"), TypeError("a bug"), AssertionError("a bug")])
def test_other_exceptions_stay_exceptions(err) -> None:
    """A bug keeps its traceback: only USER_ERRORS are turned into the one line."""
    with pytest.raises(type(err), match="a bug"):
        _raise(err)([])


class _Steps:
    @classmethod
    def load(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"value={value} is invalid: allowed values are >= 0")
        return value

    def run(self) -> None:
        raise ValueError("a bug while running")


def test_user_errors_in_wraps_only_the_named_steps(capsys) -> None:
    original_load = _Steps.__dict__["load"]
    with cli.user_errors_in("tool", [(_Steps, "load")]):
        assert _Steps.load(3) == 3
        line = cli_error(capsys, lambda argv: _Steps.load(-1), [])
        with pytest.raises(ValueError, match="a bug while running"):  # not a named step: stays an exception
            _Steps().run()
    assert line == "tool: error: value=-1 is invalid: allowed values are >= 0"
    assert _Steps.__dict__["load"] is original_load  # restored
    with pytest.raises(ValueError):
        _Steps.load(-1)


def test_parse_patterns_with_another_separator() -> None:
    assert cli.parse_patterns("dense/d4w8s2", separator="/") == [Pattern(), Pattern(4, 8, 2)]
    with pytest.raises(ValueError, match="layer 0 of 2: pattern 'd4w8' is invalid"):
        cli.parse_patterns("d4w8/dense", separator="/")


def test_argument_type_errors_are_argparse_errors() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="integers >= 1"):
        cli.positive_int("-3")


BIG = "99999999999999999999"  # > int64: once an OverflowError traceback from torch


@pytest.mark.parametrize(
    "prog, positional",
    [("ratplus_titan.generate", ["MODEL", "--prompt", "Hi"]), ("ratplus_titan.eval.perplexity", ["MODEL", "DATA"])],
)
@pytest.mark.parametrize(
    "pattern, field, minimum",
    [
        (f"d{BIG}w1s1", "Pattern.dilation", "-1 (no dilated keys) or an integer >= 1"),
        (f"d4w{BIG}s1", "Pattern.local_window", ">= 0"),
        (f"d4w1s{BIG}", "Pattern.sinks", ">= 0"),
        (f"topk{BIG}k1s0", "TopKPattern.block_size", ">= 1"),
        (f"topk64k{BIG}s0", "TopKPattern.top_k", ">= 0"),
        (f"{BIG}:dense", "n_heads", ">= 1"),
    ],
)
def test_huge_pattern_values_are_one_line_with_the_allowed_range(
    capsys, prog, positional, pattern, field, minimum
) -> None:
    """The CLIs' --pattern: a value past MAX_PATTERN_INT is refused by argparse, naming the range."""
    import importlib

    from ratplus_titan.pattern import MAX_PATTERN_INT

    main = importlib.import_module(prog).main
    line = cli_error(capsys, main, [*positional, "--pattern", pattern], [pattern, f"{field}={BIG} is invalid", minimum])
    assert f"at most {MAX_PATTERN_INT}" in line and MAX_PATTERN_INT == 2**31 - 1


def test_largest_pattern_values_still_parse() -> None:
    top = str(2**31 - 1)
    assert cli.parse_patterns(f"d{top}w{top}s{top}") == [Pattern(2**31 - 1, 2**31 - 1, 2**31 - 1)]
    assert cli.parse_patterns(f"topk{top}k{top}s{top}") == [TopKPattern(2**31 - 1, 2**31 - 1, "ratplus", 2**31 - 1)]
    with pytest.raises(ValueError, match=f"Pattern.sinks={2**31} is invalid"):
        cli.parse_patterns(f"d4w1s{2**31}")
