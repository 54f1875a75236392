"""Training and validation data: documents → tokens → packed ``({"input": x}, y)`` batches.

The contract is torchtitan's ``build_text_dataloader``: documents are tokenized as
``bos ... eos``, concatenated, and cut into windows of ``seq_len + 1`` tokens; ``x`` is a
window without its last token, ``y`` without its first (LongTensor[B, seq_len] each). What this
module adds is the sources RAT+ trains on, chosen by ``dataset`` and ``dataset_path`` of the
``[training]`` (or ``[validation]``) section:

=========================  ==============================================================
``dataset``                ``dataset_path``
=========================  ==============================================================
``"bundled"``              empty; the small real corpus in ``ratplus_titan/assets/corpus``
``"fineweb_edu"``          empty, or ``"<hf path>[:<config>]"`` replacing
                           ``HuggingFaceFW/fineweb-edu`` (config ``sample-10BT``)
``"hf:<path>[:<config>]"`` empty, or a local copy to read instead of ``<path>``
``"local"``                a ``.txt``/``.jsonl``/``.jsonl.gz``/``.parquet`` file, directory or glob
``"bin"``                  a uint16 ``.bin`` file of token ids, directory or glob (pre-tokenized)
``"sft"``                  ``.jsonl[.gz|.xz]`` ``{"prompt", "answer"}`` records, a file, directory
                           or glob: one record per row, the prompt masked from the loss (``sft.py``)
=========================  ==============================================================

Text sources are all streamed through ``datasets`` (remote or local alike), because its
``IterableDataset`` already shards across ranks (``split_dataset_by_node``) and saves its
position (``state_dict``); the packer adds only its token buffer to that, and documents come in the
source's own order. ``.bin`` data needs neither tokenizer nor ``datasets``; its training windows come in
the order ``[ratplus] data_order`` / ``data_seed`` choose (``order.py``: a fresh seeded permutation each
epoch by default), its validation windows in file order, so evaluation is the same every time.
Each config error is raised by the builder, before any model work, naming the field.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.components.validate import BaseValidator
from torchtitan.components.validate import Validator as _TitanValidator
from torchtitan.config import JobConfig
from torchtitan.config.job_config import DataLoader as DataLoaderConfig
from torchtitan.tools.logging import logger

from ratplus_titan.data.order import ItemOrder, order_config
from ratplus_titan.data.ordered import OrderedDataset
from ratplus_titan.data.token_file import open_token_file, token_windows

CORPUS_DIR = Path(__file__).resolve().parent.parent / "assets" / "corpus"
BUNDLED_CORPUS = {
    "train": CORPUS_DIR / "en_pd_ccby.train.jsonl.gz",
    "validation": CORPUS_DIR / "en_pd_ccby.validation.jsonl.gz",
}
FINEWEB_EDU = ("HuggingFaceFW/fineweb-edu", "sample-10BT")
DATASET_CHOICES = ('"bundled"', '"fineweb_edu"', '"hf:<name>[:<config>]"', '"local"', '"bin"', '"sft"')
TEXT_SUFFIXES = {".txt": "text", ".jsonl": "json", ".jsonl.gz": "json", ".parquet": "parquet"}
"""Local text file suffix → ``datasets`` builder. A ``.txt`` file is one document."""


@dataclass(frozen=True)
class DataSection:
    """What one config section (``[training]`` or ``[validation]``) tells the data builder."""

    name: str  # "training" or "validation": the prefix of the fields in error messages
    dataset: str
    dataset_path: str | None
    seq_len: int
    batch_size: int
    split: str  # the split read from bundled/HF sources
    loader: DataLoaderConfig
    order: str = "file"  # the order of .bin windows (ItemOrder): [ratplus] data_order for training, else "file"
    seed: int = 0  # its seed: [ratplus] data_seed

    @classmethod
    def of(cls, job_config: JobConfig, name: str) -> DataSection:
        section = getattr(job_config, name)
        order, seed = order_config(job_config) if name == "training" else ("file", 0)  # checks the values
        return cls(
            name=name,
            dataset=section.dataset,
            dataset_path=section.dataset_path,
            seq_len=section.seq_len,
            batch_size=section.local_batch_size,
            split="train" if name == "training" else "validation",
            loader=section.dataloader,
            order=order,
            seed=seed,
        )

    def field(self, key: str) -> str:
        return f"{self.name}.{key}"


class PackedTextDataset(IterableDataset, Stateful):
    """Tokenize documents, concatenate them as ``bos doc eos bos doc eos ...`` and yield
    ``seq_len + 1`` windows split into ``({"input": x}, y)``; leftovers carry into the next
    window. ``docs`` is this rank's shard of a streaming ``datasets.IterableDataset``.
    """

    def __init__(
        self, docs: datasets.IterableDataset, tokenizer: BaseTokenizer, seq_len: int, name: str, infinite: bool
    ) -> None:
        self.docs = docs
        self._tokenizer = tokenizer
        self.seq_len = seq_len
        self.name = name
        self.infinite = infinite
        self._buffer: list[int] = []  # tokens of the stream not yet yielded

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        window = self.seq_len + 1
        empty_passes = 0
        while True:
            n_docs = 0
            for sample in self.docs:
                self._buffer.extend(self._tokenizer.encode(_text_of(sample, self.name), add_bos=True, add_eos=True))
                n_docs += 1
                while len(self._buffer) >= window:
                    x = torch.tensor(self._buffer[:window], dtype=torch.long)
                    del self._buffer[:window]
                    yield {"input": x[:-1]}, x[1:]
            if not self.infinite:
                logger.warning(f"Dataset {self.name} has run out of data")
                return
            # A pass resumed at the very end is legitimately empty; two in a row means no data.
            empty_passes = empty_passes + 1 if n_docs == 0 else 0
            if empty_passes >= 2:
                raise RuntimeError(f"Dataset {self.name} yields no documents on this data-parallel rank")
            logger.warning(f"Dataset {self.name} is being re-looped (epoch {self.docs.epoch + 1})")
            # A new epoch also stops `datasets` from re-applying a resumed position.
            self.docs.set_epoch(self.docs.epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"token_buffer": list(self._buffer), "docs": self.docs.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._buffer = list(state_dict["token_buffer"])
        # `datasets` applies a saved position only while the epoch matches the saved one.
        self.docs.set_epoch(state_dict["docs"]["epoch"])
        self.docs.load_state_dict(state_dict["docs"])


class TokenWindowDataset(OrderedDataset):
    """Contiguous ``seq_len + 1`` windows of pre-tokenized uint16 token arrays (memory-mapped ``.bin`` files).

    Windows do not overlap and never cross a file boundary. The ``n`` windows of all files are numbered
    in file order, and read in the order of an :class:`ItemOrder` (``order``, ``seed``): as one global
    stream, epoch after epoch, of which rank ``r`` of ``W`` reads positions ``r, r + W, ...``, so ranks
    never share a window within an epoch. Infinite: the stream goes on (a fresh permutation each epoch
    when shuffled). Finite: one pass over epoch 0, ``n // W`` windows per rank, from the start each time.
    """

    def __init__(
        self,
        tokens: list[np.ndarray],
        seq_len: int,
        dp_rank: int,
        dp_world_size: int,
        name: str,
        infinite: bool,
        order: str = "file",
        seed: int = 0,
    ) -> None:
        self.seq_len = seq_len
        self.name = name
        self.infinite = infinite
        self._windows = [token_windows(t, seq_len) for t in tokens]  # per file: [n_f, seq_len + 1] views
        self._first = np.cumsum([0, *map(len, self._windows)])  # global index of each file's first window
        self.n_windows = int(self._first[-1])
        self.order = ItemOrder(self.n_windows, dp_rank, dp_world_size, order, seed)

    def window(self, index: int) -> np.ndarray:
        """Window ``index`` (numbered in file order) as a view into its file."""
        f = int(np.searchsorted(self._first, index, side="right")) - 1
        return self._windows[f][index - int(self._first[f])]

    def sample(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        x = torch.from_numpy(self.window(index).astype(np.int64))
        return {"input": x[:-1]}, x[1:]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "order" not in state_dict:  # saved before data orders existed: {"windows": n, "epoch": e}, file order
            state_dict = {"order": "file", "seed": 0, "items": None, "epoch": state_dict["epoch"],
                          "position": state_dict["windows"]}  # fmt: skip
        super().load_state_dict(state_dict)


class ReshardableDataloader(ParallelAwareDataloader):
    """Saves the ``.bin`` data position as a global window count, so a checkpoint resumes under
    any data-parallel degree (e.g. saved with FSDP over 2 ranks, resumed with TP=2 on 1 dp rank).

    Rank r of W reads positions r, r + W, ... of one global stream: after n steps of b windows per
    rank, the next global position is n * b * W whatever the layout, as long as the global batch is the same.
    """

    def state_dict(self) -> dict[str, Any]:
        return {"global_position": self.dataset.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self.dataset.load_state_dict(state_dict["global_position"])


class TextDataloader(ParallelAwareDataloader):
    """torchtitan's per-rank data state, with a clear error when the data-parallel degree changed."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict and state_dict.get("world_size") != self.dp_world_size:
            raise ValueError(
                f"the checkpoint's data position was saved with {state_dict.get('world_size')} data-parallel ranks, "
                f"this run has {self.dp_world_size}: a text dataset's position cannot be resharded. Resume with the "
                "same data-parallel degree, use a pre-tokenized training.dataset = 'bin' (reshardable), or pass "
                "--checkpoint.exclude_from_loading dataloader (the data stream then restarts)"
            )
        super().load_state_dict(state_dict)


def build_dataloader(
    dp_world_size: int, dp_rank: int, tokenizer: BaseTokenizer | None, job_config: JobConfig, infinite: bool = True
) -> ParallelAwareDataloader:
    """torchtitan ``build_dataloader_fn``: batches from ``[training] dataset`` / ``dataset_path``."""
    section = DataSection.of(job_config, "training")
    return _loader(section, tokenizer, dp_rank, dp_world_size, infinite)


def build_validation_dataloader(
    dp_world_size: int, dp_rank: int, tokenizer: BaseTokenizer | None, job_config: JobConfig, infinite: bool = False
) -> ParallelAwareDataloader:
    """Batches from ``[validation] dataset`` / ``dataset_path`` (``"bundled"``: the held-out split)."""
    section = DataSection.of(job_config, "validation")
    return _loader(section, tokenizer, dp_rank, dp_world_size, infinite)


def build_dataset(
    section: DataSection, tokenizer: BaseTokenizer | None, dp_rank: int, dp_world_size: int, infinite: bool
) -> PackedTextDataset | TokenWindowDataset:
    """This rank's dataset for one config section; raises on any config error, before reading data."""
    if section.seq_len < 1:
        raise ValueError(f"{section.field('seq_len')} must be positive, got {section.seq_len}")
    if section.dataset.strip().lower() == "bin":
        return _open_bin(section, tokenizer, dp_rank, dp_world_size, infinite)
    if section.dataset.strip().lower() == "sft":
        from ratplus_titan.data.sft import build_sft_dataset

        return build_sft_dataset(section, tokenizer, dp_rank, dp_world_size, infinite)
    docs, where = _open_text(section)
    if tokenizer is None:
        raise ValueError(
            f"{section.field('dataset')} = {section.dataset!r} is text and needs a tokenizer "
            f'(the train spec has no build_tokenizer_fn); only "bin" data needs none'
        )
    logger.info(f"{section.name} data: {where}, rank {dp_rank} of {dp_world_size}")
    shard = split_dataset_by_node(docs, rank=dp_rank, world_size=dp_world_size)
    return PackedTextDataset(shard, tokenizer, section.seq_len, name=where, infinite=infinite)


def _loader(
    section: DataSection, tokenizer: BaseTokenizer | None, dp_rank: int, dp_world_size: int, infinite: bool
) -> ParallelAwareDataloader:
    if section.loader.num_workers != 0:
        # Worker processes would each need their own shard and position; not implemented.
        raise ValueError(
            f"{section.field('dataloader.num_workers')} must be 0 for ratplus_titan data "
            f"(got {section.loader.num_workers})"
        )
    dataset = build_dataset(section, tokenizer, dp_rank, dp_world_size, infinite)
    kwargs = {**asdict(section.loader), "batch_size": section.batch_size}
    # datasets read in an ItemOrder (.bin windows, SFT records) save a layout-free position
    loader_cls = ReshardableDataloader if isinstance(getattr(dataset, "order", None), ItemOrder) else TextDataloader
    return loader_cls(dataset, dp_rank=dp_rank, dp_world_size=dp_world_size, **kwargs)


def _open_text(section: DataSection) -> tuple[datasets.IterableDataset, str]:
    """The whole (unsharded) streaming document source of a text ``dataset``, checked to
    have a ``text`` column, and a short description of it for logs."""
    kind, path_field = section.dataset.strip(), section.field("dataset_path")
    if kind.lower() == "bundled":
        if section.dataset_path:
            raise ValueError(
                f'{path_field} must be empty for {section.field("dataset")} = "bundled" '
                f'(got {section.dataset_path!r}); use dataset = "local" to read your own files'
            )
        file = BUNDLED_CORPUS[section.split]
        where = f"bundled corpus {file.name}"
        docs = datasets.load_dataset("json", data_files=[str(file)], split="train", streaming=True)
    elif kind.lower() == "fineweb_edu" or kind.startswith("hf:"):
        path, config = _hf_source(section)
        where = f"HF {path}" + (f" ({config})" if config else "") + f" split {section.split}"
        docs = datasets.load_dataset(path, name=config, split=section.split, streaming=True)
    elif kind.lower() == "local":
        files = _find_files(section, tuple(TEXT_SUFFIXES))
        builders = {TEXT_SUFFIXES[_suffix(f)] for f in files}
        if len(builders) > 1:
            raise ValueError(
                f"{path_field} = {section.dataset_path!r} mixes file types "
                f"{sorted({_suffix(f) for f in files})}; use one of {list(TEXT_SUFFIXES)}"
            )
        (builder,) = builders
        extra = {"sample_by": "document"} if builder == "text" else {}
        where = f"{len(files)} local {builder} file(s) from {section.dataset_path}"
        docs = datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", streaming=True, **extra
        )
    else:
        raise ValueError(
            f"{section.field('dataset')} = {section.dataset!r} is not supported; "
            f"use one of {', '.join(DATASET_CHOICES)}"
        )
    _check_text_column(docs, section, where)
    return docs, where


def _hf_source(section: DataSection) -> tuple[str, str | None]:
    """(path, config) for ``load_dataset``; ``dataset_path`` replaces the dataset's path."""
    kind = section.dataset.strip()
    if kind.lower() == "fineweb_edu":
        if section.split != "train":
            raise ValueError(
                f'{section.field("dataset")} = "fineweb_edu" has only a train split; '
                f'validate on "bundled" or an "hf:<name>[:<config>]" dataset with a validation split'
            )
        path, config = FINEWEB_EDU
    else:
        name = kind[len("hf:") :]
        if not name:
            raise ValueError(f'{section.field("dataset")} = {section.dataset!r}: name the dataset, e.g. "hf:org/name"')
        path, _, config = name.partition(":")
    if section.dataset_path:
        override, sep, override_config = section.dataset_path.partition(":")
        path, config = override, (override_config if sep else config)
    return path, (config or None)


def _open_bin(
    section: DataSection, tokenizer: BaseTokenizer | None, dp_rank: int, dp_world_size: int, infinite: bool
) -> TokenWindowDataset:
    files, path_field, window = _find_files(section, (".bin",)), section.field("dataset_path"), section.seq_len + 1
    # ids past the vocabulary would crash the embedding lookup much later, on the GPU
    vocab = tokenizer.get_vocab_size() if tokenizer is not None else None
    tokens = [open_token_file(f, vocab, label=f"{path_field}: ") for f in files]
    n_windows = sum(len(t) // window for t in tokens)
    if n_windows < dp_world_size:
        raise ValueError(
            f"{path_field} = {section.dataset_path!r}: the .bin file(s) hold {n_windows} windows of "
            f"{section.field('seq_len')} + 1 = {window} tokens, fewer than the {dp_world_size} "
            f"data-parallel rank(s); token counts per file: { {str(f): len(t) for f, t in zip(files, tokens)} }"
        )
    name = f"{len(files)} .bin file(s) from {section.dataset_path}"
    dataset = TokenWindowDataset(
        tokens, section.seq_len, dp_rank, dp_world_size, name, infinite, section.order, section.seed
    )
    logger.info(
        f"{section.name} data: {name}, {n_windows} windows in {section.order} order, rank {dp_rank} of {dp_world_size}"
    )
    return dataset


def _find_files(section: DataSection, suffixes: tuple[str, ...]) -> list[Path]:
    """Files with one of ``suffixes`` named by ``dataset_path``: a file, a directory (searched
    recursively) or a glob pattern; sorted, so every rank sees the same order."""
    raw, path_field = section.dataset_path, section.field("dataset_path")
    if not raw:
        raise ValueError(
            f"{path_field} must be set when {section.field('dataset')} = {section.dataset!r}: "
            f"a file, directory or glob of {list(suffixes)} files"
        )
    path = Path(raw).expanduser()
    if glob.has_magic(raw):
        candidates = sorted(Path(p) for p in glob.glob(os.path.expanduser(raw), recursive=True))
    elif path.is_dir():
        candidates = sorted(path.rglob("*"))
    elif path.is_file():
        candidates = [path]
    else:
        raise FileNotFoundError(f"{path_field} = {raw!r} does not exist")
    files = [f for f in candidates if f.is_file() and _suffix(f) in suffixes]
    if not files:
        raise FileNotFoundError(
            f"{path_field} = {raw!r} names no {list(suffixes)} files "
            f"(for {section.field('dataset')} = {section.dataset!r})"
        )
    return files


def _check_text_column(docs: datasets.IterableDataset, section: DataSection, where: str) -> None:
    try:
        first = next(iter(docs))
    except StopIteration:
        raise ValueError(f"{section.field('dataset')} = {section.dataset!r}: {where} holds no documents") from None
    if not isinstance(first.get("text"), str):
        raise ValueError(
            f"{section.field('dataset')} = {section.dataset!r}, {section.field('dataset_path')} = "
            f"{section.dataset_path!r}: {where} has no string column 'text' (columns: {sorted(first)})"
        )


def _text_of(sample: dict[str, Any], name: str) -> str:
    text = sample.get("text")
    if not isinstance(text, str):
        raise ValueError(f"Dataset {name}: a document without a string 'text' field (keys: {sorted(sample)})")
    return text


def _suffix(path: Path) -> str:
    return next((s for s in (".jsonl.gz", ".jsonl.xz") if path.name.endswith(s)), path.suffix)


class Validator(_TitanValidator):
    """torchtitan's ``Validator`` reading ``[validation]`` through :func:`build_validation_dataloader`.

    torchtitan's ``__init__`` builds its own loader, which knows only its c4 datasets, so this one
    sets the same attributes itself; ``validate`` is inherited unchanged.
    """

    def __init__(
        self,
        job_config: JobConfig,
        dp_world_size: int,
        dp_rank: int,
        tokenizer: BaseTokenizer | None,
        parallel_dims: Any,
        loss_fn: Any,
        validation_context: Any,
        maybe_enable_amp: Any,
        metrics_processor: Any,
        pp_schedule: Any = None,
        pp_has_first_stage: bool | None = None,
        pp_has_last_stage: bool | None = None,
    ) -> None:
        BaseValidator.__init__(self, job_config)
        self.tokenizer = tokenizer
        self.parallel_dims = parallel_dims
        self.loss_fn = loss_fn
        self.validation_dataloader = build_validation_dataloader(
            dp_world_size, dp_rank, tokenizer, job_config, infinite=job_config.validation.steps != -1
        )
        self.validation_context = validation_context
        self.maybe_enable_amp = maybe_enable_amp
        self.metrics_processor = metrics_processor
        self.pp_schedule = pp_schedule
        self.pp_has_first_stage = pp_has_first_stage
        self.pp_has_last_stage = pp_has_last_stage
        if job_config.validation.steps == -1:
            logger.warning("validation.steps = -1 may hang when ranks hold different amounts of validation data")

    def post_dataloading_process(self, input_dict, labels, model_parts):
        """RAT+ builds its attention pattern itself: no attention masks to pass (torchtitan asks the model)."""
        return input_dict["input"], labels, {k: v for k, v in input_dict.items() if k != "input"}, {}


def build_validator(
    job_config: JobConfig,
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer | None,
    parallel_dims: Any,
    loss_fn: Any,
    validation_context: Any,
    maybe_enable_amp: Any,
    metrics_processor: Any = None,
    pp_schedule: Any = None,
    pp_has_first_stage: bool | None = None,
    pp_has_last_stage: bool | None = None,
) -> Validator:
    """torchtitan ``build_validator_fn`` (same signature as torchtitan's) for our data sources."""
    if metrics_processor is None:
        raise ValueError("build_validator needs the trainer's metrics_processor")
    return Validator(
        job_config,
        dp_world_size,
        dp_rank,
        tokenizer,
        parallel_dims,
        loss_fn,
        validation_context,
        maybe_enable_amp,
        metrics_processor,
        pp_schedule,
        pp_has_first_stage,
        pp_has_last_stage,
    )
