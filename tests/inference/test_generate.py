"""Generation: greedy equals argmax of repeated full forwards, stop strings, EOS, streaming, sampling."""

import pytest
import torch

from ratplus_titan.inference import RATPlusLM
from ratplus_titan.inference.generate import sample
from ratplus_titan.model.args import RATPlusModelArgs


class CharTokenizer:
    """Printable ASCII, one character per token (ids 0..94); optional eos id."""

    bos_id = None

    def __init__(self, eos_id=None):
        self.eos_id = eos_id

    def encode(self, text, add_bos=False, add_eos=False):
        return [ord(c) - 32 for c in text]

    def decode(self, ids):
        return "".join(chr(i + 32) if 0 <= i < 95 else "?" for i in ids)


def tiny_lm(pattern="d4w8s2", tokenizer=None, max_seq_len=80):
    torch.manual_seed(0)
    args = RATPlusModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=95, max_seq_len=128, init_std=0.1)
    return RATPlusLM(args, pattern=pattern, max_seq_len=max_seq_len, max_batch_size=4, tokenizer=tokenizer)


def greedy_by_full_forward(lm, prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(lm(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("pattern", ["d4w8s2", "dense", "d-1w8s2", ["dense", "d3w0s1"]], ids=str)
def test_greedy_generate_equals_argmax_of_full_forwards(pattern):
    lm = tiny_lm(pattern)
    prompts = [[5, 9, 2], list(range(20, 47)), [7]]  # ragged
    results = lm.generate(prompts, max_new_tokens=30)
    for prompt, result in zip(prompts, results):
        assert result.tokens == greedy_by_full_forward(lm, prompt, 30)
        assert result.finish_reason == "length" and result.text is None


def test_stop_strings_stop_and_cut_the_text():
    lm = tiny_lm(tokenizer=CharTokenizer())
    prompts = ["Hello there", "RAT+ is"]
    full = lm.generate(prompts, max_new_tokens=25)
    assert all(len(r.tokens) == 25 for r in full)
    stop = full[0].text[6:8]
    cut = full[0].text.find(stop)
    stopped = lm.generate(prompts, max_new_tokens=25, stop=[stop, "\x7f-never"])
    assert stopped[0].finish_reason == "stop"
    assert stopped[0].text == full[0].text[:cut]
    assert len(stopped[0].tokens) < 25 and stopped[0].tokens == full[0].tokens[: len(stopped[0].tokens)]
    # the other sequence is unaffected unless it also contains the stop string
    other_cut = full[1].text.find(stop)
    assert stopped[1].text == (full[1].text if other_cut < 0 else full[1].text[:other_cut])


def test_eos_stops_a_sequence():
    plain = tiny_lm(tokenizer=CharTokenizer()).generate(["abc"], max_new_tokens=20)[0]
    eos = plain.tokens[4]
    first = plain.tokens.index(eos)
    lm = tiny_lm(tokenizer=CharTokenizer(eos_id=eos))
    result = lm.generate(["abc"], max_new_tokens=20)[0]
    assert result.finish_reason == "eos" and result.tokens == plain.tokens[:first]
    assert lm.generate(["abc"], max_new_tokens=20, stop_on_eos=False)[0].tokens == plain.tokens


@pytest.mark.parametrize("kwargs", [{}, {"temperature": 0.8, "top_k": 10, "seed": 3}])
def test_stream_yields_the_generated_tokens_and_text(kwargs):
    lm = tiny_lm(tokenizer=CharTokenizer())
    prompts = ["The cache", "x"]
    results = lm.generate(prompts, max_new_tokens=15, stop=["q"], **kwargs)
    tokens, texts, reasons = [[], []], ["", ""], [None, None]
    for event in lm.stream(prompts, max_new_tokens=15, stop=["q"], **kwargs):
        assert reasons[event.index] is None, "no events after a sequence finished"
        tokens[event.index].append(event.token)
        texts[event.index] += event.text
        reasons[event.index] = event.finish_reason
    for b in range(2):
        assert tokens[b] == results[b].tokens and texts[b] == results[b].text
        assert reasons[b] == results[b].finish_reason


def test_stream_never_prints_part_of_a_stop_string():
    lm = tiny_lm(tokenizer=CharTokenizer())
    text = lm.generate(["Hello"], max_new_tokens=20)[0].text
    stop = text[10:13]
    printed = ""
    for event in lm.stream(["Hello"], max_new_tokens=20, stop=[stop]):
        printed += event.text
        assert stop not in printed
    assert printed == text[: text.find(stop)]


def test_sampling():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen)
    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits), greedy)
    assert torch.equal(sample(logits, temperature=1.0, top_k=1), greedy)
    assert torch.equal(sample(logits, temperature=1.0, top_p=1e-6), greedy)
    # top_k: only the k best tokens ever come out
    draws = torch.stack([sample(logits, temperature=2.0, top_k=3, generator=gen) for _ in range(200)])
    top3 = logits.topk(3, dim=-1).indices
    assert all(bool((draws[:, b, None] == top3[b]).any(-1).all()) for b in range(4))
    # seeded sampling through the LM is reproducible
    lm = tiny_lm()
    a = lm.generate([[1, 2, 3]], max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)[0].tokens
    b = lm.generate([[1, 2, 3]], max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)[0].tokens
    assert a == b
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, temperature=1.0, top_p=0.0)


def test_too_long_requests_fail_clearly():
    lm = tiny_lm(max_seq_len=32)
    with pytest.raises(ValueError, match="longer than max_seq_len=32"):
        lm.prefill([list(range(33))])
    with pytest.raises(ValueError, match="max_seq_len=32"):
        lm.generate([list(range(20))], max_new_tokens=14)
    assert len(lm.generate([list(range(20))], max_new_tokens=13)[0].tokens) == 13
    with pytest.raises(ValueError, match="max_batch_size=4"):
        lm.generate([[1]] * 5, max_new_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        lm.generate([[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="tokenizer"):
        lm.generate(["text"], max_new_tokens=2)
