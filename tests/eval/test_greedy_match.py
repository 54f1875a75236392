"""eval/greedy_match.py: the teacher-forced exact match agrees with greedy generation, for every kind of pattern."""

from __future__ import annotations

import random

import pytest
import torch

from ratplus_titan.eval import niah
from ratplus_titan.eval.greedy_match import greedy_matches
from ratplus_titan.inference.lm import RATPlusLM

PATTERNS = ["dense", "d4w8s2", "topk4k3s2-ratplus", "topk8k2s2-quest", "1:dense+1:d4w8s2"]
# the GPU run uses the CUDA kernels of both paths (prefill/decode and the full-sequence forward)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
ANSWER_TOKENS = 6


def generated_exact(generated: list[int], answer: list[int]) -> bool:
    """The reference: greedy generation produced the answer's tokens, in order, first."""
    return generated[: len(answer)] == answer


def cases(rng: random.Random, generated: list[int]) -> list[list[int]]:
    """Answers that generation must (the continuation, a prefix of it) and must not (one token changed at a
    random place, random tokens) reproduce."""
    changed = list(generated)
    j = rng.randrange(len(changed))
    changed[j] = (changed[j] + rng.randrange(1, 31999)) % 32000
    return [generated, generated[: rng.randint(1, len(generated))], changed, [rng.randrange(32000) for _ in range(4)]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_teacher_forced_match_equals_greedy_generation(tiny_export, pattern, device):
    lm = RATPlusLM.from_pretrained(tiny_export, pattern=pattern, dtype="float32", device=device, max_seq_len=128,
                                   max_batch_size=8)  # fmt: skip
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 32000) for _ in range(n - 1)] for n in (5, 17, 40, 63, 90, 121)]
    generated = [g.tokens for g in lm.generate(prompts, max_new_tokens=ANSWER_TOKENS, stop_on_eos=False)]
    batch_prompts, answers, expected = [], [], []
    for prompt, tokens in zip(prompts, generated):
        assert len(tokens) == ANSWER_TOKENS
        for answer in cases(rng, tokens):
            batch_prompts.append(prompt)
            answers.append(answer)
            expected.append(generated_exact(tokens, answer))
    assert sum(expected) >= 2 * len(prompts) and sum(expected) < len(expected)  # both outcomes are tested
    # all in one right-padded batch (prompts of different lengths), and one by one
    assert greedy_matches(lm, batch_prompts, answers) == expected
    alone = [greedy_matches(lm, [p], [a])[0] for p, a in zip(batch_prompts[::5], answers[::5])]
    assert alone == expected[::5]


def test_logits_at_are_the_full_forward_at_those_positions(tiny_export):
    lm = RATPlusLM.from_pretrained(tiny_export, pattern="d4w8s2", dtype="float32", device="cpu", max_seq_len=64)
    tokens = torch.randint(0, 32000, (3, 50), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 7, 49], [3, 3, 20], [48, 1, 0]])
    full = lm(tokens)  # [B, T, V]
    picked = lm.logits_at(tokens, positions)
    for b in range(3):
        for k in range(3):
            torch.testing.assert_close(picked[b, k], full[b, positions[b, k]], rtol=1e-5, atol=1e-5)


def test_bad_requests_are_refused(tiny_export):
    lm = RATPlusLM.from_pretrained(tiny_export, pattern="dense", dtype="float32", device="cpu", max_seq_len=16)
    with pytest.raises(ValueError, match="an answer has no tokens"):
        greedy_matches(lm, [[1, 5]], [[]])
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        greedy_matches(lm, [[1], [1]], [[5]])
    with pytest.raises(ValueError, match="longer than max_seq_len=16"):
        greedy_matches(lm, [[1] * 15], [[5, 6, 7]])


def test_niah_scorers_agree_on_exact_match(tiny_export, tokenizer):
    """Both scorers of ``niah.evaluate`` on real samples: the random model reproduces no answer, and the
    generate scorer's exact flag (tokens of the generation) equals the teacher-forced one."""
    samples = niah.generate_samples(
        tokenizer, ["single", "multikey"], [256], 3, depths="uniform", seed=5, max_new_tokens=12
    )
    lm = RATPlusLM.from_pretrained(tiny_export, pattern="d4w8s2", dtype="float32", device="cpu", max_seq_len=256,
                                   max_batch_size=6)  # fmt: skip
    forced = niah.evaluate(lm, samples, batch_size=4, progress=False, scorer="teacher-forced")
    generated = niah.evaluate(lm, samples, batch_size=6, progress=False, scorer="generate")
    assert [r["exact"] for r in forced] == [r["exact"] for r in generated] == [False] * len(samples)
    assert [r["score"] for r in forced] == [0.0] * len(samples)
    assert all(r["prediction"] is None for r in forced) and all(isinstance(r["prediction"], str) for r in generated)


@pytest.fixture(scope="module")
def tokenizer():
    from ratplus_titan.data.tokenizer import load_tokenizer

    return load_tokenizer(None)
