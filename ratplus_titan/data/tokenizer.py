"""Tokenizers: the paper's LLaMA-2 SentencePiece model, or any Hugging Face ``tokenizer.json``.

torchtitan's own builder reads only Hugging Face tokenizer files from a directory. RAT+ (and the
official checkpoints) use LLaMA-2's SentencePiece ``tokenizer.model``, which we ship, so a run
needs no download. Both kinds expose what torchtitan's datasets and models call:
``encode(text, add_bos=, add_eos=)``, ``decode(ids)``, ``get_vocab_size()`` and the ``bos_id``,
``eos_id``, ``pad_id`` attributes (the model's document masks read ``eos_id``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
from tokenizers import Tokenizer
from torchtitan.components.tokenizer import BaseTokenizer, HuggingFaceTokenizer
from torchtitan.config import JobConfig
from torchtitan.config.job_config import Model as _ModelSection
from torchtitan.tools.logging import logger

DEFAULT_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "llama2" / "tokenizer.model"
"""The LLaMA-2 SentencePiece model shipped with the package (vocab 32000, bos 1, eos 2)."""

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
"""Files looked for in a directory, in this order (a HF LLaMA-2 repo holds both; ids agree)."""

# torchtitan's JobConfig points here by default; our TOMLs may leave the field out, and then
# the paper's tokenizer is the right default, not a FileNotFoundError.
_TORCHTITAN_DEFAULT_ASSETS = _ModelSection().hf_assets_path

# Names used by common tokenizer.json files when no tokenizer_config.json says which is which.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[BOS]")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[EOS]")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class SentencePieceTokenizer(BaseTokenizer):
    """A SentencePiece ``.model`` file behind torchtitan's tokenizer interface.

    bos/eos are added only when asked (``add_bos``/``add_eos``), as the dataset packer does,
    so that encoding a prompt or a continuation never inserts them silently.
    """

    def __init__(self, model_path: str | os.PathLike) -> None:
        super().__init__()
        self.path = str(model_path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as err:
            raise ValueError(f"{self.path} cannot be read as a SentencePiece model ({err}): is it truncated?") from None
        self.bos_id: int | None = _valid_id(self._sp.bos_id())
        self.eos_id: int | None = _valid_id(self._sp.eos_id())
        self.pad_id: int | None = _valid_id(self._sp.pad_id())

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._sp.encode(text)
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._sp.decode([int(t) for t in token_ids])

    def get_vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def vocab_size(self) -> int:
        return self.get_vocab_size()

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r}, vocab={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"


class JsonTokenizer(HuggingFaceTokenizer):
    """torchtitan's ``HuggingFaceTokenizer``, opened from a ``tokenizer.json`` file of any name.

    torchtitan learns bos/eos only from a ``tokenizer_config.json`` beside the file; without one
    they would be ``None`` and packed documents would run together, so we fall back to the
    usual special-token names. Adds ``pad_id`` (``None`` when the tokenizer has no pad token).
    """

    def __init__(self, json_path: str | os.PathLike) -> None:
        self._json_path = str(json_path)
        super().__init__(os.path.dirname(os.path.abspath(self._json_path)))
        self.path = self._json_path
        if self.bos_id is None:
            self.bos_id = self._first_known(_BOS_NAMES)
        if self.eos_id is None:
            self.eos_id = self._first_known(_EOS_NAMES)
        pad_name = self._get_token_from_config(self.config, "pad_token") if self.config else None
        self.pad_id = self.tokenizer.token_to_id(pad_name) if pad_name else self._first_known(_PAD_NAMES)
        self._infer_should_add_bos_eos()  # again: bos/eos may have been found only just now
        if self.eos_id is None:
            logger.warning(
                f"Tokenizer {self.path} has no end-of-sequence token: packed documents will not be separated"
            )

    def _load_tokenizer_from_path(self, tokenizer_path: str) -> Tokenizer:
        try:
            return Tokenizer.from_file(self._json_path)
        except Exception as err:  # tokenizers raises a bare Exception for a file it cannot parse
            raise ValueError(f"{self._json_path} cannot be read as a tokenizer.json ({err}): is it truncated?") from None

    def _first_known(self, names: Sequence[str]) -> int | None:
        for name in names:
            token_id = self.tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def __repr__(self) -> str:
        return f"JsonTokenizer({self.path!r}, vocab={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"


def resolve_tokenizer_file(path: str | os.PathLike | None, field: str = "tokenizer path") -> Path:
    """Return the tokenizer file that ``path`` names: empty → the shipped LLaMA-2 model;
    a directory → its ``tokenizer.model`` or else ``tokenizer.json``; a file → itself.

    ``field`` is the config field the path came from, named in the error message.
    """
    if path is None or str(path).strip() == "":
        return DEFAULT_TOKENIZER
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for name in TOKENIZER_FILES:
            if (p / name).is_file():
                return p / name
        found = sorted(f.name for f in p.iterdir())[:20]
        raise FileNotFoundError(
            f"{field} = {str(path)!r} is a directory without {' or '.join(TOKENIZER_FILES)} "
            f"(it holds {found}). Point it at a directory or file holding one of those, "
            f"or leave it empty for the bundled LLaMA-2 tokenizer."
        )
    if str(path) == _TORCHTITAN_DEFAULT_ASSETS:
        logger.info(f"{field} is torchtitan's default {str(path)!r}, which does not exist: using {DEFAULT_TOKENIZER}")
        return DEFAULT_TOKENIZER
    raise FileNotFoundError(
        f"{field} = {str(path)!r} does not exist. Expected a directory holding "
        f"{' or '.join(TOKENIZER_FILES)}, a path to a .model (SentencePiece) or .json (HF tokenizers) file, "
        f"or an empty value for the bundled LLaMA-2 tokenizer."
    )


def load_tokenizer(path: str | os.PathLike | None = None) -> BaseTokenizer:
    """Load a tokenizer without a torchtitan config (inference, evaluation, data preparation).

    ``path``: ``None``/empty for the shipped LLaMA-2 tokenizer, or a directory or file as in
    :func:`resolve_tokenizer_file`.
    """
    return _open(resolve_tokenizer_file(path))


def build_tokenizer(job_config: JobConfig) -> BaseTokenizer:
    """torchtitan ``build_tokenizer_fn``: the tokenizer named by ``[model] hf_assets_path``."""
    return _open(resolve_tokenizer_file(job_config.model.hf_assets_path, field="model.hf_assets_path"))


def _open(file: Path) -> BaseTokenizer:
    if file.suffix == ".json":
        tokenizer: BaseTokenizer = JsonTokenizer(file)
    elif file.suffix == ".model":
        tokenizer = SentencePieceTokenizer(file)
    else:
        raise ValueError(
            f"Tokenizer file {str(file)!r}: expected a .model (SentencePiece) or .json (HF tokenizers) file"
        )
    logger.info(f"Loaded {tokenizer!r}")
    return tokenizer


def _valid_id(token_id: int) -> int | None:
    """SentencePiece reports a missing special token as -1."""
    return token_id if token_id >= 0 else None
