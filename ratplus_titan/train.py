"""The RAT+ trainer: torchtitan's ``Trainer`` plus joint training and a non-finite-loss stop.

Run: ``ratplus-train --config debug_model`` (``./run_train.sh`` in a checkout): torchrun of ``python -m
ratplus_titan.train`` on a GPU machine, ``python -m ratplus_titan.infra.cpu`` without a GPU; or
``TRAIN_FILE=ratplus_titan.train ./run_train.sh`` from a torchtitan checkout. Without torchrun's
variables ``python -m ratplus_titan.train`` says what to run instead (``infra/entry.py``).

Joint training (DESIGN §3, "active recurrence learning"): for every batch, a
forward/backward under the dilated pattern ``D = joint_dilation`` (no window, no
sinks) and an optimizer step, then a forward/backward of the same batch with dense
attention and a second optimizer step; the LR schedule advances once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer

import ratplus_titan.train_spec  # noqa: F401  (registers the "ratplus" train spec)
from ratplus_titan.pattern import DENSE, Pattern
from ratplus_titan.training_record import TrainingRecord, record_in_checkpoints


class NonFiniteLossError(RuntimeError):
    """Training stopped before an optimizer step could apply a NaN/inf gradient."""


class RATPlusTrainer(Trainer):
    def __init__(self, job_config) -> None:
        super().__init__(job_config)
        # every DCP checkpoint records the [ratplus] pattern trained with (ratplus-export reads it)
        record_in_checkpoints(self.checkpointer, TrainingRecord.of_args(self.model_args))
        section = getattr(job_config, "ratplus", None)
        self.joint_train = bool(section and section.joint_train)
        self.phase_pattern: Pattern | None = None
        if self.joint_train:
            self.phases = [("loss_sparse", Pattern(section.joint_dilation)), ("loss", DENSE)]
            # One step now runs the model twice: count both phases for MFU.
            model = self.model_parts[0]
            seq_len = job_config.training.seq_len
            _, sparse_flops = self.model_args.get_nparams_and_flops(model, seq_len, [self.phases[0][1]] * self.model_args.n_layers)
            _, dense_flops = self.model_args.get_nparams_and_flops(model, seq_len, [DENSE] * self.model_args.n_layers)
            self.metrics_processor.num_flops_per_token = sparse_flops + dense_flops
        else:
            self.phases = [("loss", None)]
        self.phase_losses: list[dict[str, float]] = []  # every step's losses by phase, for tests and tools

    # The model takes the phase's pattern as a keyword (None = each layer's configured pattern).
    def post_dataloading_process(self, input_dict, labels):
        inputs, labels, extra_inputs, extra_kwargs = super().post_dataloading_process(input_dict, labels)
        if self.phase_pattern is not None:
            extra_kwargs["pattern"] = self.phase_pattern
        return inputs, labels, extra_inputs, extra_kwargs

    def train_step(self, data_iterator: Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]) -> None:
        lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]
        microbatches = []
        local_valid_tokens = torch.tensor(0, dtype=torch.int64)
        for _ in range(self.gradient_accumulation_steps):
            input_dict, labels = next(data_iterator)
            local_valid_tokens += (labels != IGNORE_INDEX).sum()
            input_dict = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in input_dict.items()}
            microbatches.append((input_dict, labels.to(self.device)))
        local_valid_tokens = local_valid_tokens.to(self.device)
        if self.parallel_dims.dp_enabled:
            global_valid_tokens = dist_utils.dist_sum(local_valid_tokens, self.parallel_dims.get_mesh("batch"))
        else:
            global_valid_tokens = local_valid_tokens.float()

        results = {}
        for name, pattern in self.phases:
            results[name] = self._optimizer_step(name, pattern, microbatches, global_valid_tokens)
        self.lr_schedulers.step()  # once per batch, whatever the number of phases
        self._log(results, lr, local_valid_tokens, global_valid_tokens)

    def _optimizer_step(self, name: str, pattern: Pattern | None, microbatches, global_valid_tokens):
        """Forward/backward over every microbatch, clip, check finiteness, one optimizer step."""
        self.optimizers.zero_grad()
        self.phase_pattern = pattern
        try:
            losses = [
                self.forward_backward_step(input_dict=dict(d), labels=labels, global_valid_tokens=global_valid_tokens)
                for d, labels in microbatches
            ]
        finally:
            self.phase_pattern = None
        loss = torch.sum(torch.stack([x.detach() for x in losses]))
        grad_norm = dist_utils.clip_grad_norm_(
            [p for m in self.model_parts for p in m.parameters()],
            self.job_config.training.max_norm,
            foreach=True,
            pp_mesh=self.parallel_dims.get_optional_mesh("pp"),
            ep_enabled=self.parallel_dims.ep_enabled,
        )
        # The grad norm is reduced over all ranks: a NaN/inf loss anywhere shows here on every rank.
        if not torch.isfinite(grad_norm) or not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"{name} is not finite at step {self.step} (loss {loss.item()}, grad norm {grad_norm.item()}); "
                "stopped before the optimizer step. The last saved checkpoint is intact: resume from it, "
                "e.g. with a lower optimizer.lr or training.max_norm."
            )
        self.checkpointer.maybe_wait_for_staging()
        self.optimizers.step()
        return loss, grad_norm

    def _log(self, results, lr: float, local_valid_tokens, global_valid_tokens) -> None:
        reduced = {}
        for name, (loss, _) in results.items():
            if self.parallel_dims.dp_cp_enabled:
                mesh = self.parallel_dims.get_optional_mesh("loss")
                avg = dist_utils.dist_sum(loss, mesh)
                peak = dist_utils.dist_max(loss * global_valid_tokens / local_valid_tokens, mesh)
            else:
                avg = peak = loss.item()
            reduced[name] = (avg, peak)
        self.phase_losses.append({"step": self.step, **{name: float(avg) for name, (avg, _) in reduced.items()}})
        if not self.metrics_processor.should_log(self.step):
            return
        ntokens = self.ntokens_seen
        if self.parallel_dims.dp_cp_enabled:
            ntokens = dist_utils.dist_sum(
                torch.tensor(self.ntokens_seen, dtype=torch.int64, device=self.device),
                self.parallel_dims.get_optional_mesh("loss"),
            )
        extra: dict[str, Any] = {"n_tokens_seen": ntokens, "lr": lr}
        if "loss_sparse" in reduced:
            extra["loss_metrics/loss_sparse"] = reduced["loss_sparse"][0]
            logger.info(f"step {self.step:3d}  loss_sparse {reduced['loss_sparse'][0]:7.4f}  (joint training, D={self.phases[0][1].dilation})")
        avg, peak = reduced["loss"]
        self.metrics_processor.log(self.step, avg, peak, results["loss"][1].item(), extra_metrics=extra)


if __name__ == "__main__":
    from ratplus_titan.infra.entry import torchrun_main

    torchrun_main(RATPlusTrainer)
