"""lm-evaluation-harness model ``ratplus``: a ``RATPlusLM`` export behind lm-eval's ``TemplateLM``.

Importing this module registers the model (``lm_eval`` is imported here only, never by the
rest of ``ratplus_titan``; install it with ``pip install 'ratplus-titan[eval]'``)::

    python -m ratplus_titan.eval.lm_eval_adapter --model ratplus \\
        --model_args path=out/export,pattern=d16w256s4,dtype=bfloat16,batch_size=16 \\
        --tasks hellaswag,ratplus_tiny_mc --include_path eval/tasks

The command (``lm_eval_cli.main``) is lm-eval's own CLI with the model registered first: lm-eval
0.4.x looks models up only in its registry (no entry-point discovery), so the plain ``lm_eval``
command does not know ``ratplus``. From Python, import this module and call
``lm_eval.simple_evaluate(model="ratplus", model_args=...)``.

``model_args``:

- ``path``: folder written by ``ratplus-export`` (required);
- ``pattern``: ``dense``, ``d16w256s4``, one per layer joined by ``/`` (``dense/d16w256s4/...``),
  or ``config`` (the pattern recorded in ``config.json``; the default);
- ``dtype`` (``float32`` | ``bfloat16`` | ``float16``; default the exported dtype), ``device``;
- ``batch_size``: requests per forward / per generation batch (overrides ``--batch_size``);
- ``max_length``: longest sequence (default the exported ``max_seq_len``); longer inputs are
  left-truncated, rolling log-likelihoods use windows of this length;
- ``max_gen_toks`` (default 256), ``add_bos_token`` (default true), ``decode_mode``
  (``auto`` | ``eager`` | ``graph`` | ``compile``), ``tokenizer`` (a file or folder, when the
  export has none).

Requests are sorted longest first (lm-eval's ``Collator``) and batched right-padded: the
model is causal, so padding after a sequence never changes its logits.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator
from tqdm import tqdm

from ratplus_titan import cli
from ratplus_titan.eval.lm_eval_cli import TASKS_DIR, main  # noqa: F401  (README; installs predating lm_eval_cli)
from ratplus_titan.head_groups import LayerPattern

GENERATION_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k")

LoglikelihoodRequest = tuple[tuple[str, str] | None, list[int], list[int]]


def _as_bool(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{field}={value!r} is invalid: allowed values are true or false")


def _as_positive_int(value: Any, field: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or (isinstance(value, float) and value != number):
        raise ValueError(f"{field}={value!r} is invalid: allowed values are integers >= 1")
    return number


def parse_pattern_arg(pattern: Any) -> list[LayerPattern] | None:
    """``config``/empty -> None (the recorded pattern); else one spec, or one per layer joined by ``/``."""
    if pattern is None or str(pattern).strip() in ("", "config"):
        return None
    try:
        return cli.parse_patterns(str(pattern), separator="/")
    except ValueError as err:
        raise ValueError(f"model_args pattern: {err}") from None


class RATPlusEvalLM(TemplateLM):
    """lm-eval ``LM`` over ``RATPlusLM``: loglikelihood, loglikelihood_rolling, generate_until."""

    def __init__(
        self,
        path: str | None = None,
        pattern: str | None = "config",
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        add_bos_token: bool | str = True,
        decode_mode: str = "auto",
        tokenizer: str | None = None,
        lm: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        from ratplus_titan.inference.lm import RATPlusLM

        kwargs.pop("max_batch_size", None)  # lm-eval's auto-batching bound: we take batch_size as given
        kwargs.pop("trust_remote_code", None)
        if kwargs:
            raise ValueError(
                f"model_args has unknown fields {sorted(kwargs)}: allowed are path, pattern, dtype, device, "
                "batch_size, max_length, max_gen_toks, add_bos_token, decode_mode, tokenizer"
            )
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size='auto' is not supported by the ratplus model: give an integer, e.g. batch_size=16")
        self._batch_size = _as_positive_int(batch_size, "batch_size")
        self._max_gen_toks = _as_positive_int(max_gen_toks, "max_gen_toks")
        self.add_bos_token = _as_bool(add_bos_token, "add_bos_token")
        if decode_mode not in cli.DECODE_MODES:
            raise ValueError(f"decode_mode={decode_mode!r} is invalid: allowed values are {', '.join(cli.DECODE_MODES)}")
        self.decode_mode = decode_mode
        if dtype is not None and dtype not in (*cli.DTYPES, "auto"):
            raise ValueError(f"dtype={dtype!r} is invalid: allowed values are {', '.join(cli.DTYPES)}")
        patterns = parse_pattern_arg(pattern)  # checked before anything loads
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            warnings.warn(f"device={device!r} requested but CUDA is not available: running on cpu", stacklevel=2)
            device = "cpu"

        if lm is None:
            if not path:
                raise ValueError("model_args needs path=DIR: a folder written by ratplus-export")
            if not (Path(path) / "config.json").is_file():
                raise FileNotFoundError(f"path={path!r}: no config.json there; give a folder written by ratplus-export")
            lm = RATPlusLM.from_pretrained(
                path,
                pattern=patterns,
                dtype=None if dtype in (None, "auto") else dtype,
                device=device,
                max_seq_len=None if max_length is None else _as_positive_int(max_length, "max_length"),
                max_batch_size=self._batch_size,
            )
        elif max_length is not None and _as_positive_int(max_length, "max_length") > lm.max_seq_len:
            raise ValueError(f"max_length={max_length} exceeds the given model's max_seq_len={lm.max_seq_len}")
        if tokenizer is not None:
            from ratplus_titan.data.tokenizer import load_tokenizer

            lm.tokenizer = load_tokenizer(tokenizer)
        if lm.tokenizer is None:
            raise ValueError(f"the model at path={path!r} has no tokenizer: export it with one, or pass tokenizer=FILE")
        if lm.max_batch_size < self._batch_size:
            lm.max_batch_size = self._batch_size
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self._max_length = lm.max_seq_len if max_length is None else int(max_length)
        self._device = lm.device

    # ---- construction from lm-eval's CLI: model_args win over --batch_size/--device defaults ----
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> RATPlusEvalLM:
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> RATPlusEvalLM:
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    # ---- what TemplateLM and the evaluator read ----------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_id
        if eos is None:
            raise ValueError("the tokenizer has no end-of-sequence token")
        return eos

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_id", None)
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "path", "ratplus"))

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, add_bos=add_bos)

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(list(tokens))

    # ---- scoring ---------------------------------------------------------------------------
    def _padded(self, sequences: list[list[int]]) -> torch.Tensor:
        tokens = torch.zeros(len(sequences), max(len(s) for s in sequences), dtype=torch.long)
        for i, s in enumerate(sequences):
            tokens[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        return tokens.to(self.device)

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests: list[LoglikelihoodRequest], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Sum of ``log p(continuation | context)`` and whether greedy decoding gives the continuation.

        The model sees ``(context + continuation)[-(max_length + 1):][:-1]``: long inputs lose
        their oldest context tokens, as in lm-eval's Hugging Face model.
        """

        def longest_first(request: LoglikelihoodRequest) -> tuple[int, tuple[int, ...]]:
            tokens = request[1] + request[2]
            return -len(tokens), tuple(tokens)

        collator = Collator(requests, sort_fn=longest_first)
        results: list[tuple[float, bool]] = []
        progress = tqdm(
            total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests"
        )
        for chunk in collator.get_batched(n=self.batch_size):
            inputs, targets = [], []
            for _, context, continuation in chunk:
                if not continuation:
                    raise ValueError(f"empty continuation after context of {len(context)} tokens: nothing to score")
                whole = (context + continuation)[-(self.max_length + 1) :]
                inputs.append(whole[:-1])
                targets.append(whole[-min(len(continuation), len(whole) - 1) :])
            logits = self.lm(self._padded(inputs))  # [B, T, V]
            for i, ((request, _, _), inp, target) in enumerate(zip(chunk, inputs, targets)):
                start = len(inp) - len(target)
                logprobs = F.log_softmax(logits[i, start : len(inp)].float(), dim=-1)  # [n, V]
                target_ids = torch.as_tensor(target, device=logprobs.device)
                total = float(logprobs.gather(-1, target_ids[:, None]).sum())
                greedy = bool((logprobs.argmax(dim=-1) == target_ids).all())
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, (total, greedy))
                results.append((total, greedy))
                progress.update(1)
        progress.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text: ``BOS`` then the text, in windows of ``max_length``."""
        windows: list[LoglikelihoodRequest] = []
        owners: list[int] = []
        for index, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string, add_special_tokens=False)
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    # ---- generation ------------------------------------------------------------------------
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) continuations cut before the first stop string."""
        encoded = {}

        def longest_first(args: tuple[str, dict]) -> tuple[int, str]:
            tokens = encoded.setdefault(args[0], self.tok_encode(args[0]))
            return -len(tokens), args[0]

        collator = Collator([req.args for req in requests], sort_fn=longest_first, group_by="gen_kwargs")
        results: list[str] = []
        progress = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running generate_until requests")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts = [context for context, _ in chunk]
            gen_kwargs = copy.deepcopy(chunk[0][1])
            if not isinstance(gen_kwargs, dict):
                raise ValueError(f"generation kwargs must be a dict, got {gen_kwargs!r}")
            options = self._generation_options(gen_kwargs)
            budget = self.max_length - options["max_new_tokens"] + 1
            if budget < 1:
                raise ValueError(
                    f"max_gen_toks={options['max_new_tokens']} leaves no room for a prompt within max_length={self.max_length}"
                )
            prompts = [encoded.setdefault(c, self.tok_encode(c))[-budget:] for c in contexts]
            outputs = self.lm.generate(prompts, decode_mode=self.decode_mode, **options)
            for (context, _), output in zip(chunk, outputs):
                text = output.text or ""
                for stop in options["stop"]:  # generate already cuts; keep lm-eval's contract explicit
                    text = text.split(stop)[0]
                self.cache_hook.add_partial("generate_until", (context, chunk[0][1]), text)
                results.append(text)
                progress.update(1)
        progress.close()
        return collator.get_original(results)

    def _generation_options(self, gen_kwargs: dict) -> dict[str, Any]:
        until = gen_kwargs.pop("until", None)
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)):
            raise ValueError(f"generation kwarg until={until!r} must be a string or a list of strings")
        max_new = _as_positive_int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks), "max_gen_toks")
        do_sample = _as_bool(gen_kwargs.pop("do_sample", False), "do_sample")
        temperature = float(gen_kwargs.pop("temperature", 0.0) or 0.0)
        top_p = float(gen_kwargs.pop("top_p", 1.0) or 1.0)
        top_k = int(gen_kwargs.pop("top_k", 0) or 0)
        if gen_kwargs:
            warnings.warn(f"ratplus ignores generation kwargs {sorted(gen_kwargs)} (supported: {', '.join(GENERATION_KWARGS)})", stacklevel=3)
        if not do_sample:
            temperature = 0.0
        return {
            "max_new_tokens": max_new,
            "stop": [s for s in until if s],  # the EOS string decodes to "": the EOS token stops anyway
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "stop_on_eos": True,
        }


# Registered under the module's own name only: ``python -m ratplus_titan.eval.lm_eval_adapter`` runs this
# file as ``__main__``, and the command below imports it again as ratplus_titan.eval.lm_eval_adapter
# (lm-eval refuses a second class under one name).
if __name__ == "__main__":
    main()
else:
    register_model("ratplus")(RATPlusEvalLM)
