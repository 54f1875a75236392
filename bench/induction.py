"""``python -m bench.induction``: how many optimizer steps before a model copies from far back?

The reproduction (README "Does it work?") needs models that retrieve exact text from beyond the local
window; at its 50M scale none did after 320 optimizer steps, not even with repeated passages in the
training windows. A copying circuit (induction heads) forms abruptly after a plateau counted in optimizer
steps. This measures that plateau for RAT+ and the attention baseline at toy size, in minutes on a CPU:

- training windows: random tokens (ids uniform in ``[3, vocab)``), ``--repeat-share`` of them made periodic
  with a period from ``--min-distance`` to half the window (``bench/reproduce/repeats.py``, the
  reproduction's own rule); the rest can only be guessed;
- every ``--eval-every`` steps: the loss on ``--eval-windows`` fresh random windows that repeat every
  ``seq_len / 2`` tokens (``eval/repeated_tokens.py``, the reproduction's recall stage), on the first half
  (guessing, about ``ln(vocab)``) and on the repeats;
- ``copies_at``: the first evaluated step where the loss on the repeats is at most half the guessing loss
  (the reproduction's own test of "the dense model recalls").

Dense attention (``[B, H, T, hd]`` SDPA), bf16 nowhere: fp32 on any device, AdamW, one process per model.
Writes ``induction_<device><tag>.json`` into ``--out`` (``$OUT`` or bench/results).

    python -m bench.induction                                     # 2 layers, d=64, every window periodic
    python -m bench.induction --repeat-share 0.25 --steps 8000    # a quarter of the windows, as the 50m scale
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import device_slug, environment, log, out_dir, write_json
from bench.reproduce.repeats import add_repeats
from ratplus_titan import cli
from ratplus_titan.eval.perplexity import heldout_loss
from ratplus_titan.eval.repeated_tokens import FIRST_ID, repeated_windows
from ratplus_titan.model.args import RATPlusModelArgs
from ratplus_titan.model.model import RATPlusModel
from ratplus_titan.pattern import DENSE, Pattern

MODELS = {"ratplus": True, "attention": False}
"""Model name -> ``apply_re`` (the attention baseline has no recurrence)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.induction", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--models", type=cli.comma_list(cli.one_of(tuple(MODELS))), default=list(MODELS),
                        help=f"comma-separated subset of {', '.join(MODELS)} (default: both)")  # fmt: skip
    parser.add_argument("--steps", type=cli.positive_int, default=4000, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--repeat-share", type=cli.number_in(0, 1), default=1.0,
                        help="share of the training windows made periodic (default: %(default)s)")  # fmt: skip
    parser.add_argument("--min-distance", type=cli.positive_int, default=None,
                        help="shortest period of a training window (default: seq_len / 4 + 1)")  # fmt: skip
    parser.add_argument("--dim", type=cli.positive_int, default=64, help="model width (default: %(default)s)")
    parser.add_argument("--layers", type=cli.positive_int, default=2, help="blocks (default: %(default)s)")
    parser.add_argument("--heads", type=cli.positive_int, default=2, help="attention heads (default: %(default)s)")
    parser.add_argument("--seq-len", type=cli.positive_int, default=128, help="window length (default: %(default)s)")
    parser.add_argument("--vocab", type=cli.positive_int, default=256, help="vocabulary size (default: %(default)s)")
    parser.add_argument("--batch", type=cli.positive_int, default=16, help="windows per step (default: %(default)s)")
    parser.add_argument("--lr", type=cli.number_in(0, low_open=True), default=1e-3,
                        help="AdamW learning rate, constant (default: %(default)s)")  # fmt: skip
    parser.add_argument("--eval-every", type=cli.positive_int, default=250, help="steps between evaluations")
    parser.add_argument("--eval-windows", type=cli.positive_int, default=32, help="recall windows per evaluation")
    parser.add_argument("--eval-patterns", type=cli.comma_list(Pattern.parse), default=[],
                        help="comma-separated patterns (e.g. d-1w16s2,d4w16s2) whose recall is also evaluated, "
                             "each as a dense-trained model switched at inference (default: none)")  # fmt: skip
    parser.add_argument("--adapt-steps", type=cli.int_at_least(0), default=0,
                        help="after training, adapt a copy of each model to each --eval-patterns pattern for this "
                             "many steps (that pattern only) and evaluate its recall under it (default: 0, none)")  # fmt: skip
    parser.add_argument("--joint-dilation", type=cli.int_at_least(0), default=0,
                        help="joint training as the trainer's (DESIGN §3): per batch an optimizer step under "
                             "dilation D (no window, no sinks), then a dense one; 0 = off (default)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the data and the evaluation")
    parser.add_argument("--threads", type=cli.positive_int, default=None,
                        help="CPU intra-op threads (default: torch's); one per process avoids oversubscription")  # fmt: skip
    parser.add_argument("--out", default=None, help="output folder (default: $OUT or bench/results)")
    parser.add_argument("--tag", default="", help="suffix of the output file name")
    return parser


def training_windows(batch: int, seq_len: int, vocab: int, share: float, min_distance: int,
                     generator: np.random.Generator) -> torch.Tensor:  # fmt: skip
    """``[batch, seq_len + 1]`` random ids, ``share`` of the rows periodic (``add_repeats``)."""
    windows = generator.integers(FIRST_ID, vocab, size=(batch, seq_len + 1), dtype=np.int64)
    return torch.from_numpy(add_repeats(windows, share, min_distance, int(generator.integers(2**31))))


def recall_losses(model: RATPlusModel, windows: torch.Tensor, distance: int,
                  pattern: Pattern = DENSE) -> tuple[float, float]:  # fmt: skip
    """(guessing loss, loss on the repeats) of ``windows [N, T + 1]`` under ``pattern``: the reproduction's
    recall buckets, ``heldout_loss`` with one edge at ``distance`` (targets before it, and those from it on)."""

    def lm(tokens: torch.Tensor) -> torch.Tensor:
        return model(tokens, pattern)

    by_position = heldout_loss(lm, windows, batch_size=windows.shape[0], edges=(distance,))["by_position"]
    seq_len = windows.shape[1] - 1
    return by_position[f"0-{distance}"], by_position[f"{distance}-{seq_len}"]


def copies_at(curve: list[dict]) -> int | None:
    """The first evaluated step whose loss on the repeats is at most half the guessing loss, else None."""
    return next((point["step"] for point in curve if point["repeats"] <= 0.5 * point["guess"]), None)


def train(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    model_args = RATPlusModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads, vocab_size=args.vocab,
                                  max_seq_len=args.seq_len, apply_re=MODELS[name], attention_backend="sdpa")  # fmt: skip
    with torch.device(device):
        model = RATPlusModel(model_args)
    model.init_weights(buffer_device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    data = np.random.default_rng(args.seed)
    distance = args.seq_len // 2
    held_out = repeated_windows(args.eval_windows, args.seq_len, distance, args.vocab, args.seed + 1).to(device)
    curve, started = [], time.monotonic()
    # the trainer's joint training: the sparse phase, then the dense one (ratplus_titan/train.py)
    phases = [Pattern(args.joint_dilation), DENSE] if args.joint_dilation else [DENSE]
    for step in range(1, args.steps + 1):
        windows = training_windows(args.batch, args.seq_len, args.vocab, args.repeat_share, args.min_distance, data)
        windows = windows.to(device)
        loss = optimize(model, optimizer, windows, phases, f"{name} at step {step}")
        if step % args.eval_every == 0 or step == args.steps:
            guess, repeats = recall_losses(model, held_out, distance)
            point = {
                "step": step,
                "train": round(loss.item(), 4),
                "guess": round(guess, 4),
                "repeats": round(repeats, 4),
            }
            # the same model switched to each pattern at inference: loss on the repeats
            point["patterns"] = {
                str(p): round(recall_losses(model, held_out, distance, p)[1], 4) for p in args.eval_patterns
            }
            curve.append(point)
            sparse = "".join(f"  {spec} {value:.3f}" for spec, value in point["patterns"].items())
            log(f"{name:9s} step {step:5d}/{args.steps}  train {loss.item():.3f}  recall: guess {guess:.3f} "
                f"repeats {repeats:.3f}{sparse}  ({time.monotonic() - started:.0f} s)")  # fmt: skip
    result = {"params": sum(p.numel() for p in model.parameters()), "seconds": round(time.monotonic() - started, 1),
              "copies_at": copies_at(curve), "curve": curve}  # fmt: skip
    if args.adapt_steps:
        result["adapted"] = {}
        for pattern in args.eval_patterns:
            result["adapted"][str(pattern)] = adapt(model, args, pattern, held_out, distance, device)
            log(f"{name:9s} adapted {args.adapt_steps} steps to {pattern}: recall under it: "
                f"{result['adapted'][str(pattern)]}")  # fmt: skip
    return result


def optimize(model: RATPlusModel, optimizer: torch.optim.Optimizer, windows: torch.Tensor,
             phases: list[Pattern], where: str) -> torch.Tensor:  # fmt: skip
    """One optimizer step per pattern of ``phases`` on ``windows [B, T + 1]``; the last step's loss."""
    for pattern in phases:
        logits = model(windows[:, :-1], pattern).float()
        loss = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
        if not torch.isfinite(loss):
            raise RuntimeError(f"{where}: loss is {loss.item()}; try a lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return loss


def adapt(model: RATPlusModel, args: argparse.Namespace, pattern: Pattern, held_out: torch.Tensor, distance: int,
          device: torch.device) -> dict:  # fmt: skip
    """A copy of ``model`` trained ``--adapt-steps`` more steps under ``pattern`` alone (the paper's short
    adaptation, DESIGN §3) on fresh windows of the same kind, the same ones for every model and pattern;
    ``{"guess", "repeats"}``: its recall losses under ``pattern``."""
    adapted = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(adapted.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    data = np.random.default_rng(args.seed + 2)
    for step in range(1, args.adapt_steps + 1):
        windows = training_windows(args.batch, args.seq_len, args.vocab, args.repeat_share, args.min_distance, data)
        optimize(adapted, optimizer, windows.to(device), [pattern], f"adaptation to {pattern} at step {step}")
    guess, repeats = recall_losses(adapted, held_out, distance, pattern)
    return {"guess": round(guess, 4), "repeats": round(repeats, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.min_distance is None:
        args.min_distance = args.seq_len // 4 + 1
    if not args.min_distance <= (args.seq_len + 1) // 2:
        parser.error(f"--min-distance {args.min_distance} must be at most half the window, {(args.seq_len + 1) // 2}")
    if args.dim % args.heads or (args.dim // args.heads) % 2:
        parser.error(f"--dim {args.dim} must split into --heads {args.heads} heads of an even width")
    if args.adapt_steps and not args.eval_patterns:
        parser.error("--adapt-steps needs --eval-patterns: the patterns to adapt to")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = {k: v for k, v in vars(args).items() if k not in ("out", "tag", "threads")}
    result = {"env": environment(device.type), "config": config, "guess_nats": math.log(args.vocab - FIRST_ID),
              "models": {}}  # fmt: skip
    path = f"{args.out or out_dir()}/induction_{device_slug(device.type)}{args.tag}.json"
    for name in args.models:
        result["models"][name] = train(name, args, device)
        write_json(path, result)
        log(f"{name}: copies from step {result['models'][name]['copies_at']} on; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
