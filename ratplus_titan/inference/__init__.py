"""Inference: the sparse decode cache (DESIGN §4), prefill/decode steps, ``RATPlusLM`` and generation."""

from ratplus_titan.inference.cache import DecodeCache, LayerCache, RowLayout
from ratplus_titan.inference.generate import Generation, StreamEvent, generate, sample, stream
from ratplus_titan.inference.lm import RATPlusLM, resolve_inference_patterns
from ratplus_titan.inference.step import decode_one_token, prefill

__all__ = [
    "DecodeCache",
    "Generation",
    "LayerCache",
    "RATPlusLM",
    "RowLayout",
    "StreamEvent",
    "decode_one_token",
    "generate",
    "prefill",
    "resolve_inference_patterns",
    "sample",
    "stream",
]
