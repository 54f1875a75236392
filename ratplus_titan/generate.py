"""``ratplus-generate MODEL_DIR --prompt "..." --pattern d16w256s4``: generate text from an exported model.

Prints the text as it comes, then the decode speed (tokens/s) and the decode cache's memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ratplus_titan import cli

PROG = "ratplus-generate"


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog=PROG,
        description="Generate text with a RAT+ model exported by ratplus-export, under a sparse attention pattern.",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by ratplus-export (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--prompt", action="append", required=True, type=cli.non_empty,
                        help="prompt text; repeat the option for a batch of prompts (they may differ in length)")
    cli.add_pattern_argument(parser)
    parser.add_argument("--max-new-tokens", type=cli.positive_int, default=128,
                        help="tokens to generate per prompt (default: %(default)s)")
    parser.add_argument("--temperature", type=cli.number_in(0.0), default=0.0,
                        help="sampling temperature; 0 = greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=cli.number_in(0.0, 1.0, low_open=True), default=1.0,
                        help="nucleus sampling mass, in (0, 1] (default: %(default)s)")
    parser.add_argument("--top-k", type=cli.non_negative_int, default=0,
                        help="sample among the k most likely tokens; 0 = all (default: %(default)s)")
    parser.add_argument("--stop", action="append", default=[], type=cli.non_empty,
                        help="stop string; repeat for several (the text is cut before it)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: none)")
    parser.add_argument("--device", type=cli.device, default=None,
                        help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--dtype", choices=cli.DTYPES, default=None, help="weights/activations dtype (default: the exported dtype)")
    parser.add_argument("--max-seq-len", type=cli.token_count, default=None,
                        help="longest prompt + generation the cache is sized for (default: prompt + max-new-tokens)")
    parser.add_argument("--decode-mode", choices=cli.DECODE_MODES, default="auto",
                        help="decode step: CUDA graph ('graph', the default on CUDA), 'compile' (torch.compile "
                             "reduce-overhead) or 'eager' (default: %(default)s)")
    parser.add_argument("--no-bos", action="store_true", help="do not prepend the tokenizer's BOS token to prompts")
    return parser


def load(args: argparse.Namespace):
    """The model of ``args.model_dir``, sized for this request, which is checked (a ``ValueError`` if it cannot run)."""
    from ratplus_titan.adapters.layout import read_config
    from ratplus_titan.data.tokenizer import TOKENIZER_FILES, load_tokenizer
    from ratplus_titan.inference.generate import check_request
    from ratplus_titan.inference.lm import RATPlusLM

    model_dir = Path(args.model_dir)
    read_config(model_dir / "config.json")  # a missing or broken folder is named before the tokenizer is read
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{model_dir} holds no {' or '.join(TOKENIZER_FILES)}: text prompts need a tokenizer")
    max_seq_len = args.max_seq_len
    if max_seq_len is None:  # size the cache for this request
        tokenizer = load_tokenizer(model_dir)
        max_seq_len = max(len(tokenizer.encode(p, add_bos=not args.no_bos)) for p in args.prompt) + args.max_new_tokens
    lm = RATPlusLM.from_pretrained(
        model_dir,
        pattern=args.pattern,
        dtype=args.dtype,
        device=args.device,
        max_seq_len=max_seq_len,
        max_batch_size=len(args.prompt),
    )
    check_request(lm, args.prompt, args.max_new_tokens, args.stop, args.decode_mode, add_bos=not args.no_bos)
    flag = "--max-seq-len" if args.max_seq_len is not None else "the longest prompt + --max-new-tokens"
    cli.warn_beyond_model_length(PROG, flag, lm.max_seq_len, lm.model_max_seq_len)
    return lm


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    with cli.user_errors(PROG):
        lm = load(args)

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
        f"# pattern {cli.describe_patterns(lm.patterns)}: {n_tokens} tokens in {elapsed:.2f} s "
        f"({n_tokens / elapsed:.1f} tokens/s overall, "
        f"{decode_tokens / decode_time if decode_time > 0 else float('nan'):.1f} tokens/s decoding); "
        f"cache memory {lm.cache.total_bytes()} bytes ({per_seq} bytes per sequence, "
        f"{lm.cache.kv_bytes_per_sequence()} of them key/value rows, max_seq_len {lm.max_seq_len})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
