"""Top-k block attention (DESIGN §2, inference only): the pattern and its block selection.

Keys are split into blocks of ``block_size`` (``bs``): block ``b`` holds positions
``[b*bs, (b+1)*bs)``. A query at position ``t`` (own block ``c = t // bs``) may see a key
``j <= t`` when any of these holds:

- own block: ``j // bs == c``;
- sinks:     ``j < sinks``;
- selected:  ``j`` lies in one of the ``top_k`` earlier blocks ``b < c`` (all complete)
  whose summary scores highest against the query.

Summaries are taken over the keys the attention uses (rotated, recurrent keys), and
scores are unscaled dot products with the (rotated) query ``q``:

- ``quest``:   per-channel min/max of the block; ``sum_c max(q_c * min_c, q_c * max_c)``
  (an upper bound of ``q . k_j`` over the block);
- ``moba``:    ``q . mean_j k_j``;
- ``ratplus``: ``q . k[(b+1)*bs - 1]``, the recurrent key closing the block (it carries
  the whole block: RAT+'s natural summary).

Blocks of equal score are ranked as ``torch.topk`` ranks them (unspecified): with real
activations ties do not happen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ratplus_titan.pattern import check_count

SCORES = ("quest", "moba", "ratplus")

_SPEC = re.compile(r"^topk(\d+)k(\d+)s(\d+)(?:-(\w+))?$")


@dataclass(frozen=True)
class TopKPattern:
    block_size: int
    top_k: int
    score: str = "ratplus"
    sinks: int = 0

    def __post_init__(self) -> None:
        for name in ("block_size", "top_k", "sinks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"TopKPattern.{name} must be an int, got {value!r}")
        check_count("TopKPattern.block_size", self.block_size, 1)
        check_count("TopKPattern.top_k", self.top_k, 0)
        check_count("TopKPattern.sinks", self.sinks, 0)
        if self.score not in SCORES:
            raise ValueError(f"TopKPattern.score={self.score!r} is invalid: allowed values are {', '.join(SCORES)}")

    # ---- construction -------------------------------------------------------
    @classmethod
    def parse(cls, spec: str) -> TopKPattern:
        """``"topk64k8s4-ratplus"``: blocks of 64, top 8 blocks, 4 sinks, ratplus scores (the default score)."""
        match = _SPEC.match(spec.strip())
        if match is None:
            raise ValueError(
                f"top-k pattern {spec!r} is invalid: use 'topk<block_size>k<top_k>s<sinks>[-<score>]' with score "
                f"one of {', '.join(SCORES)}, e.g. 'topk64k8s4-ratplus'"
            )
        return cls(int(match[1]), int(match[2]), match[4] or "ratplus", int(match[3]))

    def __str__(self) -> str:
        return f"topk{self.block_size}k{self.top_k}s{self.sinks}-{self.score}"

    # ---- properties ---------------------------------------------------------
    @property
    def is_dense(self) -> bool:
        return False

    def covers_all(self, seq_len: int) -> bool:
        """True when every query of a ``seq_len`` sequence sees all earlier keys (dense causal)."""
        return self.top_k >= (seq_len - 1) // self.block_size or self.sinks >= seq_len

    def num_blocks(self, seq_len: int) -> int:
        """Complete blocks among ``seq_len`` positions: the ones that can ever be selected."""
        return seq_len // self.block_size

    def cache_rows(self, seq_len: int) -> int:
        """A decoder keeps every row (selection needs all of them), plus per-block summaries."""
        return seq_len

    @property
    def summary_rows(self) -> int:
        """Rows of ``hd`` values one block summary takes: min and max (quest), or one."""
        return 2 if self.score == "quest" else 1

    # ---- block summaries, scores, selection ---------------------------------
    def summaries(self, k: torch.Tensor) -> torch.Tensor:
        """``k [..., T, hd]`` -> summaries of the complete blocks ``[..., T // bs, summary_rows, hd]`` (k's dtype)."""
        n_blocks = self.num_blocks(k.shape[-2])
        blocks = k[..., : n_blocks * self.block_size, :].unflatten(-2, (n_blocks, self.block_size))  # [..., NB, bs, hd]
        if self.score == "quest":
            return torch.stack([blocks.amin(dim=-2), blocks.amax(dim=-2)], dim=-2)
        if self.score == "moba":
            return blocks.float().mean(dim=-2, keepdim=True).to(k.dtype)
        return blocks[..., -1:, :]

    def scores(self, q: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        """``q [..., Tq, hd]``, ``summaries [..., NB, n, hd]`` -> block scores ``[..., Tq, NB]`` (fp32 or wider)."""
        acc = torch.promote_types(q.dtype, torch.float32)
        q = q.to(acc)
        if self.score == "quest":
            # max(q*lo, q*hi) per channel: q*hi where q >= 0, q*lo where q < 0
            lo, hi = summaries.to(acc).unbind(dim=-2)  # [..., NB, hd]
            return q.clamp(min=0) @ hi.transpose(-1, -2) + q.clamp(max=0) @ lo.transpose(-1, -2)
        return q @ summaries[..., 0, :].to(acc).transpose(-1, -2)

    def top_blocks(self, scores: torch.Tensor, q_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``top_k`` best earlier blocks of each query.

        ``scores [..., NB]``, ``q_idx`` (broadcasting to ``scores[..., 0]``) -> block indices and
        whether each is a real pick, both ``[..., min(top_k, NB)]`` (fewer candidates than
        ``top_k``: the surplus picks are marked invalid).
        """
        n_blocks = scores.shape[-1]
        own_block = torch.div(q_idx, self.block_size, rounding_mode="floor")[..., None]
        candidate = (torch.arange(n_blocks, device=scores.device) < own_block).expand_as(scores)  # [..., NB]
        picks = min(self.top_k, n_blocks)
        ranked = scores.masked_fill(~candidate, float("-inf"))
        index = ranked.topk(picks, dim=-1).indices  # [..., K]
        return index, candidate.gather(-1, index)

    def selected_blocks(self, scores: torch.Tensor, q_idx: torch.Tensor) -> torch.Tensor:
        """``top_blocks`` as a boolean ``[..., NB]`` mask."""
        index, valid = self.top_blocks(scores, q_idx)
        return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, index, valid)

    # ---- the mask, given the selection --------------------------------------
    def allows(self, q_idx: torch.Tensor, kv_idx: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """May query ``q_idx [Tq, 1]`` see key ``kv_idx [1, Tk]``, given ``selected [..., Tq, NB]``? -> ``[..., Tq, Tk]``."""
        causal = kv_idx <= q_idx
        block = torch.div(kv_idx, self.block_size, rounding_mode="floor")  # [1, Tk]
        visible = (block == torch.div(q_idx, self.block_size, rounding_mode="floor")) | (kv_idx < self.sinks)
        n_blocks = selected.shape[-1]
        if n_blocks:
            in_selected = selected[..., block[0].clamp(max=n_blocks - 1)] & (block < n_blocks)  # [..., Tq, Tk]
            visible = visible | in_selected
        return causal & visible
