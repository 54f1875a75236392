"""Dataloader builders: packing against an independent concatenation, sharding, every source,
checkpoint/resume, and the config errors."""

import gzip
import json
import logging
from itertools import islice
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchtitan.config import JobConfig

from ratplus_titan.config import RATPlus
from ratplus_titan.data import BUNDLED_CORPUS, build_dataloader, build_validation_dataloader, load_tokenizer
from ratplus_titan.data.dataset import Validator, build_validator
from tests.data.test_order import reference_stream


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def val_docs() -> list[str]:
    with gzip.open(BUNDLED_CORPUS["validation"], "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _job(
    dataset: str, path=None, seq_len: int = 32, batch: int = 2, section: str = "training", order: str | None = None, seed: int = 0
) -> JobConfig:
    """A job config; ``order``: give it a ``[ratplus]`` section with that data_order and data_seed."""
    job = JobConfig()
    cfg = getattr(job, section)
    cfg.dataset, cfg.dataset_path, cfg.seq_len, cfg.local_batch_size = dataset, path and str(path), seq_len, batch
    if order is not None:
        job.ratplus = RATPlus(data_order=order, data_seed=seed)
    return job


def _windows(tok, texts, seq_len: int) -> torch.Tensor:
    """The reference: all documents as bos+ids+eos, concatenated, cut into seq_len+1 windows."""
    stream = [t for text in texts for t in tok.encode(text, add_bos=True, add_eos=True)]
    n = len(stream) // (seq_len + 1)
    return torch.tensor(stream[: n * (seq_len + 1)]).view(n, seq_len + 1)


def _rows(batches) -> torch.Tensor:
    """Rebuild the seq_len+1 windows from (input, label) batches, checking the label shift."""
    rows = []
    for x, y in batches:
        x = x["input"]
        assert x.dtype == y.dtype == torch.long and x.shape == y.shape
        assert torch.equal(y[:, :-1], x[:, 1:])
        rows.append(torch.cat([x, y[:, -1:]], dim=1))
    return torch.cat(rows)


def _take(loader, n: int) -> list:
    return list(islice(iter(loader), n))


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"text": text, "id": i}) + "\n")
    return path


def test_bundled_batches_are_the_packed_corpus(tok):
    with gzip.open(BUNDLED_CORPUS["train"], "rt", encoding="utf-8") as f:
        first_docs = [json.loads(line)["text"] for line in islice(f, 10)]
    loader = build_dataloader(1, 0, tok, _job("bundled", seq_len=64, batch=4))
    batches = _take(loader, 3)
    assert batches[0][0]["input"].shape == (4, 64) and batches[0][1].shape == (4, 64)
    expected = _windows(tok, first_docs, 64)[:12]
    assert len(expected) == 12, "the first 10 documents should cover 12 windows"
    assert torch.equal(_rows(batches), expected)


def test_validation_loader_reads_held_out_split_and_ends(tok, val_docs):
    loader = build_validation_dataloader(1, 0, tok, _job("bundled", seq_len=256, batch=8, section="validation"))
    assert torch.equal(_rows(list(loader)), _windows(tok, val_docs, 256))  # finite: all windows, then stop


def test_two_ranks_see_disjoint_documents(tok, tmp_path, val_docs):
    path = _write_jsonl(tmp_path / "docs.jsonl", val_docs)
    loaders = [build_dataloader(2, rank, tok, _job("local", path), infinite=False) for rank in (0, 1)]
    shards = [[s["text"] for s in loader.dataset.docs] for loader in loaders]
    assert sorted(shards[0] + shards[1]) == sorted(val_docs)
    assert not set(shards[0]) & set(shards[1]) and abs(len(shards[0]) - len(shards[1])) <= 1
    for loader, shard in zip(loaders, shards):
        assert torch.equal(_rows(list(loader)), _windows(tok, shard, 32))


@pytest.mark.parametrize("kind", ["txt", "jsonl", "jsonl.gz", "parquet"])
def test_local_formats(tok, tmp_path, val_docs, kind):
    texts = val_docs[:6]
    for i, chunk in enumerate((texts[:3], texts[3:])):  # two files, read in sorted order
        file = tmp_path / "data" / f"part{i}.{kind}"
        file.parent.mkdir(exist_ok=True)
        if kind == "parquet":
            pq.write_table(pa.table({"text": chunk, "n": list(range(len(chunk)))}), file)
        elif kind == "txt":  # a .txt file is one document
            file.write_text("\n\n".join(chunk), encoding="utf-8")
        else:
            _write_jsonl(file, chunk)
    expected_docs = ["\n\n".join(texts[:3]), "\n\n".join(texts[3:])] if kind == "txt" else texts
    for path in (tmp_path / "data", tmp_path / "data" / f"*.{kind}"):  # directory and glob
        rows = _rows(list(build_dataloader(1, 0, tok, _job("local", path), infinite=False)))
        assert torch.equal(rows, _windows(tok, expected_docs, 32))


def _write_bin(path: Path, n: int, seed: int) -> np.ndarray:
    tokens = np.random.default_rng(seed).integers(0, 32000, size=n, dtype=np.uint16)
    tokens.tofile(path)
    return tokens


def _slices(files: list[np.ndarray], window: int) -> list[np.ndarray]:
    """The reference windows: each file cut by hand into whole windows, files in order."""
    return [f[i * window : (i + 1) * window] for f in files for i in range(len(f) // window)]


def _interleave(rank_rows: list[torch.Tensor]) -> torch.Tensor:
    """Rows of W ranks (rank r's j-th row is global position j * W + r) in global order."""
    return torch.stack(rank_rows, dim=1).flatten(0, 1)


def test_bin_file_order_is_memmap_slices_in_file_order(tok, tmp_path):
    files = [_write_bin(tmp_path / "a.bin", 1000, 0), _write_bin(tmp_path / "b.bin", 500, 1)]  # 62 + 31 windows
    windows = _slices(files, 16)
    seen = []
    for rank in (0, 1):
        job = _job("bin", tmp_path, seq_len=15, batch=5, order="file")
        loader = build_dataloader(2, rank, tok, job, infinite=False)
        for _ in range(2):  # a finite loader reads the same windows on every pass
            rows = _rows(list(loader))
            assert len(rows) == 93 // 2  # equal shares, the odd window left out
            assert torch.equal(rows, torch.from_numpy(np.stack(windows[rank:92:2]).astype(np.int64)))
        seen.append({tuple(r.tolist()) for r in rows})
    assert not seen[0] & seen[1]
    infinite = _rows(_take(build_dataloader(1, 0, tok, _job("bin", tmp_path, seq_len=15, batch=31, order="file")), 7))
    assert torch.equal(infinite, torch.from_numpy(np.stack(windows + windows + windows[:31]).astype(np.int64)))


@pytest.mark.parametrize(("world", "batch"), [(1, 6), (3, 2)])
def test_bin_shuffled_reads_a_fresh_permutation_of_the_windows_each_epoch(tok, tmp_path, world, batch):
    files = [_write_bin(tmp_path / "a.bin", 1000, 2), _write_bin(tmp_path / "b.bin", 500, 3)]  # 62 + 31 windows
    windows = torch.from_numpy(np.stack(_slices(files, 16)).astype(np.int64))
    job = _job("bin", tmp_path, seq_len=15, batch=batch, order="shuffled", seed=5)
    steps = 3 * 93 // (world * batch) + 1  # into a fourth epoch
    per_rank = [_rows(_take(build_dataloader(world, r, tok, job), steps)) for r in range(world)]
    stream = _interleave(per_rank)
    assert torch.equal(stream, windows[reference_stream(93, "shuffled", 5, 4)[: len(stream)]])
    epochs = [stream[e * 93 : (e + 1) * 93] for e in range(3)]
    for epoch in epochs:  # every window exactly once (the rows are random, so all distinct): ranks share none
        assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, windows.tolist()))
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[0], windows)
    other_seed = _rows(_take(build_dataloader(1, 0, tok, _job("bin", tmp_path, seq_len=15, batch=6, order="shuffled", seed=6)), 3))
    assert not torch.equal(other_seed, stream[:18])


def test_bin_validation_stays_in_file_order(tok, tmp_path):
    files = [_write_bin(tmp_path / "a.bin", 1000, 4)]
    job = _job("bin", tmp_path / "a.bin", seq_len=15, batch=8, section="validation", order="shuffled", seed=1)
    rows = _rows(list(build_validation_dataloader(1, 0, tok, job)))
    assert torch.equal(rows, torch.from_numpy(np.stack(_slices(files, 16)).astype(np.int64)))


def test_fineweb_edu_streams_from_the_hub(tok, monkeypatch, val_docs):
    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False, **kwargs):
        calls.append((path, name, split, streaming))
        return datasets.Dataset.from_dict({"text": val_docs[:8], "score": [3.0] * 8}).to_iterable_dataset(num_shards=2)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = _rows(list(build_dataloader(1, 0, tok, _job("fineweb_edu"), infinite=False)))
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)]
    assert torch.equal(rows, _windows(tok, val_docs[:8], 32))
    build_dataloader(1, 0, tok, _job("fineweb_edu", "/mirror/fineweb-edu:sample-100BT"))
    build_dataloader(1, 0, tok, _job("hf:org/corpus:en"))
    build_validation_dataloader(1, 0, tok, _job("hf:org/corpus", section="validation"))
    assert calls[1:] == [
        ("/mirror/fineweb-edu", "sample-100BT", "train", True),
        ("org/corpus", "en", "train", True),
        ("org/corpus", None, "validation", True),
    ]
    with pytest.raises(ValueError, match=r"validation\.dataset.*only a train split"):
        build_validation_dataloader(1, 0, tok, _job("fineweb_edu", section="validation"))


def _resume_check(make_loader, n: int, m: int) -> None:
    loader = make_loader()
    it = iter(loader)
    list(islice(it, n))
    state = loader.state_dict()
    after = list(islice(it, m))
    resumed = make_loader()
    resumed.load_state_dict(state)
    again = list(islice(iter(resumed), m))
    assert torch.equal(_rows(after), _rows(again))


def test_resume_bundled(tok):
    _resume_check(lambda: build_dataloader(2, 1, tok, _job("bundled", seq_len=64)), n=7, m=5)


def test_resume_after_the_data_wrapped(tok, tmp_path, val_docs, caplog):
    path = _write_jsonl(tmp_path / "few.jsonl", val_docs[:4])
    n_windows = len(_windows(tok, val_docs[:4], 256))
    with caplog.at_level(logging.WARNING):
        _resume_check(lambda: build_dataloader(1, 0, tok, _job("local", path, seq_len=256, batch=1)), n_windows + 3, 4)
    assert "re-looped" in caplog.text


@pytest.mark.parametrize("order", ["shuffled", "file"])
def test_resume_bin(tok, tmp_path, order):
    _write_bin(tmp_path / "a.bin", 2000, 0)  # 125 windows: 30 steps of 3 windows on 2 ranks cross an epoch
    _resume_check(lambda: build_dataloader(2, 0, tok, _job("bin", tmp_path / "a.bin", seq_len=15, batch=3, order=order)), 30, 8)


@pytest.mark.parametrize(("world", "batch", "resumed_world", "resumed_batch"), [(2, 3, 1, 6), (1, 6, 3, 2), (3, 2, 2, 3)])
def test_resume_bin_under_another_data_parallel_degree_continues_the_global_stream(
    tok, tmp_path, world, batch, resumed_world, resumed_batch
):
    _write_bin(tmp_path / "a.bin", 1600, 0)  # 100 windows: 20 steps of 6 cross an epoch

    def loaders(w, b):
        return [build_dataloader(w, r, tok, _job("bin", tmp_path / "a.bin", seq_len=15, batch=b, seed=9)) for r in range(w)]

    uninterrupted = _interleave([_rows(_take(loader, 20)) for loader in loaders(world, batch)])
    first = loaders(world, batch)
    before = _interleave([_rows(_take(loader, 12)) for loader in first])
    states = [loader.state_dict() for loader in first]
    assert all(state == states[0] for state in states)  # the same layout-free position on every rank
    resumed = loaders(resumed_world, resumed_batch)
    for loader in resumed:
        loader.load_state_dict(states[0])
    after = _interleave([_rows(_take(loader, 8)) for loader in resumed])
    assert torch.equal(torch.cat([before, after]), uninterrupted)


def test_resume_bin_from_a_checkpoint_saved_before_data_orders(tok, tmp_path):
    """{"windows", "epoch"}: a file-order position; a shuffled run refuses it, naming the setting."""
    files = [_write_bin(tmp_path / "a.bin", 1600, 0)]
    legacy = {"global_position": {"windows": 10, "epoch": 1}}
    loader = build_dataloader(2, 1, tok, _job("bin", tmp_path, seq_len=15, batch=2, order="file"))
    loader.load_state_dict(legacy)
    windows = np.stack(_slices(files, 16))
    assert torch.equal(_rows(_take(loader, 1)), torch.from_numpy(windows[[11, 13]].astype(np.int64)))
    with pytest.raises(ValueError, match=r"ratplus\.data_order = 'file', this run has 'shuffled'.*exclude_from_loading"):
        build_dataloader(2, 1, tok, _job("bin", tmp_path, seq_len=15, batch=2)).load_state_dict(legacy)


def test_validator_sets_what_torchtitans_sets(tok, monkeypatch):
    import torchtitan.components.validate as titan_validate

    job = _job("bundled", section="validation")
    args = dict(parallel_dims=None, loss_fn=None, validation_context=None, maybe_enable_amp=None, metrics_processor=1)
    monkeypatch.setattr(titan_validate, "build_text_validation_dataloader", lambda **kw: None)
    theirs = titan_validate.Validator(job, 1, 0, tok, **args)
    ours = build_validator(job, 1, 0, tok, **args)
    assert isinstance(ours, Validator) and set(vars(ours)) == set(vars(theirs))
    assert ours.validation_dataloader.dataset.name.startswith("bundled corpus en_pd_ccby.validation")


@pytest.mark.parametrize(
    ("dataset", "path", "error", "pattern"),
    [
        ("c4", None, ValueError, r"training\.dataset = 'c4' is not supported.*\"bundled\".*\"bin\""),
        ("hf:", None, ValueError, r"training\.dataset = 'hf:'.*name the dataset"),
        ("bundled", "x.jsonl", ValueError, r"training\.dataset_path must be empty"),
        ("local", None, ValueError, r"training\.dataset_path must be set.*\.parquet"),
        ("local", "{tmp}/missing", FileNotFoundError, r"training\.dataset_path = .*missing' does not exist"),
        ("local", "{tmp}/notext.jsonl", ValueError, r"training\.dataset_path.*no string column 'text'.*'body'"),
        ("local", "{tmp}/mixed", ValueError, r"training\.dataset_path.*mixes file types"),
        ("local", "{tmp}/empty", FileNotFoundError, r"training\.dataset_path.*names no"),
        ("bin", "{tmp}/short.bin", ValueError, r"training\.dataset_path.*0 windows of training\.seq_len \+ 1 = 33"),
        ("bin", "{tmp}/odd.bin", ValueError, r"training\.dataset_path.*not a whole number of uint16"),
        ("bin", "{tmp}/big.bin", ValueError, r"training\.dataset_path: \S*big\.bin holds token id 40000 \(token 0\), outside the vocabulary of 32000"),
        ("bin", "{tmp}/late", ValueError, r"training\.dataset_path: \S*late/b\.bin holds token id 32000 \(token 1,234\), outside"),
        ("bin", "{tmp}/notes.txt", FileNotFoundError, r"training\.dataset_path.*names no \['\.bin'\]"),
    ],
)
def test_bad_config_errors(tok, tmp_path, dataset, path, error, pattern):
    (tmp_path / "notext.jsonl").write_text('{"body": "hello"}\n')
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("a")
    _write_jsonl(tmp_path / "mixed" / "b.jsonl", ["b"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("a")
    np.arange(32, dtype=np.uint16).tofile(tmp_path / "short.bin")
    (tmp_path / "odd.bin").write_bytes(b"\0" * 67)
    np.full(33, 40000, dtype=np.uint16).tofile(tmp_path / "big.bin")
    (tmp_path / "late").mkdir()  # the bad id is far from the first window, in the second file
    _write_bin(tmp_path / "late" / "a.bin", 3000, 0)
    _write_bin(tmp_path / "late" / "b.bin", 3000, 1)
    late = np.fromfile(tmp_path / "late" / "b.bin", dtype=np.uint16)
    late[1234] = 32000
    late.tofile(tmp_path / "late" / "b.bin")
    job = _job(dataset, path and path.format(tmp=tmp_path))
    with pytest.raises(error, match=pattern):
        build_dataloader(1, 0, tok, job)


def test_other_config_errors(tok):
    job = _job("bundled")
    job.training.dataloader.num_workers = 2
    with pytest.raises(ValueError, match=r"training\.dataloader\.num_workers must be 0"):
        build_dataloader(1, 0, tok, job)
    with pytest.raises(ValueError, match=r"needs a tokenizer"):
        build_dataloader(1, 0, None, _job("bundled"))
    with pytest.raises(ValueError, match=r"validation\.dataset = 'c4_validation' is not supported"):
        build_validation_dataloader(1, 0, tok, JobConfig())
    with pytest.raises(ValueError, match=r"ratplus\.data_order = 'random' is not supported; use one of 'shuffled', 'file'"):
        build_dataloader(1, 0, tok, _job("bundled", order="random"))
