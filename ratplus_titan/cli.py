"""What every ratplus command line shares: argument types checked before anything loads, and
one-line errors for bad input.

A bad input is the user's to fix, not a bug: it gets one line on stderr,
``PROG: error: MESSAGE`` naming the field (or file) and the allowed values, and exit status 2
(argparse's convention; ``ArgumentParser`` below keeps argparse's own errors to that one line).

- Values that can be checked before loading anything (patterns, lengths, token counts, batch
  sizes, depths, devices) are checked by the argparse ``type=`` functions here.
- What a tool does to validate and load its inputs (model folders, checkpoints, data files)
  runs under ``user_errors``: the errors that code raises for bad input (``USER_ERRORS``)
  become the one line. What runs after (generating, evaluating) stays outside: an exception
  there is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from ratplus_titan.head_groups import LayerPattern

USAGE_ERROR = 2
"""Exit status of a command given bad input (argparse's)."""

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, OSError)
"""What validation and loading raise for bad input: bad values and files (``KeyError``: a missing
tensor), missing or unreadable paths (``OSError``)."""

DTYPES = ("float32", "bfloat16", "float16")
"""The ``--dtype`` choices of every command."""

DECODE_MODES = ("auto", "eager", "graph", "compile")
"""How a decode step runs (``inference/generate.py``): ``auto`` is ``graph`` on CUDA, else ``eager``."""


# ---- one-line errors -----------------------------------------------------------------------


def fail(prog: str, message: object) -> NoReturn:
    """Print ``prog: error: message`` (on one line) to stderr and exit with status 2."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(USAGE_ERROR)


def error_message(err: BaseException) -> str:
    """The text of an exception (a ``KeyError``'s without the quotes ``str`` adds)."""
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    return str(err)


@contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Inside: a ``USER_ERRORS`` exception is reported by ``fail`` (one line, exit status 2), and a
    warning is one line ``prog: warning: message`` (no source line echoed)."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *args, **kwargs: note(prog, f"warning: {message}")
        try:
            yield
        except USER_ERRORS as err:
            fail(prog, error_message(err))


@contextmanager
def user_errors_in(prog: str, steps: Sequence[tuple[type, str]]) -> Iterator[None]:
    """Run the methods ``steps`` (``(class, name)``) under ``user_errors`` while inside.

    For a tool that hands control to another library's command line (``ratplus-lm-eval``):
    only that library's validation steps and our model's construction report one line.
    """
    originals = []
    for owner, name in steps:
        raw = owner.__dict__[name]
        wrapper = type(raw) if isinstance(raw, (classmethod, staticmethod)) else None
        function = raw.__func__ if wrapper else raw

        @functools.wraps(function)
        def guarded(*args: Any, _function: Callable = function, **kwargs: Any) -> Any:
            with user_errors(prog):
                return _function(*args, **kwargs)

        setattr(owner, name, wrapper(guarded) if wrapper else guarded)
        originals.append((owner, name, raw))
    try:
        yield
    finally:
        for owner, name, raw in reversed(originals):
            setattr(owner, name, raw)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (``prog: error: message``, status 2)."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, message)


# ---- argument types ------------------------------------------------------------------------


def _named(name: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    parse.__name__ = name  # argparse names the type in its fallback message
    return parse


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An integer ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an integer: allowed values are integers >= {minimum}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is invalid: allowed values are integers >= {minimum}")
        return value

    return _named(f"integer >= {minimum}", parse)


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def number_in(low: float, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    """A finite number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    interval = f"{'>' if low_open else '>='} {low:g}" if high == math.inf else f"in {'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        above_low = value > low if low_open else value >= low
        if not (above_low and value <= high and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed values are numbers {interval}")
        return value

    return _named(f"number {interval}", parse)


def token_count(text: str) -> int:
    """A positive number of tokens: ``4096``, or ``4k`` (= 4096)."""
    digits = text.strip().lower()
    scale = 1024 if digits.endswith("k") else 1
    try:
        value = int(digits.removesuffix("k")) * scale
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a token count: allowed values are integers >= 1, or with a k suffix (4k = 4096)"
        )
    return value


def one_of(allowed: Sequence[str]) -> Callable[[str], str]:
    """One of ``allowed`` (for lists of names; a single name takes argparse's ``choices``)."""

    def parse(text: str) -> str:
        if text not in allowed:
            raise argparse.ArgumentTypeError(f"{text!r} is unknown: allowed values are {', '.join(allowed)}")
        return text

    return _named("name", parse)


def comma_list(item: Callable[[str], Any]) -> Callable[[str], list]:
    """A comma-separated list of ``item`` values (at least one)."""

    def parse(text: str) -> list:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"{text!r} is empty: give one value or several, comma-separated")
        return [item(part) for part in parts]

    return _named("list", parse)


def non_empty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("the empty string is invalid: give at least one character")
    return text


def device(text: str) -> str:
    """A torch device this machine has: ``cpu``, ``cuda``, ``cuda:1``, ..."""
    import torch

    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device: e.g. cpu, cuda, cuda:1") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine (allowed: cpu)")
        if parsed.index is not None and parsed.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return text


# ---- attention patterns --------------------------------------------------------------------

PATTERN_HELP = (
    "'dense', 'd<D>w<W>s<S>' (e.g. d16w256s4, d-1w256s4 for no dilation), top-k blocks "
    "'topk<block>k<k>s<S>[-quest|-moba|-ratplus]' (e.g. topk64k8s4-ratplus), head groups '<n>:<pattern>+...' "
    "(e.g. 8:dense+8:d16w256s4), or a comma-separated list with one per layer (hybrids)"
)


def parse_patterns(text: str, separator: str = ",", training: bool = False) -> list[LayerPattern]:
    """One spec, or one per layer joined by ``separator`` -> layer patterns; ``ValueError`` names the bad one.

    ``training``: top-k patterns (inference only) are refused. How many patterns a model
    needs is checked when it is loaded (``resolve_layer_patterns``).
    """
    from ratplus_titan.head_groups import parse_layer_pattern, resolve_layer_patterns

    specs = [spec.strip() for spec in text.split(separator)]
    patterns = []
    for i, spec in enumerate(specs):
        try:
            patterns.append(parse_layer_pattern(spec))
        except (TypeError, ValueError) as err:
            where = f"layer {i} of {len(specs)}: " if len(specs) > 1 else ""
            message = str(err) if repr(spec) in str(err) else f"{spec!r}: {err}"
            raise ValueError(where + message) from None
    if training:
        resolve_layer_patterns(patterns, len(patterns), None, training=True)
    return patterns


def pattern_list(training: bool = False, config: bool = False) -> Callable[[str], list[LayerPattern] | None]:
    """argparse type of ``--pattern``: ``parse_patterns``; with ``config``, ``'config'`` gives ``None``
    (the pattern recorded in the model's config.json)."""

    def parse(text: str) -> list[LayerPattern] | None:
        if config and text.strip() == "config":
            return None
        try:
            return parse_patterns(text, training=training)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return _named("pattern", parse)


def describe_patterns(patterns: Sequence[LayerPattern] | None) -> str:
    """``--pattern``'s text back: ``config``, one spec (every layer the same), or the per-layer list."""
    if patterns is None:
        return RECORDED_PATTERN
    return str(patterns[0]) if len(set(patterns)) == 1 else ",".join(map(str, patterns))


RECORDED_PATTERN = "config"
"""``--pattern``'s value (and every inference command's default) for the pattern recorded in the export."""


def add_pattern_argument(parser: argparse.ArgumentParser, repeat: bool = False) -> None:
    """``--pattern`` of an inference command: a pattern, or ``config`` (the default) for the one recorded
    in the export's config.json. Parsed to layer patterns, ``None`` for ``config``; with ``repeat``, a list
    of those in ``patterns``, itself ``None`` when the option is not given (argparse would append to a
    default list)."""
    help = f"attention pattern: {PATTERN_HELP}, or '{RECORDED_PATTERN}' for the pattern recorded in config.json"
    kind = pattern_list(config=True)
    if repeat:
        parser.add_argument("--pattern", action="append", dest="patterns", type=kind, default=None,
                            help=f"{help}; repeat for several (default: {RECORDED_PATTERN})")  # fmt: skip
        return
    parser.add_argument("--pattern", default=RECORDED_PATTERN, type=kind, help=f"{help} (default: {RECORDED_PATTERN})")


# ---- notes ---------------------------------------------------------------------------------


def note(prog: str, message: object) -> None:
    """``prog: message`` on one line of stderr: a remark that is not an error."""
    print(f"{prog}: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def progress(prog: str) -> Callable[[str], None]:
    """A ``note`` per stage of long work, shown on a terminal only (as tqdm does): logs and pipes stay clean."""
    return lambda message: note(prog, message) if sys.stderr.isatty() else None


def warn_beyond_model_length(prog: str, flag: str, value: int, model_max_seq_len: int) -> None:
    """One line when a length asked for exceeds the ``max_seq_len`` the model was trained/exported for.

    Not an error: RoPE extrapolates and the model runs, but positions past its training length
    were never trained, so quality there may drop (measuring that is a legitimate experiment).
    """
    if value > model_max_seq_len:
        note(
            prog,
            f"warning: {flag} {value} is longer than the model's max_seq_len={model_max_seq_len} (config.json): "
            "positions past it were never trained, so results there may be worse",
        )
