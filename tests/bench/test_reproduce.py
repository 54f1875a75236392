"""bench.reproduce --scale tiny: the whole reproduction pipeline on the debug model, end to end on CPU.

Pretraining of three models (shuffled .bin windows, joint training or not), adaptation, NIAH fine-tuning
through run_train.sh, ratplus-export, NIAH evaluation and held-out loss, the JSON with every field, the
plot and the README section. Numbers are checked against what the JSON itself records and against counts
computed here by hand; the stage keys are checked without training.
"""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import reproduce
from bench.reproduce import pipeline, report
from bench.reproduce.main import DILATED_FORM, build_parser, chosen_scale
from bench.reproduce.stages import StageClock, TrainRun, export_all, stage_dir

TINY = reproduce.SCALES["tiny"]


def fake_data(tmp_path):
    return {
        "files": {
            "pretrain": str(tmp_path / "p.bin"),
            "adapt": str(tmp_path / "a.bin"),
            "niah_train": str(tmp_path / "n.jsonl"),
        }
    }


def plan(tmp_path, scale):
    data = fake_data(tmp_path)
    pretrained = pipeline.pretrain_runs(tmp_path, scale, data)
    adapted = pipeline.adapt_runs(tmp_path, scale, data, pretrained)
    tuned = pipeline.sft_runs(tmp_path, scale, data, pretrained, adapted)
    return pretrained, adapted, tuned


def test_a_changed_setting_redoes_its_stage_and_everything_after_it(tmp_path):
    base = plan(tmp_path, TINY)
    same = plan(tmp_path, TINY)
    assert [{k: r.dump for k, r in stage.items()} for stage in base] == [
        {k: r.dump for k, r in stage.items()} for stage in same
    ]
    pretrained, adapted, tuned = plan(tmp_path, replace(TINY, adapt_lr=1e-2))
    assert {k: r.dump for k, r in pretrained.items()} == {k: r.dump for k, r in base[0].items()}  # reused
    assert all(adapted[k].dump != base[1][k].dump for k in adapted)  # new adaptation under the new lr
    for (model, spec), run in tuned.items():  # fine-tuning from an adapted checkpoint follows it; dense does not
        assert (run.dump != base[2][(model, spec)].dump) == (spec != pipeline.DENSE)
    changed = plan(tmp_path, replace(TINY, pretrain_steps=TINY.pretrain_steps + 1))
    assert all(changed[0][k].dump != base[0][k].dump for k in changed[0])
    assert all(r.dump != base[2][k].dump for k, r in changed[2].items())
    # every run's folder records the settings it was keyed by
    settings = json.loads((tuned[("ratplus", TINY.patterns[0])].dump / "settings.json").read_text())
    assert "--training.dataset" in settings["args"] and any("$WORK" in a for a in settings["args"])


def scale_of(*flags: str) -> reproduce.Scale:
    """The scale ``python -m bench.reproduce --scale tiny FLAGS`` runs."""
    parser = build_parser()
    return chosen_scale(parser, parser.parse_args(["--scale", "tiny", *flags]))


def dumps(runs: dict) -> dict:
    return {key: run.dump for key, run in runs.items()}


def test_joint_dilation_rekeys_the_joint_pretraining_and_what_follows_it(tmp_path):
    base = plan(tmp_path, TINY)
    scale = scale_of("--joint-dilation", "8")
    assert scale == replace(TINY, joint_dilation=8)
    pretrained, adapted, tuned = plan(tmp_path, scale)
    args = pretrained["ratplus"].args
    assert args[args.index("--ratplus.joint_dilation") + 1] == "8"
    for stage, old in zip((pretrained, adapted, tuned), base):  # attention without joint training never sees D
        for key, run in stage.items():
            model = key if isinstance(key, str) else key[0]
            assert (run.dump != old[key].dump) == reproduce.MODELS[model].joint_train, key


def test_patterns_rekey_the_adaptation_to_a_changed_pattern_alone(tmp_path):
    first, second = TINY.patterns
    base = plan(tmp_path, TINY)
    scale = scale_of("--patterns", f"{first},d8w16s2")
    assert scale.patterns == (first, "d8w16s2")
    pretrained, adapted, tuned = plan(tmp_path, scale)
    assert dumps(pretrained) == dumps(base[0])  # the first pattern's window sets the data: unchanged
    old = set(dumps(base[1]).values()) | set(dumps(base[2]).values())
    for model in reproduce.MODELS:
        assert adapted[(model, first)].dump == base[1][(model, first)].dump
        assert tuned[(model, first)].dump == base[2][(model, first)].dump
        assert tuned[(model, pipeline.DENSE)].dump == base[2][(model, pipeline.DENSE)].dump
        assert adapted[(model, "d8w16s2")].dump not in old and tuned[(model, "d8w16s2")].dump not in old
        a = adapted[(model, "d8w16s2")].args
        assert a[a.index("--ratplus.dilation") + 1] == "8"
    assert (model, second) not in adapted


def test_patterns_given_as_the_scale_has_them_keep_every_key(tmp_path):
    """The flag's value is the field's tuple in its canonical spelling, so it keys the stages as the scale does."""
    scale = scale_of("--patterns", " d04w16s2 , d16w16s2")
    assert scale == TINY and isinstance(scale.patterns, tuple)
    assert [dumps(stage) for stage in plan(tmp_path, scale)] == [dumps(stage) for stage in plan(tmp_path, TINY)]


def test_topk_takes_the_first_given_patterns_block_and_kv_budget():
    from ratplus_titan.cli import parse_patterns
    from ratplus_titan.eval.perplexity import pattern_rows
    from ratplus_titan.pattern import Pattern

    scale = scale_of("--patterns", "d8w32s3,d4w16s2")
    specs = pipeline.sparse_specs(scale)
    assert list(specs) == ["dense", "window", "d8w32s3", "d4w16s2", "topk-ratplus", "topk-quest", "topk-moba"]
    assert specs["window"] == "d-1w32s3" and pipeline.local_window(scale) == 32
    rows = Pattern.parse("d8w32s3").cache_rows(TINY.seq_len)  # 3 + 32 + 256 / 8 = 67
    for score in ("ratplus", "quest", "moba"):
        spec = specs[f"topk-{score}"]
        assert spec.startswith("topk8k") and spec.endswith(f"s3-{score}")
        assert rows - 8 < pattern_rows(parse_patterns(spec)[0], TINY.seq_len) <= rows  # the same budget, in blocks of 8


def test_niah_plan_evaluates_top_k_on_the_dense_and_the_first_pattern_fine_tuned_models():
    scale = scale_of("--patterns", "d8w32s3,d4w16s2")
    topk = ["topk-ratplus", "topk-quest", "topk-moba"]
    for model in scale.models:
        rows = [(t, p) for m, t, p in pipeline.niah_plan(scale) if m == model]
        assert rows == [("dense", "dense"), ("d8w32s3", "d8w32s3"), ("d4w16s2", "d4w16s2"),
                        *[("dense", p) for p in ("window", "d8w32s3", "d4w16s2", *topk)],
                        *[("d8w32s3", p) for p in topk]]  # fmt: skip
    bare = replace(scale, sparse_runs=False)  # nothing is fine-tuned under a sparse pattern
    assert {t for _, t, _ in pipeline.niah_plan(bare)} == {"dense"}


def test_stage_clock_sums_the_calls_on_one_work_folder(tmp_path, monkeypatch):
    now = [100.0]
    monkeypatch.setattr("bench.reproduce.stages.time.monotonic", lambda: now[0])
    first = StageClock(tmp_path, "day 1")
    first.start("data")
    now[0] += 7.0
    assert first.stop() == {"data_s": 7.0, "total_s": 7.0}
    first.start("pretrain")
    now[0] += 50.0
    first.stop(cut=True)  # cut off in pretraining: its seconds stay
    second = StageClock(tmp_path, "day 2")  # a rerun reads the first call's record
    for stage, seconds in (("data", 0.5), ("pretrain", 20.0), ("adapt", 3.0)):
        second.start(stage)
        now[0] += seconds
        second.stop()
    calls = json.loads((tmp_path / "calls.json").read_text())
    assert [c["date"] for c in calls] == ["day 1", "day 2"] and calls[0]["cut_in"] == "pretrain"
    assert "cut_in" not in calls[1]
    assert second.all_calls() == {"data_s": 7.5, "pretrain_s": 70.0, "adapt_s": 3.0, "total_s": 57.0 + 23.5}


@pytest.mark.parametrize(
    "flag,value,form",
    [
        ("--joint-dilation", "1", "integers >= 2"),
        ("--joint-dilation", "two", "integers >= 2"),
        ("--patterns", "dense", DILATED_FORM),
        ("--patterns", "d1w16s2", DILATED_FORM),
        ("--patterns", "d-1w16s2", DILATED_FORM),
        ("--patterns", "d4w16s2,topk4k8s2", DILATED_FORM),
        ("--patterns", "d4w16", DILATED_FORM),
        ("--patterns", "d4w16s2,d4w16s2", "give each pattern once"),
        ("--patterns", ",", "comma-separated"),
        ("--patterns", "d4w128s2", "below the recall distance 128"),  # the window must end before the repeats
    ],
)
def test_bad_overrides_are_refused_in_one_line_naming_the_flag(flag, value, form, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--scale", "tiny", "--work", str(tmp_path / "work"), "--out", str(tmp_path), flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m bench.reproduce: error:"), err
    assert flag in err and form in err, err
    assert not (tmp_path / "work").exists()


def test_recall_text_windows_repeat_held_out_text_at_the_distance(tmp_path):
    """Every element against the definition: window n is the validation file's window k (whole windows of
    T + 1, as ``read_windows`` cuts them), its first ``distance`` tokens kept and repeated from there on."""
    T, distance = TINY.seq_len, pipeline.recall_distance(TINY)
    tokens = np.random.default_rng(5).integers(3, 32000, size=40 * (T + 1) + 7, dtype=np.uint16)
    validation = tmp_path / "validation.bin"
    tokens.tofile(validation)
    scale = replace(TINY, recall_windows=6)
    windows = pipeline.recall_text_windows(scale, validation)
    assert windows.shape == (6, T + 1)
    text = tokens[: 40 * (T + 1)].reshape(40, T + 1)
    starts = {tuple(row[:distance]): k for k, row in enumerate(text)}  # random tokens: each beginning is unique
    drawn = []
    for n, row in enumerate(windows.tolist()):
        k = starts[tuple(row[:distance])]  # the first half is a held-out window's own beginning
        drawn.append(k)
        for i in range(T + 1):
            assert row[i] == text[k, i % distance], (n, i)
        assert row[distance:] != text[k, distance:].tolist()  # the second half is the repeat, not the text
    assert drawn == sorted(set(drawn)) and drawn != list(range(6))  # distinct windows, drawn from the whole file
    assert windows.equal(pipeline.recall_text_windows(scale, validation))  # from the seed alone
    assert not windows.equal(pipeline.recall_text_windows(replace(scale, seed=1), validation))


ROUND4 = Path(__file__).resolve().parents[2] / "bench" / "results" / "reproduce_H100_r4.json"


def round4(models: tuple[str, ...], rename: dict[str, str] | None = None) -> dict:
    """Round 4's measured JSON, its rows cut to ``models`` and its pattern names changed by ``rename``."""
    text = ROUND4.read_text()
    for old, new in (rename or {}).items():
        text = text.replace(old, new)
    result = json.loads(text)
    result["config"]["models"] = list(models)
    for section in ("niah", "heldout", "recall"):
        result[section] = [row for row in result[section] if row["model"] in models]
    return result


def test_expectations_are_judged_on_the_models_and_patterns_of_the_run():
    """Round 4's JSON cut to two models and given a denser second pattern: every expectation names the run's own
    patterns, 'every model' means the models run, and a comparison with an absent model is not testable."""
    both = report.summarize(round4(("ratplus", "attention"), {"d64w256s4": "d4w256s4"}))["expected"]
    assert both == {
        "dense_at_least_90_every_model": False,  # attention 0% dense
        "attention_d16w256s4_far_below_its_dense": None,  # its dense failed
        "ratplus_d16w256s4_within_10_points_of_its_dense": False,  # 0% vs 98.3%
        "ratplus_d4w256s4_at_least_ratplus_d16w256s4": True,  # 0% >= 0%
        "topk_ratplus_score_on_ratplus_at_least_attention_best": None,
        "recall_ratplus_d16w256s4_adapted_below_attention_d16w256s4_adapted": None,
    }
    alone = report.summarize(round4(("ratplus",)))["expected"]
    assert alone["dense_at_least_90_every_model"] is True  # RAT+ 98.3% beyond the window
    assert alone["attention_d16w256s4_far_below_its_dense"] is None
    assert alone["ratplus_d64w256s4_between_ratplus_d16w256s4_and_attention_d64w256s4"] is None
    assert alone["topk_ratplus_score_on_ratplus_at_least_attention_best"] is None  # no attention model to beat


def test_stage_dir_keys_by_every_setting(tmp_path):
    a = stage_dir(tmp_path, "x", "s", {"lr": 1e-3, "steps": 2})
    assert stage_dir(tmp_path, "x", "s", {"steps": 2, "lr": 1e-3}) == a  # key order does not matter
    assert stage_dir(tmp_path, "x", "s", {"lr": 1e-2, "steps": 2}) != a
    assert stage_dir(tmp_path / "moved", "x", "s", {"lr": 1e-3, "steps": 2}).name == a.name


def test_runs_carry_each_models_flags(tmp_path):
    pretrained, adapted, tuned = plan(tmp_path, TINY)
    for name, model in reproduce.MODELS.items():
        args = pretrained[name].args
        assert args[args.index("--ratplus.apply-re") + 1] == str(model.apply_re)
        assert ("--ratplus.joint-train" in args) == model.joint_train and (
            "--ratplus.no-joint-train" in args
        ) != model.joint_train
        for spec in TINY.patterns:
            a = adapted[(name, spec)].args
            assert a[a.index("--checkpoint.initial_load_path") + 1] == str(pretrained[name].checkpoint)
            s = tuned[(name, spec)].args
            assert s[s.index("--checkpoint.initial_load_path") + 1] == str(adapted[(name, spec)].checkpoint)
            assert s[s.index("--training.dataset") + 1] == "sft"
        d = tuned[(name, pipeline.DENSE)].args
        assert d[d.index("--checkpoint.initial_load_path") + 1] == str(pretrained[name].checkpoint)
        assert d[d.index("--ratplus.dilation") + 1] == "1" and d[d.index("--ratplus.local_window") + 1] == "0"


# The tests of the tiny run share one module-scoped run (``result``), minutes on a loaded GPU machine:
# under pytest-xdist they go to one worker (``make test-gpu`` runs ``--dist loadgroup``), where each
# worker of another test would otherwise run it again, and the limit of ``make test-gpu``'s hung-test
# timeout (pytest-timeout) is raised for them, as it counts the fixture's set-up in the first test's time.
def tiny_run(test):
    return pytest.mark.xdist_group("reproduce_tiny_run")(pytest.mark.timeout(900)(test))


@pytest.fixture(scope="module")
def tiny_argv(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    return ["--scale", "tiny", "--out", str(out), "--work", str(work), "--workers", "2", "--progress-s", "60"]


@pytest.fixture(scope="module")
def result(tiny_argv):
    argv = tiny_argv
    out = Path(argv[argv.index("--out") + 1])
    assert reproduce.main(argv) == 0
    (path,) = out.glob("reproduce_*.json")
    assert path.with_suffix(".png").stat().st_size > 10_000
    return json.loads(path.read_text())


slow = pytest.mark.slow


@slow
@tiny_run
def test_every_stage_is_recorded(result, record_property):
    # make test-gpu prints this (LIVE-PROPERTY): where the suite's longest set-up spends its time
    record_property("stage_seconds", {k: round(v, 1) for k, v in result["timing"].items()})
    sections = {"env", "config", "models", "training", "heldout", "recall", "recall_text", "summary", "niah", "timing"}
    assert sections <= result.keys()
    assert {"device", "torch", "date", "triton"} <= result["env"].keys()
    window = TINY.seq_len + 1
    assert result["config"]["pretrain_tokens"] == TINY.pretrain_steps * TINY.batch * window
    assert result["config"]["adapt_tokens"] == TINY.adapt_steps * TINY.batch * window
    assert {
        "data_s",
        "pretrain_s",
        "adapt_s",
        "sft_s",
        "export_s",
        "niah_s",
        "heldout_s",
        "recall_s",
        "recall_text_s",
        "total_s",
    } <= result["timing"].keys()
    for model in reproduce.MODELS:
        assert result["models"][model]["params"] > 0 and result["models"][model]["flops_per_token"] > 0
    # joint training doubles the passes; the attention baselines differ only there
    assert result["models"]["attention_joint"]["flops_per_token"] > result["models"]["attention"]["flops_per_token"]
    patterns = (pipeline.DENSE, *TINY.patterns)
    runs = {f"pretrain_{m}" for m in reproduce.MODELS} | {
        f"adapt_{m}_{p}" for m in reproduce.MODELS for p in TINY.patterns
    }
    runs |= {f"sft_{m}_{p}" for m in reproduce.MODELS for p in patterns}
    assert result["training"].keys() == runs
    for name, curve in result["training"].items():
        steps = {"pretrain": TINY.pretrain_steps, "adapt": TINY.adapt_steps, "sft": TINY.sft_steps}[name.split("_")[0]]
        assert curve["step"] == list(range(1, steps + 1))
        assert all(math.isfinite(v) for v in curve["loss"])
        joint = name.startswith("pretrain") and reproduce.MODELS[name.removeprefix("pretrain_")].joint_train
        assert all((v is not None) == joint for v in curve["loss_sparse"])


@slow
@tiny_run
def test_every_model_pattern_pair_is_evaluated(result):
    specs = result["config"]["specs"]
    expected = {(m, "pretrained", label) for m in reproduce.MODELS for label in specs}
    expected |= {(m, f"adapted_{p}", label) for m in reproduce.MODELS for p in TINY.patterns for label in (p, "dense")}
    rows = {(r["model"], r["checkpoint"], r["pattern"]): r for r in result["heldout"]}
    assert rows.keys() == expected and len(result["heldout"]) == len(expected)
    for (_, _, label), row in rows.items():
        assert "error" not in row, row
        assert row["spec"] == specs[label]
        assert row["tokens"] == TINY.eval_windows * TINY.seq_len
        assert math.isfinite(row["loss"]) and row["perplexity"] == pytest.approx(math.exp(row["loss"]))
    # KV rows: dense reads T; d<D>w<W>s<S> reads S + W + ceil(T/D); top-k the same budget as the first pattern
    T = TINY.seq_len
    assert rows[("ratplus", "pretrained", "dense")]["kv_rows"] == T
    assert rows[("ratplus", "pretrained", "d4w16s2")]["kv_rows"] == 2 + 16 + math.ceil(T / 4)
    assert rows[("ratplus", "pretrained", "d16w16s2")]["kv_rows"] == 2 + 16 + math.ceil(T / 16)
    assert rows[("ratplus", "pretrained", "window")]["kv_rows"] == 2 + 16
    for score in ("ratplus", "quest", "moba"):
        assert (
            rows[("attention", "pretrained", f"topk-{score}")]["kv_rows"]
            == rows[("ratplus", "pretrained", "d4w16s2")]["kv_rows"]
        )


@slow
@tiny_run
@pytest.mark.parametrize("section,reference", [("recall", "guess"), ("recall_text", "first_half")])
def test_recall_rows_cover_every_pair_and_score_the_repeats(result, section, reference):
    distance, T = pipeline.recall_distance(TINY), TINY.seq_len
    assert result["config"]["recall_distance"] == distance
    keys = {(r["model"], r["checkpoint"], r["pattern"]) for r in result["heldout"]}
    rows = {(r["model"], r["checkpoint"], r["pattern"]): r for r in result[section]}
    assert rows.keys() == keys and len(result[section]) == len(keys)
    losses = result["summary"][f"{section}_loss"]
    for key, row in rows.items():
        assert "error" not in row, row
        assert row["tokens"] == TINY.recall_windows * T
        first, repeats = row["by_position"][f"0-{distance}"], row["by_position"][f"{distance}-{T}"]
        # the two buckets split the positions: their weighted mean is the overall loss
        assert row["loss"] == pytest.approx((first * distance + repeats * (T - distance)) / T)
        model, checkpoint, label = key
        assert losses[model][f"{checkpoint}:{label}"] == repeats
    for model in reproduce.MODELS:
        assert losses[model][reference] == rows[(model, "pretrained", "dense")]["by_position"][f"0-{distance}"]


@slow
@tiny_run
def test_a_rerun_computes_only_the_missing_text_recall(result, tiny_argv):
    """A work folder that lacks text recall rows (one from before the stage, or cut off in it) gains those
    rows and nothing else; one model's rows stand for them all (the others' cost the run more time)."""
    import shutil

    work = Path(tiny_argv[tiny_argv.index("--work") + 1])
    cached = {p: p.stat().st_mtime_ns for p in work.glob("eval/*/*.json") if p.name != "settings.json"}
    assert sum(p.parent.name.startswith("recall_text_") for p in cached) == len(result["recall_text"])
    text = [p for p in cached if p.parent.name.startswith("recall_text_attention_joint_")]
    assert len(text) == sum(row["model"] == "attention_joint" for row in result["recall_text"])
    folders = set(work.glob("*/*"))
    for path in text:
        shutil.rmtree(path.parent)
    logs = {p: p.stat().st_mtime_ns for p in work.glob("runs/*/train.log")}
    assert reproduce.main(tiny_argv) == 0
    assert set(work.glob("*/*")) == folders  # the text recall's folders again, under the same keys, and no others
    assert {p: p.stat().st_mtime_ns for p in logs} == logs  # no training
    for path, mtime in cached.items():  # every other cached row read, not written
        assert path.is_file() and (path in text) != (path.stat().st_mtime_ns == mtime), path
    (path,) = Path(tiny_argv[tiny_argv.index("--out") + 1]).glob("reproduce_*.json")
    again = json.loads(path.read_text())["recall_text"]
    assert [(r["model"], r["checkpoint"], r["pattern"]) for r in again] == [
        (r["model"], r["checkpoint"], r["pattern"]) for r in result["recall_text"]
    ]
    # The same computation again: float32 on a CPU repeats to rounding. On a GPU the run evaluates in bfloat16,
    # and cuBLAS / SDPA pick their kernels per call, so a row may move by a few 1e-6 (3.7e-6 measured on an
    # H100, bench/results/suite_gpu_H100_e1eacef.log.xz).
    rel = 5e-5 if torch.cuda.is_available() else 1e-6
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in result["recall_text"]], rel=rel)


@slow
@tiny_run
def test_niah_rows_and_summary(result):
    plan_rows = pipeline.niah_plan(TINY)
    got = {(r["model"], r["tuned"], r["pattern"]): r for r in result["niah"]}
    assert set(got) == set(plan_rows) and len(result["niah"]) == len(plan_rows)
    for row in got.values():
        assert "error" not in row, row
        assert 0 <= row["accuracy"] <= 100 and (math.isnan(row["far_accuracy"]) or 0 <= row["far_accuracy"] <= 100)
        assert row["samples"] == TINY.niah_eval_samples * len(TINY.niah_tasks)
        assert set(row["by_task"]) == {"all", *TINY.niah_tasks}
        assert row["by_task"]["all"] == pytest.approx(row["accuracy"])
    summary = result["summary"]
    for model in reproduce.MODELS:
        assert summary["niah"][model]["dense->dense"] == got[(model, "dense", "dense")]["accuracy"]
        rows = {(r["checkpoint"], r["pattern"]): r["loss"] for r in result["heldout"] if r["model"] == model}
        for p in TINY.patterns:
            gap = summary["loss_gap_pct"][model][p]["adapted"]
            assert gap == pytest.approx(
                100 * (rows[(f"adapted_{p}", p)] - rows[("pretrained", "dense")]) / rows[("pretrained", "dense")]
            )
    assert len(summary["expected"]) == 6 and all(v is None or isinstance(v, bool) for v in summary["expected"].values())


@slow
@tiny_run
def test_readme_section(result, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{reproduce.README_BEGIN}\nold\n{reproduce.README_END}\ntail\n")
    reproduce.write_readme(result, "reproduce_cpu.json", readme)
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{reproduce.README_END}\ntail\n")
    assert "| dense -> `dense` |" in text and f"| `{TINY.patterns[0]}` |" in text
    assert "NIAH accuracy" in text and "Held-out LM loss" in text and "Exact recall" in text
    assert "Recall of held-out text" in text and "ordinary LM loss" in text


def test_no_niah_drops_fine_tuning_and_its_report(tmp_path):
    scale = replace(TINY, niah=False)
    data = fake_data(tmp_path)
    pretrained = pipeline.pretrain_runs(tmp_path, scale, data)
    adapted = pipeline.adapt_runs(tmp_path, scale, data, pretrained)
    assert len(adapted) == len(TINY.models) * len(TINY.patterns)
    assert pipeline.sft_runs(tmp_path, scale, data, pretrained, adapted) == {}
    assert pipeline.niah_all(tmp_path, scale, data, {}) == []


@slow
@tiny_run
def test_report_without_niah(result):
    bare = {**result, "niah": [], "config": {**result["config"], "niah": False}}
    summary = reproduce.summarize(bare)
    assert list(summary["expected"]) == [
        f"recall_ratplus_{TINY.patterns[0]}_adapted_below_attention_{TINY.patterns[0]}_adapted"
    ]
    text = reproduce.readme_section({**bare, "summary": summary}, "x.json")
    assert "NIAH accuracy" not in text and "--no-niah" in text and "Exact recall" in text


@slow
@tiny_run
def test_report_of_a_json_from_before_the_text_recall(result, tmp_path):
    """Older JSON files have no ``recall_text``: the summary, the README section and the plot do without it."""
    old = {k: v for k, v in result.items() if k not in ("recall_text", "summary")}
    old["summary"] = reproduce.summarize(old)
    assert old["summary"]["recall_text_loss"] == {}
    text = reproduce.readme_section(old, "old.json")
    assert "Exact recall" in text and "Recall of held-out text" not in text
    assert text == reproduce.readme_section({**result, "summary": old["summary"], "recall_text": []}, "old.json")
    report.plot(old, tmp_path / "old.png")
    assert (tmp_path / "old.png").stat().st_size > 10_000


def test_stop_after_ends_the_run_at_that_stage(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--scale", "tiny", "--out", str(out), "--work", str(work), "--workers", "1", "--stop-after", "data"]
    assert reproduce.main(argv) == 0
    (path,) = out.glob("reproduce_*.json")
    saved = json.loads(path.read_text())
    assert "data_s" in saved["timing"] and "pretrain_s" not in saved["timing"]
    assert reproduce.main(argv) == 0  # again: the data stage is reused, and the run's time sums both calls
    again = json.loads(path.read_text())
    assert len(again["timing_calls"]) == 2 and again["timing_calls"][0]["timing"] == saved["timing"]
    assert again["timing_all_calls"]["data_s"] == pytest.approx(saved["timing"]["data_s"] + again["timing"]["data_s"], abs=0.11)
    assert report.run_time(again).endswith("min in all over 2 calls")
    assert report.run_time({"timing": {"total_s": 90.0}}) == "1.5 min in the call that finished it (earlier calls not counted)"
    assert (work / "data").is_dir() and not (work / "runs").exists()
    with pytest.raises(SystemExit):  # the last stage is not a stopping point: the run ends there anyway
        reproduce.main([*argv[:-1], "recall_text"])


def test_pretraining_past_the_corpus_takes_epochs_and_keeps_adaptation_unseen(tmp_path):
    window = TINY.seq_len + 1
    short = pipeline.prepare_data(tmp_path, TINY, workers=1)
    assert short["pretrain_epochs"] == 1
    sizes = {name: (tmp_path / short["files"][name]).stat().st_size // 2 for name in ("pretrain", "adapt")}
    assert sizes == {
        "pretrain": TINY.pretrain_steps * TINY.batch * window,
        "adapt": TINY.adapt_steps * TINY.batch * window,
    }
    steps = short["train_tokens"] // (TINY.batch * window) + 5  # more windows than the whole corpus holds
    long = pipeline.prepare_data(tmp_path, replace(TINY, pretrain_steps=steps), workers=1)
    pretrain = (tmp_path / long["files"]["pretrain"]).stat().st_size // 2
    adapt = (tmp_path / long["files"]["adapt"]).stat().st_size // 2
    assert pretrain % window == 0 and pretrain + adapt <= long["train_tokens"] < pretrain + adapt + window
    assert adapt == TINY.adapt_steps * TINY.batch * window
    assert (
        long["pretrain_epochs"] == pytest.approx(steps * TINY.batch * window / pretrain) and long["pretrain_epochs"] > 1
    )
    import numpy as np  # the adaptation windows are the corpus's tokens right after the pretraining ones

    train = np.fromfile(long["files"]["train"], dtype=np.uint16)
    assert np.array_equal(np.fromfile(long["files"]["adapt"], dtype=np.uint16), train[pretrain : pretrain + adapt])
    with pytest.raises(ValueError, match="less than one pretraining batch"):
        pipeline.prepare_data(tmp_path, replace(TINY, adapt_steps=steps), workers=1)


def test_adapt_holdout_lets_runs_with_other_adapt_steps_share_the_pretraining_cut(tmp_path):
    """The pretraining file depends on the adaptation steps only through the windows held out for them: with
    one ``adapt_holdout_steps`` two runs that differ in ``adapt_steps`` pretrain on the same file (one stage
    folder, so the same pretraining run key), and without it a corpus used for several epochs gives them two."""
    import numpy as np

    window = TINY.seq_len + 1
    corpus_windows = pipeline.prepare_data(tmp_path, TINY, workers=1)["train_tokens"] // (TINY.batch * window)
    steps = corpus_windows + 5  # pretraining takes every window the hold-out leaves, in several epochs
    a, b = (replace(TINY, pretrain_steps=steps, adapt_steps=n, adapt_holdout_steps=3) for n in (1, 3))
    first, second = (pipeline.prepare_data(tmp_path, scale, workers=1) for scale in (a, b))
    assert first["files"]["pretrain"] == second["files"]["pretrain"]
    assert first["files"]["adapt"] != second["files"]["adapt"]
    pretrain = np.fromfile(first["files"]["pretrain"], dtype=np.uint16)
    train = np.fromfile(first["files"]["train"], dtype=np.uint16)
    held = 3 * TINY.batch * window
    assert len(pretrain) == (len(train) - held) // window * window
    for result, n in ((first, 1), (second, 3)):  # the adaptation windows start where pretraining's end, unseen
        adapt = np.fromfile(result["files"]["adapt"], dtype=np.uint16)
        assert np.array_equal(adapt, train[len(pretrain) : len(pretrain) + n * TINY.batch * window])
    unshared = [pipeline.prepare_data(tmp_path, replace(scale, adapt_holdout_steps=0), workers=1) for scale in (a, b)]
    assert unshared[0]["files"]["pretrain"] != unshared[1]["files"]["pretrain"]
    assert unshared[1]["files"]["pretrain"] == first["files"]["pretrain"]  # hold-out 3 = adapt_steps 3
    with pytest.raises(ValueError, match="adapt_holdout_steps"):
        pipeline.prepare_data(tmp_path, replace(a, adapt_holdout_steps=corpus_windows), workers=1)


def test_repeat_share_makes_that_share_of_each_cut_periodic_beyond_the_window(tmp_path):
    scale = replace(TINY, repeat_share=0.5)
    plain, mixed = pipeline.prepare_data(tmp_path, TINY, workers=1), pipeline.prepare_data(tmp_path, scale, workers=1)
    window, low = TINY.seq_len + 1, pipeline.local_window(TINY) + 1
    import numpy as np

    for name in ("pretrain", "adapt"):
        a = np.fromfile(plain["files"][name], dtype=np.uint16).reshape(-1, window)
        b = np.fromfile(mixed["files"][name], dtype=np.uint16).reshape(-1, window)
        changed = [r for r in range(len(a)) if not np.array_equal(a[r], b[r])]
        assert len(changed) == round(0.5 * len(a))
        for r in changed:  # the smallest period is beyond the local window, and the first period is the text's
            period = next(d for d in range(1, window) if np.array_equal(b[r, d:], b[r, :-d]))
            assert low <= period <= window // 2 and np.array_equal(b[r, :period], a[r, :period])


def test_export_all_names_the_failed_export_and_skips_finished_ones(tmp_path):
    """Exports run in this process (``stages.export_all``): a finished folder is left as it is, a failed
    export raises with the command that failed (not the CLI's exit), and nothing is written for it."""

    done = TrainRun("done", "x.toml", [], 4, tmp_path / "runs" / "done-1")
    finished = tmp_path / "export" / "done-1-dense"
    finished.mkdir(parents=True)
    (finished / "config.json").write_text("{}")
    missing = TrainRun("missing", "x.toml", [], 4, tmp_path / "runs" / "missing-2")
    assert export_all({"a": (done, "dense")}, tmp_path) == {"a": finished}
    assert (finished / "config.json").read_text() == "{}"
    with pytest.raises(RuntimeError, match=r"export failed .*missing-2/checkpoint/step-4 .*--pattern d4w16s2"):
        export_all({"a": (done, "dense"), "b": (missing, "d4w16s2")}, tmp_path)
    assert not (tmp_path / "export" / "missing-2-d4w16s2").exists()
