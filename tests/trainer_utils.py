"""Shared set-up for tests that run the RAT+ trainer through torchtitan on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ratplus_titan.model import RATPlusModelArgs, ratplus_flavors

REPO = Path(__file__).resolve().parent.parent
DEBUG_TOML = REPO / "train_configs" / "debug_model.toml"
TEST_FLAVOR = "testmodel"


def register_test_flavor() -> None:
    """A 2-layer model small enough for many CPU training steps in CI (LLaMA-2 vocab)."""
    ratplus_flavors[TEST_FLAVOR] = RATPlusModelArgs(dim=64, n_layers=2, n_heads=4, max_seq_len=128)


def write_token_bin(path: Path, n_docs: int = 300) -> Path:
    """Tokenize the bundled corpus with the shipped tokenizer into a uint16 .bin file."""
    from ratplus_titan.data.tokenizer import load_tokenizer
    from tests.torchtitan_cpu import SHARED_CORPUS, _read_corpus_texts

    tokenizer = load_tokenizer(None)
    ids = []
    for text in _read_corpus_texts(SHARED_CORPUS, n_docs):
        ids.extend(tokenizer.encode(text, add_bos=True, add_eos=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.asarray(ids, dtype=np.uint16).tofile(path)
    return path


def trainer_args(dump: Path, steps: int, *extra: str, data: Path | None = None, batch: int = 2, seq_len: int = 64) -> list[str]:
    args = [
        "--job.config_file", str(DEBUG_TOML),
        "--job.dump_folder", str(dump),
        "--model.flavor", TEST_FLAVOR,
        "--training.steps", str(steps),
        "--training.seq_len", str(seq_len),
        "--training.local_batch_size", str(batch),
        "--ratplus.joint_dilation", "8",
        "--debug.seed", "0",
        "--debug.deterministic",
        "--metrics.disable_color_printing",
        "--optimizer.implementation", "for-loop",
    ]  # fmt: skip
    if data is not None:
        args += ["--training.dataset", "bin", "--training.dataset_path", str(data)]
    return args + list(extra)
