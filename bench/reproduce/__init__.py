"""Small-scale reproduction of "train dense, infer sparse", end to end through the package's entry points.

    python -m bench.reproduce --scale 50m --readme       # one H100/H200: ~20 minutes (rerun to continue)
    python -m bench.reproduce --scale tiny --out /tmp/r  # CPU: the debug model, a few steps of each stage

1. data      the corpus (data/README.md; ``tiny``: the bundled one) -> ``.bin`` tokens
             (``python -m ratplus_titan.data.pretokenize``): pretraining windows, then adaptation windows
             pretraining never sees; NIAH fine-tuning samples from training books and evaluation samples from
             held-out books, keys and values disjoint (``ratplus_titan.eval.niah_splits``);
2. pretrain  ``run_train.sh`` + ``train_configs/reproduce_pretrain.toml``, windows in a seeded random order,
             three models on the same data and steps: RAT+ with joint training, attention without it (the
             paper's standard baseline) and attention with it (FLOPs-matched);
3. adapt     each to each sparse pattern (``reproduce_adapt.toml``: joint training off, lr 8e-5, no warmup,
             cosine; DESIGN §3), on the held-back windows;
4. sft       each (model, pattern), dense included, fine-tuned on the NIAH training split with that pattern
             active (``reproduce_sft.toml``: ``dataset = "sft"``, prompt masked from the loss);
5. export    ``ratplus-export`` of every checkpoint;
6. evaluate  NIAH accuracy on the held-out split by task, depth and needle distance (fine-tuned and evaluated
             under each pattern; the dense-fine-tuned models also under the sparse patterns and top-k block
             attention at the first pattern's KV budget: RAT+, Quest and MoBA block scores); held-out LM loss
             by position of every (model, pattern); exact recall beyond the window of every (model, pattern):
             the loss on random tokens that repeat every T/2 positions (``ratplus_titan.eval.repeated_tokens``),
             which needs no fine-tuning; and recall of natural text the same way: held-out windows (drawn by the
             seed) whose second half repeats their first, where the first half's loss is ordinary LM loss;
7. report    ``reproduce_<device>.json``, a PNG, and the README section (``--readme``; from a JSON file alone
             with ``--readme-only``).

Every stage's output lives in ``--work`` (default ``outputs/reproduce_<scale>``) in a folder keyed by the
settings it depends on (``bench/reproduce/stages.py``): a rerun reuses what is complete under the same
settings and redoes the rest, so a cut-off run continues where it stopped (``--deadline-min`` stops
cleanly before a stage that would not fit). Progress (step, loss, tokens/s) every ``--progress-s`` seconds.
"""

from bench.reproduce.main import main
from bench.reproduce.report import README_BEGIN, README_END, readme_section, summarize, write_readme
from bench.reproduce.scales import MODELS, SCALES, Model, Scale

__all__ = [
    "MODELS",
    "README_BEGIN",
    "README_END",
    "SCALES",
    "Model",
    "Scale",
    "main",
    "readme_section",
    "summarize",
    "write_readme",
]
