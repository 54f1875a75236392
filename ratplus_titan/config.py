"""The ``[ratplus]`` section of a torchtitan job config (``[job] custom_config_module``).

torchtitan 0.2.2 builds the section from the TOML file with ``RATPlus(**values)``, without looking
at the types (``ConfigManager._dict_to_dataclass``), and tyro then takes those values as defaults
with at most a warning. So a quoted ``apply_re = "false"`` arrived as the string ``"false"``, which
is true. ``RATPlus.__post_init__`` checks every field against its annotation (``check_types``) and
raises ``ConfigError``, which the training entry point prints as one line
(``ratplus_titan/infra/entry.py``).
"""

import json
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any


class ConfigError(ValueError):
    """A job-config value the user must fix: the training entry point prints the message as one line."""


@dataclass
class RATPlus:
    joint_train: bool = False
    """Active recurrence learning (DESIGN §3): per batch a sparse (dilation=joint_dilation) step, then a dense step."""

    joint_dilation: int = 64
    """Dilation of the sparse phase of joint training (no local window, no sinks)."""

    dilation: list[int] = field(default_factory=lambda: [1])
    """Training pattern dilation: one value for every layer, or one per layer (hybrids). 1 = dense, -1 = none."""

    local_window: list[int] = field(default_factory=lambda: [0])
    """Local window W (a key j is visible when t - j <= W): one value, or one per layer."""

    sinks: list[int] = field(default_factory=lambda: [0])
    """Number of attention-sink tokens at the start: one value, or one per layer."""

    head_groups: list[str] = field(default_factory=list)
    """Layer patterns as spec strings, replacing dilation/local_window/sinks: one for every layer, or one per
    layer. A spec is a pattern ('dense', 'd16w256s4') or head groups '<n_heads>:<pattern>' joined by '+'
    (heads in order), e.g. ["8:dense+8:d64w0s0"]. Empty: the pattern comes from dilation/local_window/sinks."""

    apply_re: bool | None = None
    """False trains the attention baseline (no recurrence); None keeps the flavor's value."""

    attention_backend: str = ""
    """auto | sdpa | reference | compact | flex | triton; empty keeps the flavor's value."""

    data_order: str = "shuffled"
    """Order of the training windows of `[training] dataset = "bin"` (and records of "sft"): "shuffled" (a fresh seeded permutation each
    epoch) or "file" (file order). Text datasets are streamed in their own order; validation is always in file order."""

    data_seed: int = 0
    """Seed (>= 0) of the "shuffled" data order: epoch e's permutation depends only on (data_seed, e)."""

    recompute: str = "none"
    """Activations backward recomputes instead of keeping, on top of [activation_checkpoint]: "none", or "fc1"
    (the FFN's 4d-wide hidden, fc1's output and its GELU: 4 bf16 rows a token a layer less memory for one more
    d x 4d matmul in backward). Any AC mode but memory_budget (DESIGN §3.5)."""

    def __post_init__(self) -> None:
        check_types(self, "ratplus")


RECOMPUTE = ("none", "fc1")
"""The values of ``[ratplus] recompute``."""


@dataclass
class JobConfig:
    ratplus: RATPlus = field(default_factory=RATPlus)


def per_layer(values: list[int] | int) -> int | list[int]:
    """A one-element list means "the same for every layer"."""
    if isinstance(values, int):
        return values
    return values[0] if len(values) == 1 else list(values)


# ---- type checks from the annotations ------------------------------------------------------

_NAMES = {bool: ("a boolean", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings")}  # fmt: skip


def _matches(annotation: Any, value: Any) -> bool:
    """Is ``value`` of type ``annotation`` (bool, int, float, str, list[...], unions, None)?"""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_matches(a, value) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_matches(item, v) for v in value)
    if annotation not in _NAMES:
        raise TypeError(f"no type check for {annotation!r}: add it to ratplus_titan/config.py")
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, annotation) and (annotation is bool or not isinstance(value, bool))


def _wanted(annotation: Any) -> str:
    """What a TOML file must hold for ``annotation``: 'a boolean', 'an integer or a list of integers', ..."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        # None is the field left out: TOML has no null.
        return " or ".join(_wanted(a) for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return f"{_NAMES[item][0]} or a list of {_NAMES[item][1]}"
    return _NAMES[annotation][0]


def _kind(value: Any) -> str:
    """What TOML value ``value`` is: 'a string', 'a list holding a string and an integer', ..."""
    for python_type, (name, _) in _NAMES.items():
        if type(value) is python_type:
            return name
    if isinstance(value, list):
        return "a list holding " + " and ".join(sorted({_kind(v) for v in value}))
    return "a table" if isinstance(value, dict) else f"a {type(value).__name__}"


def check_types(section: Any, name: str) -> None:
    """Raise ``ConfigError`` for the first field of the dataclass ``section`` whose value does not
    match its annotation; a single item given for a ``list[...]`` field becomes a one-item list.

    The message names the field, the value (as TOML writes it) and the type wanted.
    """
    hints = typing.get_type_hints(type(section))
    for f in fields(section):
        annotation, value = hints[f.name], getattr(section, f.name)
        if typing.get_origin(annotation) is list and not isinstance(value, list):
            (item,) = typing.get_args(annotation)
            if _matches(item, value):
                setattr(section, f.name, [value])
                continue
        if _matches(annotation, value):
            continue
        wanted = _wanted(annotation)
        quoted = isinstance(value, str) or (isinstance(value, list) and any(isinstance(v, str) for v in value))
        hint = ": write it without quotes" if quoted and "string" not in wanted else ""
        shown = json.dumps(value, default=str)
        raise ConfigError(f"{name}.{f.name}={shown} is {_kind(value)}, but the field takes {wanted}{hint}")
