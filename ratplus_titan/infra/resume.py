"""What a training run says about the checkpoint it resumes from, before and after loading it.

torchtitan 0.2.2 resumes from the newest ``step-N`` folder under ``[checkpoint] folder`` (else from
``checkpoint.initial_load_path``), and two ordinary situations go wrong quietly or loudly:

- a checkpoint saved by another flavor (or with another ``[ratplus] apply_re``) fails inside DCP with
  a long size-mismatch traceback that never says why. ``check_fits`` compares the tensor shapes in
  the checkpoint's ``.metadata`` with the model's before anything is read, and raises a one-line
  ``ConfigError`` naming the tensor, both shapes and the flavor;
- a checkpoint at ``training.steps`` (a second ``make train``) loads, trains nothing and exits
  without a word: ``finished_message`` says so and how to train longer or start over.

``resume_checks()`` installs both on torchtitan's ``CheckpointManager`` while a run is inside it
(``ratplus_titan/infra/entry.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ratplus_titan.config import ConfigError


def check_fits(state_dict: dict[str, Any], checkpoint_id: str, flavor: str, advice: str) -> None:
    """Raise ``ConfigError`` unless every tensor of ``state_dict`` is in the DCP checkpoint with the same shape.

    ``state_dict``: what torchtitan is about to load (model tensors at the top level; optimizer
    and other states nested, not compared). ``advice``: what to do instead, for the message.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    problems = []
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        stored = saved.get(key)
        if stored is None:
            problems.append(f"it has no tensor {key} (shape {list(tensor.shape)} in this model)")
        elif isinstance(stored, TensorStorageMetadata) and tuple(stored.size) != tuple(tensor.shape):
            problems.append(f"{key} is {list(stored.size)} there but {list(tensor.shape)} in this model")
    if problems:
        more = f" (and {len(problems) - 1} more tensors)" if len(problems) > 1 else ""
        raise ConfigError(
            f"checkpoint {checkpoint_id} does not fit model.flavor={flavor!r}: {problems[0]}{more}; it was saved by "
            f"another flavor or [ratplus] apply_re: {advice}"
        )


def finished_message(checkpoint_folder: str, step: int, steps: int) -> str:
    """One line: the run resumed at its last step, and how to train longer or start over."""
    return (
        f"{os.path.join(checkpoint_folder, f'step-{step}')} is at step {step} and training.steps = {steps}: "
        f"nothing left to train. To train longer raise training.steps (--training.steps {2 * steps}; with make: "
        f'make train ARGS="--training.steps {2 * steps}"); to start over remove the checkpoints '
        f"(rm -rf {checkpoint_folder})"
    )


@contextmanager
def resume_checks() -> Iterator[None]:
    """While inside: torchtitan's ``CheckpointManager`` runs ``check_fits`` before each DCP load, and
    logs ``finished_message`` when the checkpoint it loaded is at ``training.steps``."""
    from torchtitan.components.checkpoint import TRAIN_STATE, CheckpointManager
    from torchtitan.tools.logging import logger

    original_dcp_load, original_load = CheckpointManager.dcp_load, CheckpointManager.load

    def dcp_load(self, state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool, from_quantized: bool) -> None:
        trainer = self.states.get(TRAIN_STATE)
        if not from_hf and trainer is not None:
            own = os.path.abspath(checkpoint_id).startswith(os.path.abspath(self.folder) + os.sep)
            if own:
                advice = f"resume with the flavor it was trained with, or start over (rm -rf {self.folder})"
            else:
                advice = (
                    "give checkpoint.initial_load_path a checkpoint of this flavor, or use the flavor it was saved by"
                )
            check_fits(state_dict, checkpoint_id, trainer.job_config.model.flavor, advice)
        original_dcp_load(self, state_dict, checkpoint_id, from_hf, from_quantized)

    def load(self, step: int = -1) -> bool:
        loaded = original_load(self, step)
        trainer = self.states.get(TRAIN_STATE)
        if loaded and trainer is not None and trainer.step >= trainer.job_config.training.steps > 0:
            logger.warning(finished_message(self.folder, trainer.step, trainer.job_config.training.steps))
        return loaded

    CheckpointManager.dcp_load, CheckpointManager.load = dcp_load, load
    try:
        yield
    finally:
        CheckpointManager.dcp_load, CheckpointManager.load = original_dcp_load, original_load
