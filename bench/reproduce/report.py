"""The reproduction's result: the summary checked against the paper's expectations, the figure, the README
section (regenerated from the JSON alone with ``python -m bench.reproduce --readme-only JSON``)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from bench.common import REPO, figure, save_figure
from bench.reproduce.pipeline import DENSE
from bench.reproduce.scales import MODELS
from ratplus_titan.pattern import Pattern

README_BEGIN, README_END = (
    "<!-- reproduce:begin (python -m bench.reproduce --readme-only JSON) -->",
    "<!-- reproduce:end -->",
)
DENSE_OK = 90.0
"""Dense NIAH accuracy (%) that counts as "near 100" after fine-tuning."""
CLOSE_POINTS = 10.0
"""A sparse pattern is "close to dense" within this many points of beyond-window NIAH accuracy."""
COLORS = {"ratplus": "tab:blue", "attention": "tab:red", "attention_joint": "tab:orange"}


def niah_table(result: dict) -> dict[tuple[str, str, str], dict]:
    """``{(model, fine-tuned under, evaluated under): NIAH row}`` (rows with an error included)."""
    return {(r["model"], r["tuned"], r["pattern"]): r for r in result["niah"]}


def accuracy(row: dict | None, key: str = "accuracy") -> float:
    """A NIAH row's accuracy (``far_accuracy``: needles beyond the local window); NaN if missing or failed."""
    value = (row or {}).get(key)
    return math.nan if value is None else value


def summarize(result: dict) -> dict:
    """Per model and pattern: held-out loss change vs the model's dense loss, NIAH accuracy (all needles and
    needles beyond the window); and whether each expectation from the paper holds."""
    cfg = result["config"]
    patterns, models = cfg["patterns"], cfg.get("models", list(MODELS))
    loss = {(r["model"], r["checkpoint"], r["pattern"]): r.get("loss", math.nan) for r in result["heldout"]}
    niah = niah_table(result)
    summary: dict = {"loss_gap_pct": {}, "niah": {}, "niah_far": {}, "recall_loss": recall_losses(result),
                     "recall_text_loss": recall_losses(result, "recall_text", "first_half")}  # fmt: skip
    # expectations are judged on needles beyond the window, the ones only the dilated or selected rows reach
    for model in models:
        dense = loss.get((model, "pretrained", DENSE), math.nan)
        summary["loss_gap_pct"][model] = {
            p: {"not_adapted": 100 * (loss.get((model, "pretrained", p), math.nan) - dense) / dense,
                "adapted": 100 * (loss.get((model, f"adapted_{p}", p), math.nan) - dense) / dense}
            for p in patterns
        }  # fmt: skip
        summary["niah"][model] = {f"{t}->{p}": accuracy(row) for (m, t, p), row in niah.items() if m == model}
        summary["niah_far"][model] = {
            f"{t}->{p}": accuracy(row, "far_accuracy") for (m, t, p), row in niah.items() if m == model
        }
    far = summary["niah_far"]
    first = patterns[0]  # the pattern whose KV budget the top-k runs get (pipeline.topk_specs): d16w256s4 by default

    def tuned(model: str, p: str) -> float:
        return far.get(model, {}).get(f"{p}->{p}", math.nan)

    dense_ok = {m: far.get(m, {}).get(f"{DENSE}->{DENSE}", math.nan) >= DENSE_OK for m in models}

    def given(condition: bool, value: bool) -> bool | None:
        """None when the comparison says nothing: the dense model it is measured against failed NIAH."""
        return bool(value) if condition else None

    attention_topk = [far.get(m, {}).get(f"{DENSE}->topk-{s}", math.nan) for m in models if m != "ratplus"
                      for s in ("quest", "moba")]  # fmt: skip
    best_attention = max((v for v in attention_topk if not math.isnan(v)), default=math.nan)
    recall = summary["recall_loss"]
    recall_ok = {m: recall_works(recall.get(m, {})) for m in models}

    def recall_after(model: str, p: str) -> float:
        return recall.get(model, {}).get(f"adapted_{p}:{p}", math.nan)

    summary["expected"] = {}
    if niah:  # a run with --no-niah has none
        summary["expected"] = {
            f"dense_at_least_{DENSE_OK:g}_every_model": all(dense_ok.values()),
            f"attention_{first}_far_below_its_dense": given(dense_ok.get("attention", False), tuned("attention", first) <= 0.5 * tuned("attention", DENSE)),
            f"ratplus_{first}_within_{CLOSE_POINTS:g}_points_of_its_dense": given(
                dense_ok.get("ratplus", False), tuned("ratplus", first) >= tuned("ratplus", DENSE) - CLOSE_POINTS),
        }  # fmt: skip
        for other in patterns[1:]:  # sparser than the first: between it and attention; denser: at least as good
            if Pattern.parse(other).dilation > Pattern.parse(first).dilation:
                summary["expected"][f"ratplus_{other}_between_ratplus_{first}_and_attention_{other}"] = given(
                    dense_ok.get("ratplus", False) and dense_ok.get("attention", False),
                    tuned("ratplus", first) >= tuned("ratplus", other) >= tuned("attention", other))  # fmt: skip
            else:
                summary["expected"][f"ratplus_{other}_at_least_ratplus_{first}"] = given(
                    dense_ok.get("ratplus", False), tuned("ratplus", other) >= tuned("ratplus", first))  # fmt: skip
        summary["expected"]["topk_ratplus_score_on_ratplus_at_least_attention_best"] = given(
            all(dense_ok.values()) and not math.isnan(best_attention),
            far.get("ratplus", {}).get(f"{DENSE}->topk-ratplus", math.nan) >= best_attention)  # fmt: skip
    if recall:  # JSON files from before the recall stage have none
        summary["expected"][f"recall_ratplus_{first}_adapted_below_attention_{first}_adapted"] = given(
            recall_ok.get("ratplus", False) and recall_ok.get("attention", False),
            recall_after("ratplus", first) < recall_after("attention", first))  # fmt: skip
    return summary


def recall_losses(result: dict, section: str = "recall", reference: str = "guess") -> dict[str, dict[str, float]]:
    """``{model: {"checkpoint:pattern": loss on the repeats}}`` of the rows of ``result[section]`` (none when
    the JSON predates that stage), plus ``reference``: the dense pretrained model's loss on the first period
    (random tokens: guessing, nothing to recall; text: ordinary LM loss, nothing to copy yet)."""
    cfg = result["config"]
    out: dict[str, dict[str, float]] = {}
    for row in result.get(section, []):
        repeats = repeats_loss(row, cfg)
        out.setdefault(row["model"], {})[f"{row['checkpoint']}:{row['pattern']}"] = (
            math.nan if repeats is None else repeats
        )
        if (row["checkpoint"], row["pattern"]) == ("pretrained", DENSE):
            out[row["model"]][reference] = row.get("by_position", {}).get(f"0-{cfg['recall_distance']}", math.nan)
    return out


def references(losses: dict[str, dict[str, float]], reference: str) -> str:
    """The models' ``reference`` losses of ``recall_losses``, ``" / "``-joined for a caption."""
    return " / ".join(f"{v[reference]:.2f}" for v in losses.values() if reference in v)


def repeats_loss(row: dict, cfg: dict) -> float | None:
    """A recall row's loss on the repeats: its position bucket from ``recall_distance`` to the end (None if failed)."""
    return row.get("by_position", {}).get(f"{cfg['recall_distance']}-{cfg['seq_len']}")


RECALL_WORKS = 0.5
"""Dense recall "works" when its loss on the repeats is below this share of its loss on the first period."""


def recall_works(losses: dict[str, float]) -> bool:
    return losses.get(f"pretrained:{DENSE}", math.nan) <= RECALL_WORKS * losses.get("guess", math.nan)


def plot(result: dict, path: Path) -> None:
    cfg = result["config"]
    fig, axes = figure(2, 3, figsize=(24, 10))
    (curves, depth, recall_bars), (bars, losses, text_bars) = axes
    for model, color in COLORS.items():
        curve = result["training"].get(f"pretrain_{model}")
        if not curve:
            continue
        tokens = [s * cfg["tokens_per_step"] / 1e6 for s in curve["step"]]
        curves.plot(tokens, curve["loss"], color=color, label=f"{MODELS[model].label}: dense")
        if any(v is not None for v in curve["loss_sparse"]):
            curves.plot(
                tokens,
                curve["loss_sparse"],
                color=color,
                ls=":",
                label=f"{MODELS[model].label}: D={cfg['joint_dilation']} phase",
            )
    curves.set(title="pretraining", xlabel="tokens (M)", ylabel="training loss")

    niah = niah_table(result)
    styles = dict(zip([DENSE, *cfg["patterns"]], itertools.cycle(("-", "--", ":", "-."))))
    for (model, tuned, label), row in niah.items():
        if tuned != label or "by_depth" not in row:
            continue
        buckets = list(row["by_depth"])
        values = [math.nan if row["by_depth"][b] is None else row["by_depth"][b] for b in buckets]
        depth.plot(range(len(buckets)), values, color=COLORS[model], ls=styles[label],
                   marker="o", label=f"{MODELS[model].label} {label}")  # fmt: skip
        depth.set_xticks(range(len(buckets)), buckets)
    depth.set(title="NIAH accuracy by needle depth (fine-tuned and evaluated under the pattern)",
              xlabel="needle depth (% of the haystack)", ylabel="accuracy (%)", ylim=(-3, 103))  # fmt: skip

    labels = list(dict.fromkeys(f"{t}->{p}" for (_, t, p) in niah))
    models = cfg.get("models", list(MODELS))
    far = result["summary"]["niah_far"]
    grouped_bars(bars, {m: [far[m].get(label, math.nan) for label in labels] for m in models})
    bars.set_xticks(range(len(labels)), [label.replace("->", "\n-> ") for label in labels], fontsize=7)
    bars.set(title=f"NIAH accuracy, needles beyond the {cfg['local_window']}-token window (fine-tuned -> evaluated)",
             ylabel="accuracy (%)", ylim=(0, 103))  # fmt: skip

    gaps = result["summary"]["loss_gap_pct"]
    pairs = [(p, kind) for p in cfg["patterns"] for kind in ("not_adapted", "adapted")]
    grouped_bars(losses, {m: [gaps[m][p][kind] for p, kind in pairs] for m in models})
    losses.set_xticks(range(len(pairs)), [f"{p}\n{kind.replace('_', ' ')}" for p, kind in pairs], fontsize=8)
    losses.axhline(0, color="black", lw=0.8)
    losses.set(title="held-out LM loss vs the model's own dense loss", ylabel="change (%)")

    distance = cfg.get("recall_distance")
    recall_panel(recall_bars, result, "recall_loss", ("guess", "first period (guessing)"),
                 f"exact recall {distance} tokens back: loss on repeated random tokens")  # fmt: skip
    recall_panel(text_bars, result, "recall_text_loss", ("first_half", "first half (ordinary LM loss)"),
                 f"recall of held-out text {distance} tokens back: loss on its repeat")  # fmt: skip
    for ax in (curves, depth, bars, losses):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    env = result["env"]
    fig.suptitle(
        f"RAT+ vs attention, {cfg['flavor']} flavor, T={cfg['seq_len']}, {env['device']}, torch {env['torch']}, {env['date'][:10]}"
    )
    save_figure(fig, path, dpi=100)


def recall_panel(ax, result: dict, summary_key: str, reference: tuple[str, str], title: str) -> None:
    """Bars of the loss on the repeats (``result["summary"][summary_key]``) by pattern, not adapted and
    adapted, for each model; a dashed line at the models' mean ``reference`` (key, legend label): the
    first period's loss. An empty panel when the JSON has no such rows (it predates the stage)."""
    cfg, recall = result["config"], result["summary"].get(summary_key, {})
    if not recall:
        ax.axis("off")
        return
    models = cfg.get("models", list(MODELS))
    keys = [
        f"pretrained:{DENSE}",
        "pretrained:window",
        *(f"{c}:{p}" for p in cfg["patterns"] for c in ("pretrained", f"adapted_{p}")),
    ]
    grouped_bars(ax, {m: [recall.get(m, {}).get(k, math.nan) for k in keys] for m in models})
    ax.set_xticks(
        range(len(keys)), [k.split(":")[1] + ("\nadapted" if k.startswith("adapted") else "") for k in keys], fontsize=8
    )
    key, label = reference
    first = [recall[m][key] for m in models if key in recall.get(m, {})]
    if first:
        ax.axhline(sum(first) / len(first), color="black", lw=0.8, ls="--", label=label)
    ax.set(title=title, ylabel="loss on the repeats (nats)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def grouped_bars(ax, values: dict[str, list[float]]) -> None:
    """One bar per model (its color and label) in each group; ``values[model][group]``."""
    width = 0.8 / len(values)
    for i, (model, heights) in enumerate(values.items()):
        offsets = [x + (i - (len(values) - 1) / 2) * width for x in range(len(heights))]
        ax.bar(offsets, heights, width, color=COLORS[model], label=MODELS[model].label)


def run_time(result: dict) -> str:
    """How long the run took: summed over the calls on its work folder (``timing_all_calls``); a JSON from
    before that field has only the last call's time, where the stages earlier calls finished count ~0 s."""
    if "timing_all_calls" in result:
        calls = len(result["timing_calls"])
        return f"{result['timing_all_calls']['total_s'] / 60:.1f} min in all" + (f" over {calls} calls" if calls > 1 else "")
    return f"{result['timing']['total_s'] / 60:.1f} min in the call that finished it (earlier calls not counted)"


def readme_section(result: dict, json_name: str) -> str:
    cfg, env, counts = result["config"], result["env"], result["models"]
    niah = niah_table(result)
    window, models = cfg["local_window"], cfg.get("models", list(MODELS))
    params = ", ".join(f"{MODELS[m].label} {counts[m]['params'] / 1e6:.0f}M" for m in models)
    niah_settings = (
        f"NIAH fine-tuning: {cfg['sft_steps']} steps of {cfg['batch']} samples ({cfg['niah_train_samples']} samples "
        f"from training books, lr {cfg['sft_lr']:g}, prompt masked); NIAH evaluation: {cfg['niah_eval_samples']} samples "
        f"per task ({', '.join(cfg['niah_tasks'])}) from {cfg.get('validation_books') or 'held-out'} held-out books, "
        "needle depths 0-100%."
        if cfg.get("niah", True) else "no NIAH fine-tuning or evaluation (`--no-niah`)."
    )  # fmt: skip
    epochs = f", {cfg['pretrain_epochs']:.2g} epochs" if cfg.get("pretrain_epochs", 1) > 1 else ""
    repeats = (
        f"; {cfg['repeat_share']:.0%} of the windows, here and in adaptation, repeat their beginning from a distance "
        f"of {cfg['local_window'] + 1}-{(cfg['seq_len'] + 1) // 2} tokens on (`bench/reproduce/repeats.py`)"
        if cfg.get("repeat_share") else ""
    )  # fmt: skip
    lines = [
        f"{env['device']}, torch {env['torch']}, {env['date'][:10]} (`bench/results/{json_name}`), "
        f"{run_time(result)}: {cfg['flavor']} flavor ({params} parameters), T={cfg['seq_len']}. "
        f"Pretraining: {cfg['pretrain_tokens'] / 1e6:.1f}M tokens{epochs} ({cfg['pretrain_steps']} steps of {cfg['batch']} windows "
        f"in a seeded random order{repeats}); adaptation: {cfg['adapt_tokens'] / 1e6:.1f}M unseen tokens ({cfg['adapt_steps']} "
        f"steps, lr {cfg['adapt_lr']:g}); {niah_settings}",
    ]
    if niah:
        lines += [
            "",
            f"NIAH accuracy (%), all needles / needles more than {window} tokens before the question "
            "(what only the dilated or selected rows can reach). *fine-tuned -> evaluated*:",
            "",
            "| fine-tuned -> evaluated | KV rows | " + " | ".join(MODELS[m].label for m in models) + " |",
            "|---|---|" + "---|" * len(models),
        ]
    for label in dict.fromkeys(f"{t}->{p}" for (_, t, p) in niah):
        tuned, pattern = label.split("->")
        cells = []
        for model in models:
            row = niah.get((model, tuned, pattern))
            cells.append(
                "-"
                if row is None
                else "failed"
                if "error" in row
                else f"{accuracy(row):.1f} / {accuracy(row, 'far_accuracy'):.1f}"
            )
        kv = next(
            (r.get("kv_rows") for (m, t, p), r in niah.items() if (t, p) == (tuned, pattern) and "kv_rows" in r), "-"
        )
        lines.append(f"| {tuned} -> `{cfg['specs'].get(pattern, pattern)}` | {kv} | " + " | ".join(cells) + " |")
    lines += ["", "Held-out LM loss (nats, "
              f"{result['heldout'][0].get('tokens', 0):,} tokens); in brackets the change from the model's own dense loss:",
              "", *loss_table(result, result["heldout"], lambda row: row.get("loss"))]  # fmt: skip
    lines += recall_tables(result)
    expected = result["summary"]["expected"]
    verdict = {True: "yes", False: "no", None: "not testable"}
    lines += ["", "The paper's expectations, beyond the local window: " + "; ".join(
        f"{name.replace('_', ' ')}: **{verdict[ok]}**" for name, ok in expected.items()) + "."]  # fmt: skip
    if None in expected.values():
        lines[-1] += (f" (*not testable*: the dense model it is judged against fails, NIAH below {DENSE_OK:g}% or "
                      f"its loss on the repeats above {RECALL_WORKS:g}x guessing.)")  # fmt: skip
    return "\n".join(lines)


def recall_tables(result: dict) -> list[str]:
    """The README lines of the two recall stages, random tokens and held-out text; none for a stage the JSON
    predates."""
    cfg, summary = result["config"], result["summary"]
    distance, windows = cfg.get("recall_distance"), cfg.get("recall_windows")
    guess = references(summary.get("recall_loss", {}), "guess")
    first_half = references(summary.get("recall_text_loss", {}), "first_half")
    captions = {
        "recall": f"Exact recall {distance} tokens back, no fine-tuning: loss (nats) on the repeated half of "
        f"{windows} windows of random tokens that repeat every {distance} positions "
        f"(`eval/repeated_tokens.py`; guessing, the first half: {guess}). Low means the pattern still "
        "delivers the exact past beyond its window:",
        "recall_text": f"Recall of held-out text {distance} tokens back, no fine-tuning: loss (nats) on the repeated "
        f"half of {windows} windows of held-out text whose second half repeats their first (`eval/repeated_tokens.py`; "
        f"the first half is ordinary LM loss, not guessing: {first_half}). Well below the first half means the "
        "pattern still copies text from beyond its window:",
    }  # fmt: skip
    lines = []
    for section, caption in captions.items():
        if result.get(section):
            lines += ["", caption, "", *loss_table(result, result[section], lambda row: repeats_loss(row, cfg))]
    return lines


def loss_table(result: dict, rows: list[dict], value) -> list[str]:
    """Markdown rows: a loss per pattern (``value(row)``) for each model, not adapted and adapted, and its
    change from the model's own dense value."""
    cfg, models = result["config"], result["config"].get("models", list(MODELS))
    lines = ["| pattern | " + " | ".join(f"{MODELS[m].label} not adapted | adapted" for m in models) + " |",
             "|---|" + "---|---|" * len(models)]  # fmt: skip
    by_key = {(r["model"], r["checkpoint"], r["pattern"]): value(r) for r in rows}

    def cell(model: str, checkpoint: str | None, label: str) -> str:
        if checkpoint is None or (model, checkpoint, label) not in by_key:
            return "-"
        found, dense = by_key[(model, checkpoint, label)], by_key.get((model, "pretrained", DENSE))
        if found is None or dense is None:
            return "failed"
        if (checkpoint, label) == ("pretrained", DENSE):
            return f"{found:.4f}"
        return f"{found:.4f} ({100 * (found - dense) / dense:+.2f}%)"

    for label, spec in cfg["specs"].items():
        adapted = f"adapted_{label}" if label in cfg["patterns"] else None
        cells = [f"{cell(m, 'pretrained', label)} | {cell(m, adapted, label)}" for m in models]
        lines.append(f"| `{spec}` | " + " | ".join(cells) + " |")
    return lines


def write_readme(result: dict, json_name: str, readme: Path = REPO / "README.md") -> None:
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_BEGIN} ... {README_END} markers")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + README_BEGIN + "\n" + readme_section(result, json_name) + "\n" + README_END + tail)
