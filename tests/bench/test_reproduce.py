"""bench/reproduce.py --scale tiny: the whole reproduction pipeline on the debug model, end to end on CPU.

Pretraining (joint training) and adaptation through run_train.sh, ratplus-export, held-out loss, NIAH, the
JSON with every field, the plot and the README section. Numbers are checked against what the JSON itself
records (the held-out rows against the summary; KV rows against S + W + ceil(T / D) by hand).
"""

import json
import math

import pytest

from bench import reproduce

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    assert reproduce.main(["--scale", "tiny", "--out", str(out), "--work", str(work), "--workers", "1", "--progress-s", "60"]) == 0
    (path,) = out.glob("reproduce_*.json")
    assert path.with_suffix(".png").stat().st_size > 10_000
    return json.loads(path.read_text())


def test_every_stage_is_recorded(result):
    scale = reproduce.SCALES["tiny"]
    assert {"env", "config", "models", "training", "heldout", "summary", "niah", "timing"} <= result.keys()
    assert {"device", "torch", "date", "triton"} <= result["env"].keys()
    assert result["config"]["pretrain_tokens"] == scale.pretrain_steps * scale.batch * (scale.seq_len + 1)
    assert result["config"]["adapt_tokens"] == scale.adapt_steps * scale.batch * (scale.seq_len + 1)
    assert {"data_s", "pretrain_s", "adapt_s", "evaluate_s", "niah_s", "total_s"} <= result["timing"].keys()
    for model in reproduce.MODELS:
        assert result["models"][model]["params"] > 0 and result["models"][model]["flops_per_token_joint"] > 0
    runs = {f"pretrain_{m}" for m in reproduce.MODELS} | {f"adapt_{m}_{p}" for m in reproduce.MODELS for p in scale.patterns}
    assert result["training"].keys() == runs
    for name, curve in result["training"].items():
        steps = scale.pretrain_steps if name.startswith("pretrain") else scale.adapt_steps
        assert curve["step"] == list(range(1, steps + 1))
        assert all(math.isfinite(v) for v in curve["loss"])
        # joint training logs the sparse phase's loss at every step of pretraining, and only there
        assert all((v is not None) == name.startswith("pretrain") for v in curve["loss_sparse"])


def test_every_model_pattern_pair_is_evaluated(result):
    scale = reproduce.SCALES["tiny"]
    specs = result["config"]["specs"]
    expected = {(m, "pretrained", label) for m in reproduce.MODELS for label in specs}
    expected |= {(m, f"adapted_{p}", label) for m in reproduce.MODELS for p in scale.patterns for label in (p, "dense")}
    rows = {(r["model"], r["checkpoint"], r["pattern"]): r for r in result["heldout"]}
    assert rows.keys() == expected and len(result["heldout"]) == len(expected)
    for (_, _, label), row in rows.items():
        assert "error" not in row, row
        assert row["spec"] == specs[label]
        assert row["tokens"] == scale.eval_windows * scale.seq_len
        assert math.isfinite(row["loss"]) and row["perplexity"] == pytest.approx(math.exp(row["loss"]))
        assert set(row["by_position"]) == {f"0-{scale.seq_len}"}  # T=256: one bucket
    # KV rows: dense reads T; d<D>w<W>s<S> reads S + W + ceil(T/D); top-k the same budget as the first pattern
    assert rows[("ratplus", "pretrained", "dense")]["kv_rows"] == scale.seq_len
    assert rows[("ratplus", "pretrained", "d4w16s2")]["kv_rows"] == 2 + 16 + math.ceil(scale.seq_len / 4)
    assert rows[("ratplus", "pretrained", "d16w16s2")]["kv_rows"] == 2 + 16 + math.ceil(scale.seq_len / 16)
    assert rows[("ratplus", "pretrained", "w16s2")]["kv_rows"] == 2 + 16
    for score in ("ratplus", "quest", "moba"):
        assert rows[("attention", "pretrained", f"topk-{score}")]["kv_rows"] == rows[("ratplus", "pretrained", "d4w16s2")]["kv_rows"]


def test_summary_follows_the_rows(result):
    rows = {(r["model"], r["checkpoint"], r["pattern"]): r["loss"] for r in result["heldout"]}
    for model in reproduce.MODELS:
        dense = rows[(model, "pretrained", "dense")]
        for p in reproduce.SCALES["tiny"].patterns:
            got = result["summary"][model][p]
            assert got["adapted"] == rows[(model, f"adapted_{p}", p)]
            assert got["adapted_gap_pct"] == pytest.approx(100 * (got["adapted"] - dense) / dense)
    assert set(result["summary"]["expected_ordering"]) == {"w16s2"}
    assert len(result["summary"]["expected_ordering"]["w16s2"]) == 3


def test_niah_and_readme_section(result, tmp_path):
    assert len(result["niah"]) == 4
    for row in result["niah"]:
        assert "error" not in row and 0 <= row["score"] <= 100
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{reproduce.README_BEGIN}\nold\n{reproduce.README_END}\ntail\n")
    reproduce.write_readme(result, "reproduce_cpu.json", readme)
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{reproduce.README_END}\ntail\n")
    assert "| `d4w16s2` |" in text and "NIAH single needle" in text
