"""Supervised fine-tuning data: ``{"prompt": str, "answer": str}`` records -> masked, padded training rows.

``[training] dataset = "sft"``, ``dataset_path`` = a ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.xz`` file, a
directory or a glob of them, one record per line (other keys are ignored). A record becomes one row of
``seq_len`` positions (:func:`sft_row`):

    tokens = bos + prompt + answer + eos                     (n = len(tokens) <= seq_len + 1)
    input  = tokens[:-1], then eos as padding up to seq_len
    labels = tokens[1:], with every label that predicts a prompt token (the first len(bos + prompt) - 1)
             and every padding label set to -100 (torchtitan's IGNORE_INDEX)

so the loss sums over the answer tokens and the eos only, and torchtitan divides it by their count
(the trainer counts ``labels != -100``): the loss is the mean over the answer and eos tokens of the
batch. Padding needs no attention mask: the model is causal, so tokens after a row's end cannot
change its earlier positions. The answer's tokens are the ones that follow the prompt in the
tokenization of ``prompt + answer`` (:func:`encode_pair`), which is what a model reading the prompt
generates; evaluation (``ratplus-niah --scorer teacher-forced``) uses the same function.

Rows are read in the order of ``ratplus_titan.data.order`` (shuffled per epoch by ``[ratplus]
data_seed``, sharded over data-parallel ranks, resumable under any layout).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.tools.logging import logger

from ratplus_titan.data.jsonl import read_json_lines
from ratplus_titan.data.order import ItemOrder
from ratplus_titan.data.ordered import OrderedDataset

if TYPE_CHECKING:
    from ratplus_titan.data.dataset import DataSection

SFT_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz")


def encode_pair(tokenizer: BaseTokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """``(bos + prompt tokens, answer tokens)``: the answer's tokens as they follow the prompt.

    They are the tail of the tokenization of ``prompt + answer`` when its head is the prompt's own
    tokenization (SentencePiece and byte-level BPE tokenizers split at the space that starts an
    answer like ``" 1234567."``); otherwise (a merge across the boundary) the answer encoded alone.
    """
    prompt_ids = tokenizer.encode(prompt, add_bos=True, add_eos=False)
    joined = tokenizer.encode(prompt + answer, add_bos=True, add_eos=False)
    if joined[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, joined[len(prompt_ids) :]
    return prompt_ids, tokenizer.encode(answer, add_bos=False, add_eos=False)


def sft_row(
    prompt_ids: Sequence[int], answer_ids: Sequence[int], eos_id: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training row: ``(input, labels)``, LongTensor ``[seq_len]`` each (see the module docstring).

    ``prompt_ids`` includes the bos token (at least one token); a row of more than ``seq_len + 1``
    tokens raises ``ValueError``.
    """
    if len(prompt_ids) < 1:
        raise ValueError("an SFT prompt needs at least one token (the bos)")
    tokens = [*prompt_ids, *answer_ids, eos_id]
    if len(tokens) > seq_len + 1:
        raise ValueError(f"{len(tokens)} tokens (prompt {len(prompt_ids)}, answer {len(answer_ids)} + eos) "
                         f"exceed seq_len + 1 = {seq_len + 1}")  # fmt: skip
    n = len(tokens) - 1  # positions used
    inputs = torch.full((seq_len,), eos_id, dtype=torch.long)
    labels = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.long)
    inputs[:n] = torch.tensor(tokens[:-1], dtype=torch.long)
    first_answer = len(prompt_ids) - 1  # the label at this position predicts the first answer token (or eos)
    labels[first_answer:n] = torch.tensor(tokens[len(prompt_ids) :], dtype=torch.long)
    return inputs, labels


def read_records(path: Path) -> Iterator[tuple[int, str, str]]:
    """``(line number, prompt, answer)`` of every record of one SFT file; a bad record names file and line."""
    for line_number, record in read_json_lines(path):
        prompt, answer = record.get("prompt"), record.get("answer")
        if not isinstance(prompt, str) or not isinstance(answer, str):
            raise ValueError(f"{path}:{line_number}: an SFT record needs string fields 'prompt' and 'answer' "
                             f"(got keys {sorted(record)})")  # fmt: skip
        yield line_number, prompt, answer


def tokenize_records(
    files: Sequence[Path], tokenizer: BaseTokenizer, seq_len: int, seq_len_field: str = "training.seq_len"
) -> list[tuple[np.ndarray, int]]:
    """Every record of ``files`` as ``(bos + prompt + answer tokens int32, prompt length with bos)``, checked
    to fit ``seq_len + 1`` tokens with the eos."""
    if tokenizer.eos_id is None:
        raise ValueError("SFT data needs a tokenizer with an end-of-sequence token (it ends every answer)")
    rows = []
    for path in files:
        for line_number, prompt, answer in read_records(path):
            prompt_ids, answer_ids = encode_pair(tokenizer, prompt, answer)
            n = len(prompt_ids) + len(answer_ids) + 1
            if n > seq_len + 1:
                raise ValueError(
                    f"{path}:{line_number}: the record has {n} tokens (bos + prompt {len(prompt_ids)}, answer "
                    f"{len(answer_ids)}, eos), more than {seq_len_field} + 1 = {seq_len + 1}: raise seq_len or "
                    "shorten the record"
                )
            rows.append((np.asarray([*prompt_ids, *answer_ids], dtype=np.int32), len(prompt_ids)))
    if not rows:
        raise ValueError(f"no SFT records in {', '.join(map(str, files))}")
    return rows


class SFTDataset(OrderedDataset):
    """Rows of SFT records, one record per row, in ``order`` (this rank's share of the global stream)."""

    def __init__(
        self, rows: list[tuple[np.ndarray, int]], seq_len: int, eos_id: int, order: ItemOrder, name: str, infinite: bool
    ) -> None:
        self.rows, self.seq_len, self.eos_id = rows, seq_len, eos_id
        self.order, self.name, self.infinite = order, name, infinite

    def row(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input, labels)`` of record ``index`` (file order)."""
        tokens, n_prompt = self.rows[index]
        return sft_row(tokens[:n_prompt].tolist(), tokens[n_prompt:].tolist(), self.eos_id, self.seq_len)

    def sample(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        x, y = self.row(index)
        return {"input": x}, y


def build_sft_dataset(
    section: DataSection, tokenizer: BaseTokenizer | None, dp_rank: int, dp_world_size: int, infinite: bool
) -> SFTDataset:
    """This rank's SFT dataset for a config section with ``dataset = "sft"`` (``dataset.build_dataset``):
    every record read and tokenized up front, so a bad or too long record stops the run before training."""
    from ratplus_titan.data.dataset import _find_files

    if tokenizer is None:
        raise ValueError(f'{section.field("dataset")} = "sft" is text and needs a tokenizer')
    files = _find_files(section, SFT_SUFFIXES)
    rows = tokenize_records(files, tokenizer, section.seq_len, section.field("seq_len"))
    if len(rows) < dp_world_size:
        raise ValueError(f"{section.field('dataset_path')} = {section.dataset_path!r} holds {len(rows)} SFT records, "
                         f"fewer than the {dp_world_size} data-parallel ranks")  # fmt: skip
    name = f"{len(files)} SFT file(s) from {section.dataset_path}"
    order = ItemOrder(len(rows), dp_rank, dp_world_size, section.order, section.seed)
    answer_tokens = sum(len(tokens) - n_prompt + 1 for tokens, n_prompt in rows)
    logger.info(f"{section.name} data: {name}, {len(rows)} records ({answer_tokens:,} answer + eos tokens trained) "
                f"in {section.order} order, rank {dp_rank} of {dp_world_size}")  # fmt: skip
    return SFTDataset(rows, section.seq_len, tokenizer.eos_id, order, name, infinite)
