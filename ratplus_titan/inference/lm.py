"""``RATPlusLM``: a ``RATPlusModel`` set to an inference pattern, with its decode cache and tokenizer.

::

    lm = RATPlusLM.from_pretrained("out/export", pattern="d16w256s4", dtype=torch.bfloat16, device="cuda")
    logits = lm(tokens)                          # [B, T, V], full sequence under the pattern
    texts = lm.generate(["Once upon"], max_new_tokens=64)
    for event in lm.stream(["Once upon"], max_new_tokens=64):
        print(event.text, end="", flush=True)

The pattern may be one layer pattern, a spec string, or one per layer (hybrids). Layer patterns:
``Pattern`` (``"dense"``, ``"d16w256s4"``), ``TopKPattern`` (top-k block attention,
``"topk64k8s4-ratplus"``), or ``HeadGroups`` (a pattern per group of heads,
``"8:dense+8:d64w0s0"``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ratplus_titan.adapters.layout import check_state_dict, load_export
from ratplus_titan.cli import describe_patterns
from ratplus_titan.head_groups import HeadGroups, LayerPattern, resolve_layer_patterns
from ratplus_titan.inference.cache import DecodeCache
from ratplus_titan.inference.step import decode_one_token, prefill
from ratplus_titan.model.args import RATPlusModelArgs
from ratplus_titan.model.model import RATPlusModel, rope_cache
from ratplus_titan.pattern import Pattern
from ratplus_titan.topk import TopKPattern

PatternLike = LayerPattern | str | Sequence[LayerPattern | str]

DEFAULT_PATTERN = Pattern(dilation=16, local_window=256, sinks=4)


def resolve_inference_patterns(pattern: PatternLike | None, n_layers: int, n_heads: int | None = None) -> list[LayerPattern]:
    """One layer pattern per layer from a pattern, a spec string, or a per-layer list of either.

    ``n_heads``: head groups must add up to it (checked when given).
    """
    if pattern is None:
        pattern = DEFAULT_PATTERN
    if isinstance(pattern, (Pattern, TopKPattern, HeadGroups, str)):
        pattern = [pattern]
    return resolve_layer_patterns(list(pattern), n_layers, n_heads)


def check_adapted_pattern(recorded: list[LayerPattern], patterns: list[LayerPattern]) -> None:
    """Warn when a sparse pattern differs from the one the checkpoint was trained/adapted for."""
    mismatched = [i for i, (want, have) in enumerate(zip(patterns, recorded)) if not want.is_dense and want != have]
    if mismatched:
        warnings.warn(
            f"checkpoint was adapted for pattern {describe_patterns(recorded)} but runs with "
            f"{describe_patterns(patterns)} (layers {mismatched[:8]}{'...' if len(mismatched) > 8 else ''} differ): "
            "quality may drop; adapt to this pattern first, or run the recorded pattern ('config')",
            stacklevel=3,
        )


class RATPlusLM(nn.Module):
    """Inference wrapper: full-sequence logits, prefill/decode with a sparse cache, generation."""

    def __init__(
        self,
        model_args: RATPlusModelArgs,
        state_dict: dict[str, torch.Tensor] | None = None,
        pattern: PatternLike | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        max_seq_len: int | None = None,
        max_batch_size: int = 1,
        tokenizer=None,
        decode_backend: str = "auto",
    ):
        super().__init__()
        max_seq_len = model_args.max_seq_len if max_seq_len is None else max_seq_len
        if max_seq_len <= 0 or max_batch_size <= 0:
            raise ValueError(f"max_seq_len={max_seq_len} and max_batch_size={max_batch_size} must be >= 1")
        patterns = (
            list(model_args.patterns)
            if pattern is None
            else resolve_inference_patterns(pattern, model_args.n_layers, model_args.n_heads)
        )
        # A private copy of the arguments, sized for inference (RoPE table of max_seq_len rows).
        self.model_max_seq_len = model_args.max_seq_len  # what the model was trained/exported for
        args = dataclasses.replace(model_args, max_seq_len=max_seq_len)
        device = torch.device(device) if device is not None else torch.device("cpu")
        with torch.device("meta"):
            model = RATPlusModel(args)
        model = model.to(dtype=dtype).to_empty(device=device)  # weights allocated once, in dtype
        if state_dict is None:
            model.init_weights(buffer_device=device)
        else:
            check_state_dict(args, state_dict)
            model.load_state_dict(state_dict, strict=True)
        # RoPE angles stay fp32 whatever the weights' dtype (built after the cast).
        model.cos_sin = rope_cache(args.head_dim, max_seq_len, args.rope_theta, device=device)
        model.set_patterns(patterns)
        model.eval().requires_grad_(False)
        self.model, self.args, self.patterns = model, args, patterns
        self.dtype, self.device = dtype, device
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch_size
        self.tokenizer = tokenizer
        self.decode_backend = decode_backend
        self.cache: DecodeCache | None = None

    # ---- loading ---------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        pattern: PatternLike | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        max_seq_len: int | None = None,
        max_batch_size: int = 1,
        decode_backend: str = "auto",
    ) -> RATPlusLM:
        """Load a ``ratplus-export`` folder (``config.json``, ``model.safetensors``, tokenizer).

        ``pattern=None`` (the default) runs the pattern recorded in ``config.json``. ``dtype`` defaults to
        the exported dtype, ``device`` to CUDA when available.
        """
        exported = load_export(path)  # shape errors come from check_state_dict
        args = exported.args
        # load_export sets the recorded pattern on the args
        recorded = list(args.patterns)
        patterns = recorded if pattern is None else resolve_inference_patterns(pattern, args.n_layers, args.n_heads)
        check_adapted_pattern(recorded, patterns)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        dtype = dtype or getattr(torch, exported.dtype)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = None
        if exported.tokenizer_path is not None:
            from ratplus_titan.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(exported.tokenizer_path)
        return cls(
            args,
            exported.state_dict,
            patterns,
            dtype=dtype,
            device=device,
            max_seq_len=max_seq_len,
            max_batch_size=max_batch_size,
            tokenizer=tokenizer,
            decode_backend=decode_backend,
        )

    # ---- full sequence -----------------------------------------------------------
    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, T]`` -> logits ``[B, T, V]`` under the inference pattern(s)."""
        if tokens.shape[1] > self.max_seq_len:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens is longer than max_seq_len={self.max_seq_len}")
        return self.model(tokens.to(self.device))

    @torch.no_grad()
    def logits_at(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K, V]`` at ``positions [B, K]`` of ``tokens [B, T]``: the full-sequence forward
        under the inference pattern(s), the (tied) output head applied at those positions only."""
        if tokens.shape[1] > self.max_seq_len:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens is longer than max_seq_len={self.max_seq_len}")
        h = self.model.hidden_states(tokens.to(self.device))  # [B, T, d]
        index = positions.to(self.device)[..., None].expand(-1, -1, h.shape[-1])
        return F.linear(h.gather(1, index), self.model.tok_embeddings.weight)

    def set_pattern(self, pattern: PatternLike) -> None:
        """Switch the inference pattern(s); the decode cache is dropped (its layout depends on them)."""
        self.patterns = resolve_inference_patterns(pattern, self.args.n_layers, self.args.n_heads)
        self.model.set_patterns(self.patterns)
        self.free_cache()

    def free_cache(self) -> None:
        """Drop the decode cache and any CUDA graph captured over it."""
        self.cache = None
        self.__dict__.pop("_graphs", None)

    # ---- cache, prefill, decode ----------------------------------------------------
    def setup_cache(self, batch_size: int, max_seq_len: int | None = None) -> DecodeCache:
        """(Re)allocate the static decode cache for ``batch_size`` sequences of up to ``max_seq_len`` tokens.

        ``max_seq_len`` defaults to (and may not exceed) the model's; a cache of the same sizes is kept.
        """
        max_seq_len = self.max_seq_len if max_seq_len is None else max_seq_len
        if batch_size > self.max_batch_size:
            raise ValueError(f"batch of {batch_size} sequences exceeds max_batch_size={self.max_batch_size}")
        if not 0 < max_seq_len <= self.max_seq_len:
            raise ValueError(f"cache max_seq_len={max_seq_len} must be in [1, {self.max_seq_len}]")
        cache = self.cache
        if cache is None or cache.batch_size != batch_size or cache.max_seq_len != max_seq_len:
            self.free_cache()  # free the old buffers first
            self.cache = DecodeCache(
                self.patterns,
                batch_size,
                max_seq_len,
                self.args.n_heads,
                self.args.head_dim,
                self.dtype,
                self.device,
                recurrent=self.args.apply_re,
            )
        return self.cache

    def cache_bytes(self, batch_size: int = 1) -> int:
        """Bytes the decode cache holds for ``batch_size`` sequences (measured; on the meta device if not allocated)."""
        cache = self.cache
        if cache is None:
            cache = DecodeCache(
                self.patterns, 1, self.max_seq_len, self.args.n_heads, self.args.head_dim, self.dtype, "meta",
                recurrent=self.args.apply_re,
            )  # fmt: skip
        return cache.bytes_per_sequence() * batch_size

    def pad_prompts(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token lists -> right-padded ``[B, T]`` tokens and ``[B]`` lengths on the model device."""
        if not prompts:
            raise ValueError("no prompts given")
        lengths = [len(p) for p in prompts]
        for i, n in enumerate(lengths):
            if n == 0:
                raise ValueError(f"prompt {i} is empty: give at least one token (e.g. BOS)")
            if n > self.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {n} tokens, longer than max_seq_len={self.max_seq_len}: "
                    "shorten it or load the model with a larger max_seq_len"
                )
        tokens = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        return tokens.to(self.device), torch.tensor(lengths, dtype=torch.long, device=self.device)

    def prefill(self, prompts: Sequence[Sequence[int]] | torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Prompts (token lists of any lengths, or a ``[B, T]`` tensor) -> last-token logits ``[B, V]``.

        Fills the cache (allocated for this batch if needed); decoding continues with ``decode_step``.
        """
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        tokens, lengths = self.pad_prompts(prompts)
        cache = self.cache
        if cache is None or cache.batch_size != tokens.shape[0]:  # keep a cache set up for this batch
            cache = self.setup_cache(tokens.shape[0])
        if tokens.shape[1] > cache.max_seq_len:
            raise ValueError(f"prompt of {tokens.shape[1]} tokens is longer than the cache's max_seq_len={cache.max_seq_len}")
        return prefill(self.model, cache, tokens, lengths, all_logits=all_logits)

    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per sequence ``[B]`` -> logits ``[B, V]`` (cache filled by ``prefill``)."""
        if self.cache is None:
            raise RuntimeError("decode_step needs a cache: call prefill first")
        return decode_one_token(self.model, self.cache, tokens.to(self.device), self.decode_backend)

    # ---- generation (generate.py) ---------------------------------------------------
    def generate(self, prompts, max_new_tokens: int = 128, **kwargs) -> list:
        """See ``ratplus_titan.inference.generate.generate``."""
        from ratplus_titan.inference.generate import generate

        return generate(self, prompts, max_new_tokens, **kwargs)

    def stream(self, prompts, max_new_tokens: int = 128, **kwargs) -> Iterator:
        """See ``ratplus_titan.inference.generate.stream``."""
        from ratplus_titan.inference.generate import stream

        return stream(self, prompts, max_new_tokens, **kwargs)
