"""Tokenizer and data builders for the RAT+ train spec (and a plain tokenizer loader for
inference and evaluation)."""

from ratplus_titan.data.dataset import (
    BUNDLED_CORPUS,
    PackedTextDataset,
    TokenWindowDataset,
    Validator,
    build_dataloader,
    build_validation_dataloader,
    build_validator,
)
from ratplus_titan.data.order import ItemOrder, order_config
from ratplus_titan.data.token_file import open_token_file, token_windows
from ratplus_titan.data.tokenizer import (
    DEFAULT_TOKENIZER,
    JsonTokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
    load_tokenizer,
)

__all__ = [
    "BUNDLED_CORPUS",
    "DEFAULT_TOKENIZER",
    "ItemOrder",
    "JsonTokenizer",
    "PackedTextDataset",
    "SentencePieceTokenizer",
    "TokenWindowDataset",
    "Validator",
    "build_dataloader",
    "build_tokenizer",
    "build_validation_dataloader",
    "build_validator",
    "load_tokenizer",
    "open_token_file",
    "order_config",
    "token_windows",
]
