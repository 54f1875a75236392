"""Tokenizer builders: the shipped LLaMA-2 SentencePiece model and HF ``tokenizer.json`` files."""

import gzip
import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torchtitan.config import JobConfig

from ratplus_titan.data.tokenizer import (
    DEFAULT_TOKENIZER,
    JsonTokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
    load_tokenizer,
)

CORPUS = Path(__file__).resolve().parents[2] / "ratplus_titan" / "assets" / "corpus"


@pytest.fixture(scope="module")
def docs() -> list[str]:
    with gzip.open(CORPUS / "en_pd_ccby.validation.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f][:20]


@pytest.fixture(scope="module")
def llama() -> SentencePieceTokenizer:
    return load_tokenizer(None)


def _job(hf_assets_path: str) -> JobConfig:
    job = JobConfig()
    job.model.hf_assets_path = hf_assets_path
    return job


def test_llama2_special_ids_and_vocab(llama):
    assert isinstance(llama, SentencePieceTokenizer)
    assert (llama.bos_id, llama.eos_id, llama.pad_id) == (1, 2, None)
    assert llama.get_vocab_size() == 32000
    # Ids every LLaMA-2 tokenizer gives; a different .model file would not.
    assert llama.encode("Hello world") == [15043, 3186]
    assert llama.encode("Hello world", add_bos=True, add_eos=True) == [1, 15043, 3186, 2]


def test_llama2_round_trips_real_text(llama, docs):
    for text in docs:
        ids = llama.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]
        assert len(ids) < len(text)  # it compresses
        assert llama.decode(ids) == text


@pytest.mark.parametrize("value", ["", "./tests/assets/tokenizer"])  # unset, or torchtitan's default
def test_build_defaults_to_shipped_model(value):
    tok = build_tokenizer(_job(value))
    assert isinstance(tok, SentencePieceTokenizer) and Path(tok.path) == DEFAULT_TOKENIZER


def test_build_from_directory_or_file(tmp_path):
    shutil.copy(DEFAULT_TOKENIZER, tmp_path / "tokenizer.model")
    for path in (tmp_path, tmp_path / "tokenizer.model"):
        tok = build_tokenizer(_job(str(path)))
        assert Path(tok.path) == tmp_path / "tokenizer.model"
        assert tok.encode("Hello world") == [15043, 3186]


def test_missing_path_names_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.hf_assets_path.*tokenizer\.model or tokenizer\.json"):
        build_tokenizer(_job(str(tmp_path / "nowhere")))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"model\.hf_assets_path.*directory without.*config\.json"):
        build_tokenizer(_job(str(tmp_path)))


def test_unknown_file_type(tmp_path):
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match=r"\.model.*\.json"):
        load_tokenizer(tmp_path / "vocab.txt")


def _train_bpe(texts: list[str], path: Path) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return tok


def test_hf_json_with_config(tmp_path, docs):
    raw = _train_bpe(docs, tmp_path / "tokenizer.json")
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = build_tokenizer(_job(str(tmp_path)))
    assert isinstance(tok, JsonTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.get_vocab_size() == raw.get_vocab_size()
    for text in docs[:5]:
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids == [1, *raw.encode(text).ids, 2]
        assert tok.decode(ids[1:-1]) == text


def test_hf_json_file_without_config_guesses_special_tokens(tmp_path, docs):
    raw = _train_bpe(docs, tmp_path / "custom-name.json")
    tok = load_tokenizer(tmp_path / "custom-name.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.encode(docs[0], add_bos=True, add_eos=True) == [1, *raw.encode(docs[0]).ids, 2]


def test_directory_with_both_prefers_sentencepiece(tmp_path, docs):
    _train_bpe(docs, tmp_path / "tokenizer.json")
    shutil.copy(DEFAULT_TOKENIZER, tmp_path / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)
