"""Exact greedy match by teacher forcing: would greedy decoding after a prompt produce exactly these tokens?

For prompt ``p`` and answer ``a`` (token lists), greedy decoding produces ``a`` iff for every ``j`` the
argmax of the next-token logits after ``p + a[:j]`` is ``a[j]``: up to the first miss the generated
prefix *is* ``a[:j]``, so each step's logits are the ones a forward over ``p + a[:-1]`` computes at
position ``len(p) - 1 + j``. One batched full-sequence forward (right-padded: the model is causal, so
padding cannot change earlier positions) replaces ``len(a)`` decode steps. The forward is the model's
own under its current pattern(s), the one ``ratplus-perplexity`` measures: dense, dilated, top-k and
head-group patterns alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def greedy_matches(lm, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> list[bool]:
    """For each ``(prompt, answer)`` of token ids: does greedy decoding after ``prompt`` produce ``answer``?

    ``lm``: a ``RATPlusLM`` (``pad_prompts``, ``logits_at``). Answers must be non-empty; each
    ``prompt + answer[:-1]`` must fit ``lm.max_seq_len``.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if any(len(a) == 0 for a in answers):
        raise ValueError("an answer has no tokens: give at least one expected token per prompt")
    tokens, _ = lm.pad_prompts([[*p, *a[:-1]] for p, a in zip(prompts, answers)])  # [B, T]
    width = max(len(a) for a in answers)
    positions = torch.zeros(len(answers), width, dtype=torch.long)  # [B, K]: where each answer token is predicted
    expected = torch.full((len(answers), width), -1, dtype=torch.long)  # [B, K]; -1: no answer token there
    for b, (p, a) in enumerate(zip(prompts, answers)):
        positions[b, : len(a)] = torch.arange(len(p) - 1, len(p) - 1 + len(a))
        expected[b, : len(a)] = torch.as_tensor(list(a), dtype=torch.long)
    predicted = lm.logits_at(tokens, positions).argmax(dim=-1).cpu()  # [B, K]
    return ((predicted == expected) | (expected < 0)).all(dim=1).tolist()
