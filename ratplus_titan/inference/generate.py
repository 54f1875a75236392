"""Batched generation over ``RATPlusLM``: sampling, the decode loop, streaming, CUDA-graph decoding.

The loop is short (gpt-fast style): prefill the right-padded prompts once, then per step
sample one token per sequence and run ``decode_one_token`` (eager, replayed from a CUDA
graph, or ``torch.compile``). Prompts of different lengths share the batch; each sequence
decodes at its own position, so its tokens are the ones it would get alone.

Stopping (per sequence): ``max_new_tokens``, the tokenizer's end-of-sequence token
(``stop_on_eos``), or a stop string (the text is cut before it). Finished sequences keep
riding along in the batch (fixed shapes) but emit nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ratplus_titan.cli import DECODE_MODES
from ratplus_titan.inference.step import decode_one_token

Prompts = str | Sequence[str] | Sequence[Sequence[int]]


# ---- sampling -------------------------------------------------------------------
def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``logits [B, V]`` -> tokens ``[B]``. ``temperature == 0``: greedy (argmax)."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"temperature={temperature} (>= 0), top_p={top_p} (in (0, 1]), top_k={top_k} (>= 0)")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked before it already hold top_p of the mass (keeps the first)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ---- decoders: one step, three ways ----------------------------------------------
class GraphedDecoder:
    """``decode_one_token`` captured once in a CUDA graph over the LM's current cache.

    Capture mutates the cache (warm-up steps), so it happens right after the cache is
    allocated and before ``prefill``, which overwrites every buffer the graph touches.
    """

    def __init__(self, lm):
        cache = lm.cache
        self.cache = cache
        self.tokens = torch.zeros(cache.batch_size, dtype=torch.long, device=lm.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                decode_one_token(lm.model, cache, self.tokens, lm.decode_backend)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decode_one_token(lm.model, cache, self.tokens, lm.decode_backend)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits.clone()


def check_decode_mode(lm, mode: str) -> None:
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode {mode!r} is unknown: allowed values are {', '.join(DECODE_MODES)}")
    if mode == "graph" and lm.device.type != "cuda":
        raise ValueError(f"decode mode 'graph' needs a CUDA device (the model is on {lm.device}): use auto or eager")


def make_decoder(lm, mode: str = "auto") -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``tokens [B] -> logits [B, V]`` step over ``lm.cache``: ``eager``, ``graph``, ``compile`` or ``auto``.

    ``auto``: a CUDA graph on CUDA, eager elsewhere. Call before ``prefill`` (see ``GraphedDecoder``).
    """
    check_decode_mode(lm, mode)
    if mode == "auto":
        mode = "graph" if lm.device.type == "cuda" else "eager"
    if mode == "eager":
        return lambda tokens: decode_one_token(lm.model, lm.cache, tokens, lm.decode_backend)
    if mode == "graph":
        graphs = lm.__dict__.setdefault("_graphs", {})
        if id(lm.cache) not in graphs or graphs[id(lm.cache)].cache is not lm.cache:
            graphs.clear()  # one graph per live cache
            graphs[id(lm.cache)] = GraphedDecoder(lm)
        return graphs[id(lm.cache)]
    compiled = lm.__dict__.setdefault(  # mode == "compile"
        "_compiled_decode", torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    )
    return lambda tokens: compiled(lm.model, lm.cache, tokens, lm.decode_backend).clone()


# ---- the loop ----------------------------------------------------------------------
@dataclass
class StreamEvent:
    """One new token of sequence ``index``; ``text`` is the newly printable text (may be empty)."""

    index: int
    token: int
    text: str = ""
    finish_reason: str | None = None  # "length", "eos", "stop" on a sequence's last event


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)  # generated ids (without the end-of-sequence token)
    text: str | None = None  # None without a tokenizer
    finish_reason: str | None = None


class _TextState:
    """Incremental detokenisation of one sequence, holding back what a stop string might still claim."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop, self.emitted = tokenizer, list(stop), 0
        self.text = ""

    def push(self, tokens: list[int]) -> tuple[str, bool]:
        """All generated tokens so far -> (new printable text, a stop string was hit)."""
        self.text = self.tokenizer.decode(tokens)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self._emit(len(self.text)), True
        end = len(self.text)
        if self.text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
            end -= 1
        # a stop string may be starting at the end: hold back the longest such tail
        hold = max((n for s in self.stop for n in range(1, len(s)) if self.text[:end].endswith(s[:n])), default=0)
        return self._emit(end - hold), False

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        piece = self.text[self.emitted : max(end, self.emitted)]
        self.emitted = max(end, self.emitted)
        return piece


def encode_prompts(lm, prompts: Prompts, add_bos: bool = True) -> tuple[list[list[int]], bool]:
    """Strings (via ``lm.tokenizer``) or token lists -> token lists; and whether the input was text."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    is_text = bool(prompts) and all(isinstance(p, str) for p in prompts)
    if is_text:
        if lm.tokenizer is None:
            raise ValueError("text prompts need a tokenizer: load a folder with tokenizer.model / tokenizer.json")
        return [lm.tokenizer.encode(p, add_bos=add_bos) for p in prompts], True
    return [[int(t) for t in p] for p in prompts], False


def check_request(
    lm, prompts: Prompts, max_new_tokens: int, stop: str | Sequence[str] | None, decode_mode: str, add_bos: bool = True
) -> tuple[list[list[int]], list[str]]:
    """What ``stream`` checks before it runs anything: the prompts' token ids and the stop strings, or a ``ValueError``."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: allowed values are >= 1")
    check_decode_mode(lm, decode_mode)
    prompt_ids, _ = encode_prompts(lm, prompts, add_bos)
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stop):
        raise ValueError("stop strings must be non-empty")
    if stop and lm.tokenizer is None:
        raise ValueError("stop strings need a tokenizer")
    for i, p in enumerate(prompt_ids):
        # the last sampled token is never fed back: positions run up to len + max_new_tokens - 2
        if len(p) + max_new_tokens - 1 > lm.max_seq_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it needs "
                f"{len(p) + max_new_tokens - 1} positions > max_seq_len={lm.max_seq_len}"
            )
    return prompt_ids, stop


@torch.no_grad()
def stream(
    lm,
    prompts: Prompts,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop: str | Sequence[str] | None = None,
    stop_on_eos: bool = True,
    seed: int | None = None,
    decode_mode: str = "auto",
    add_bos: bool = True,
) -> Iterator[StreamEvent]:
    """Yield a ``StreamEvent`` per new token of each sequence, as soon as it is sampled."""
    prompt_ids, stop = check_request(lm, prompts, max_new_tokens, stop, decode_mode, add_bos)
    tokenizer = lm.tokenizer
    eos_id = getattr(tokenizer, "eos_id", None) if stop_on_eos else None
    generator = None
    if seed is not None:
        generator = torch.Generator(device=lm.device).manual_seed(seed)

    lm.setup_cache(len(prompt_ids))
    decoder = make_decoder(lm, decode_mode)  # before prefill: graph capture scribbles on the cache
    logits = lm.prefill(prompt_ids)  # [B, V]
    generated: list[list[int]] = [[] for _ in prompt_ids]
    texts = [_TextState(tokenizer, stop) if tokenizer is not None else None for _ in prompt_ids]
    done = [False] * len(prompt_ids)
    for step in range(max_new_tokens):
        next_tokens = sample(logits, temperature, top_k, top_p, generator)  # [B]
        last_step = step == max_new_tokens - 1
        for b, token in enumerate(next_tokens.tolist()):
            if done[b]:
                continue
            reason = None
            piece = ""
            if eos_id is not None and token == eos_id:
                reason = "eos"
            else:
                generated[b].append(token)
                if texts[b] is not None:
                    piece, hit = texts[b].push(generated[b])
                    reason = "stop" if hit else None
            if reason is None and last_step:
                reason = "length"
            if reason is not None:
                done[b] = True
                if texts[b] is not None and reason != "stop":
                    piece += texts[b].flush()
            yield StreamEvent(b, token, piece, reason)
        if last_step or all(done):
            break
        logits = decoder(next_tokens)


def generate(lm, prompts: Prompts, max_new_tokens: int = 128, **kwargs) -> list[Generation]:
    """Generate for every prompt (batched, any lengths); keyword arguments as in ``stream``."""
    n = 1 if isinstance(prompts, str) else len(prompts)
    results = [Generation(text="" if lm.tokenizer is not None else None) for _ in range(n)]
    for event in stream(lm, prompts, max_new_tokens, **kwargs):
        result = results[event.index]
        if event.finish_reason != "eos":
            result.tokens.append(event.token)
        if result.text is not None:
            result.text += event.text
        result.finish_reason = event.finish_reason
    return results
