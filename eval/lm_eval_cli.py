"""``ratplus-lm-eval``: lm-eval's command line with the ``ratplus`` model registered (``lm_eval_adapter``).

A module of its own so that ``--help`` answers without importing torch: the adapter (and with it
torch and the model) is imported only when an evaluation runs.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ratplus_titan import cli

PROG = "ratplus-lm-eval"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
"""Our local lm-eval task YAMLs (tiny multiple-choice / perplexity tasks, the needle tasks)."""


def local_task_names() -> set[str]:
    """Task and tag names defined by the YAMLs in ``TASKS_DIR``."""
    import re

    names: set[str] = set()
    for path in TASKS_DIR.glob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        names.update(re.findall(r"^task: *(\S+)", text, flags=re.M))
    names.add("ratplus_niah")  # the tag of the four needle tasks
    return names


def _requested_tasks(args: list[str]) -> list[str]:
    """The task names of ``--tasks``/``-t`` (lm-eval takes several values, each comma-separated)."""
    for i, arg in enumerate(args):
        if arg in ("--tasks", "-t"):
            values = itertools.takewhile(lambda value: not value.startswith("-"), args[i + 1 :])
        elif arg.startswith("--tasks="):
            values = [arg.split("=", 1)[1]]
        else:
            continue
        return [t.strip() for value in values for t in value.split(",") if t.strip()]
    return []


def _has_option(args: list[str], *names: str) -> bool:
    return any(a in names or a.split("=", 1)[0] in names for a in args)


def lm_eval_cli() -> Any:
    """lm-eval's ``cli_evaluate``; a one-line error (status 2) where lm-eval is not installed."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "lm_eval":
            raise
        cli.fail(PROG, "lm-eval is not installed; it comes with the eval extra: pip install -e '.[eval]' in the "
                       "checkout, or the wheel with [eval] (README, Installing by hand)")  # fmt: skip
    return cli_evaluate


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's CLI with the ``ratplus`` model registered.

    Without ``--include_path`` our task folder is included; when every requested task is one
    of ours, lm-eval's own ~15 s index of its built-in task YAMLs is skipped. Bad input found
    by lm-eval's argument checks, its task lookup or our model's construction (``model_args``,
    the model folder) is reported in one line (``cli.user_errors``); the evaluation itself is not
    wrapped. Help (``-h``), ``ls`` and ``validate`` go to lm-eval as they are, without the model.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(
            f"usage: {PROG} [lm-eval arguments]\n"
            "  lm-eval's CLI with the 'ratplus' model registered, e.g.\n"
            "  --model ratplus --model_args path=DIR,pattern=d16w256s4,dtype=bfloat16,batch_size=16 "
            "--tasks ratplus_tiny_mc\n"
            f"  model_args: path, pattern (default: config, the pattern recorded in the export), dtype, device, "
            f"batch_size, max_length, max_gen_toks, add_bos_token, decode_mode, tokenizer\n"
            f"  local tasks (default --include_path {TASKS_DIR}): "
            f"{', '.join(sorted(local_task_names()))}\n\nlm-eval's own help follows.\n"
        )
        args = args or ["--help"]
    cli_evaluate = lm_eval_cli()
    saved_argv = sys.argv
    if args[0] in ("ls", "validate") or _has_option(args, "-h", "--help"):
        sys.argv = ["lm-eval", *args]
        try:
            cli_evaluate()
        finally:
            sys.argv = saved_argv
        return

    import lm_eval.tasks
    from lm_eval.config.evaluate_config import EvaluatorConfig

    from ratplus_titan.eval.lm_eval_adapter import RATPlusEvalLM  # registers the model

    task_manager = lm_eval.tasks.TaskManager
    requested = _requested_tasks(args)
    if not requested and not _has_option(args, "--config", "-C"):
        cli.fail(PROG, f"--tasks is missing: give lm-eval task names, e.g. --tasks hellaswag or one of ours "
                       f"({', '.join(sorted(local_task_names()))})")  # fmt: skip
    if not _has_option(args, "--include_path"):
        args += ["--include_path", str(TASKS_DIR)]
        if requested and set(requested) <= local_task_names():

            class LocalTaskManager(task_manager):
                def __init__(self, *a: Any, **kw: Any) -> None:
                    kw.setdefault("include_defaults", False)
                    super().__init__(*a, **kw)

            lm_eval.tasks.TaskManager = LocalTaskManager
    checks = [(EvaluatorConfig, "from_cli"), (EvaluatorConfig, "process_tasks"), (RATPlusEvalLM, "create_from_arg_obj")]
    sys.argv = ["lm-eval", *args]
    try:
        with cli.user_errors_in(PROG, checks):
            cli_evaluate()
    finally:
        sys.argv, lm_eval.tasks.TaskManager = saved_argv, task_manager


if __name__ == "__main__":
    main()
