"""The ``[ratplus]`` section of a torchtitan job config (``[job] custom_config_module``)."""

from dataclasses import dataclass, field


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

@dataclass
class JobConfig:
    ratplus: RATPlus = field(default_factory=RATPlus)

def per_layer(values: list[int] | int) -> int | list[int]:
    """A one-element list means "the same for every layer"."""
    if isinstance(values, int):
        return values
    return values[0] if len(values) == 1 else list(values)
