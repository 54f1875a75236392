"""Evaluation of exported RAT+ models (installed as ``ratplus_titan.eval``).

- ``lm_eval_adapter``: the lm-eval model ``ratplus`` (imports lm-eval: the ``eval`` extra);
- ``niah``: needle-in-a-haystack, RULER style (``ratplus-niah``);
- ``longbench``: LongBench-format long-context QA (``ratplus-longbench``);
- ``tasks/``: local lm-eval task YAMLs (``--include_path``).

Nothing here is imported by the rest of the package.
"""
