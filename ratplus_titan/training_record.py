"""What a RAT+ training run writes into its DCP checkpoints about itself: the pattern it trained with.

``RATPlusTrainer`` adds one entry, ``RECORD_KEY``, to every DCP checkpoint it saves (interval saves,
the last step, a seed checkpoint): a ``uint8`` tensor holding the JSON
``{"version": 1, "pattern": {...}, "apply_re": bool}``, where ``"pattern"`` is what an export's
config.json holds (``adapters.layout.pattern_fields``: the ``[ratplus]`` dilation, local_window,
sinks and head_groups). ``ratplus-export`` records that pattern in config.json unless ``--pattern``
says otherwise. ``python -m ratplus_titan.adapters.to_dcp`` writes it too, from config.json.

A tensor rather than a Python object, so reading it unpickles nothing. It is never loaded back:
resuming a run takes the pattern from the job config, and a checkpoint saved before the record
existed resumes as before.

Why around ``CheckpointManager.dcp_save`` rather than a ``Stateful`` in ``checkpointer.states``
(torchtitan 0.2.2, ``components/checkpoint.py``): the last-step save keeps only the model when
``last_save_model_only`` (torchtitan's default), so a state there would be missing from the checkpoint
most runs end with; and every entry of ``checkpointer.states`` is loaded on resume, so older
checkpoints (without it) would fail to resume. Model-only loads (``initial_load_model_only``)
read only the model's keys either way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ratplus_titan.model.args import RATPlusModelArgs

RECORD_KEY = "ratplus_training_record"
VERSION = 1


@dataclass(frozen=True)
class TrainingRecord:
    pattern: dict  # config.json's "pattern": {"dilation", "local_window", "sinks"[, "head_groups"]}
    apply_re: bool

    @classmethod
    def of_args(cls, args: RATPlusModelArgs) -> TrainingRecord:
        from ratplus_titan.adapters.layout import pattern_fields

        return cls(pattern_fields(args), bool(args.apply_re))

    def to_tensor(self) -> torch.Tensor:
        """The record as the bytes of its JSON, a 1-d ``uint8`` tensor."""
        import torch

        text = json.dumps({"version": VERSION, "pattern": self.pattern, "apply_re": self.apply_re}, sort_keys=True)
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, source: str) -> TrainingRecord:
        """Inverse of ``to_tensor``; a record that cannot be read is a ``ValueError`` naming ``source``."""
        try:
            values = json.loads(bytes(tensor.tolist()).decode("utf-8"))
            return cls(dict(values["pattern"]), bool(values["apply_re"]))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{source}: the training record {RECORD_KEY!r} cannot be read ({type(err).__name__}: {err}); "
                "pass --pattern to say which pattern the checkpoint was trained for"
            ) from None

    @property
    def pattern_setting(self) -> tuple:
        """``RATPlusModelArgs.set_pattern``'s arguments."""
        from ratplus_titan.adapters.layout import pattern_setting

        return pattern_setting(self.pattern)


def record_in_checkpoints(checkpointer: Any, record: TrainingRecord) -> None:
    """Add ``record`` to every DCP checkpoint ``checkpointer`` (torchtitan's ``CheckpointManager``) saves."""
    save = checkpointer.dcp_save
    tensor = record.to_tensor()

    def dcp_save(state_dict: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("to_hf"):  # a Hugging Face safetensors save holds model weights only
            return save(state_dict, *args, **kwargs)
        return save({**state_dict, RECORD_KEY: tensor}, *args, **kwargs)

    checkpointer.dcp_save = dcp_save
