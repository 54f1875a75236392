"""``ratplus-generate MODEL_DIR --prompt "..." --pattern d16w256s4``: generate text from an exported model.

Prints the text as it comes, then the decode speed (tokens/s) and the decode cache's memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ratplus-generate",
        description="Generate text with a RAT+ model exported by ratplus-export, under a sparse attention pattern.",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by ratplus-export (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text; repeat the option for a batch of prompts (they may differ in length)")
    parser.add_argument("--pattern", default="d16w256s4",
                        help="attention pattern: 'dense', 'd<D>w<W>s<S>' (e.g. d16w256s4, d-1w256s4 for no dilation), "
                             "top-k blocks 'topk<block>k<k>s<S>[-quest|-moba|-ratplus]' (e.g. topk64k8s4-ratplus), "
                             "head groups '<n>:<pattern>+...' (e.g. 8:dense+8:d16w256s4), a comma-separated list "
                             "with one per layer (hybrids), or 'config' for the pattern recorded in config.json "
                             "(default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all (default: %(default)s)")
    parser.add_argument("--stop", action="append", default=[], help="stop string; repeat for several (the text is cut before it)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: none)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="weights/activations dtype (default: the exported dtype)")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="longest prompt + generation the cache is sized for (default: prompt + max-new-tokens)")
    parser.add_argument("--decode-mode", choices=("auto", "eager", "graph", "compile"), default="auto",
                        help="decode step: CUDA graph ('graph', the default on CUDA), 'compile' (torch.compile "
                             "reduce-overhead) or 'eager' (default: %(default)s)")
    parser.add_argument("--no-bos", action="store_true", help="do not prepend the tokenizer's BOS token to prompts")
    return parser


def parse_pattern(spec: str):
    if spec == "config":
        return None
    parts = [p.strip() for p in spec.split(",")]
    return parts[0] if len(parts) == 1 else parts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ratplus_titan.adapters.layout import TOKENIZER_FILES
    from ratplus_titan.data.tokenizer import load_tokenizer
    from ratplus_titan.inference.lm import RATPlusLM

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").exists():
        print(f"error: {model_dir / 'config.json'} not found: is {model_dir} a folder written by ratplus-export?", file=sys.stderr)
        return 2
    if not any((model_dir / name).exists() for name in TOKENIZER_FILES):
        print(f"error: {model_dir} holds no {' or '.join(TOKENIZER_FILES)}", file=sys.stderr)
        return 2
    max_seq_len = args.max_seq_len
    if max_seq_len is None:  # size the cache for this request
        tokenizer = load_tokenizer(model_dir)
        max_seq_len = max(len(tokenizer.encode(p, add_bos=not args.no_bos)) for p in args.prompt) + args.max_new_tokens
    lm = RATPlusLM.from_pretrained(
        model_dir,
        pattern=parse_pattern(args.pattern),
        dtype=args.dtype,
        device=args.device,
        max_seq_len=max_seq_len,
        max_batch_size=len(args.prompt),
    )

    single = len(args.prompt) == 1
    texts = [""] * len(args.prompt)
    n_tokens = 0
    if single:
        print(args.prompt[0], end="", flush=True)
    start = time.perf_counter()
    first_token_at = None
    for event in lm.stream(
        args.prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop=args.stop,
        seed=args.seed,
        decode_mode=args.decode_mode,
        add_bos=not args.no_bos,
    ):
        if first_token_at is None:
            first_token_at = time.perf_counter()
        n_tokens += 1
        texts[event.index] += event.text
        if single:
            print(event.text, end="", flush=True)
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)
    elapsed = time.perf_counter() - start
    if single:
        print()
    else:
        for i, text in enumerate(texts):
            print(f"[{i}] {args.prompt[i]}{text}")
    decode_time = elapsed - (first_token_at - start) if first_token_at is not None else 0.0
    decode_tokens = max(n_tokens - len(args.prompt), 0)
    per_seq = lm.cache.bytes_per_sequence()
    print(
        f"# pattern {args.pattern}: {n_tokens} tokens in {elapsed:.2f} s "
        f"({n_tokens / elapsed:.1f} tokens/s overall, "
        f"{decode_tokens / decode_time if decode_time > 0 else float('nan'):.1f} tokens/s decoding); "
        f"cache memory {lm.cache.total_bytes()} bytes ({per_seq} bytes per sequence, "
        f"{lm.cache.kv_bytes_per_sequence()} of them key/value rows, max_seq_len {lm.max_seq_len})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
