"""Frozen reward sources r(x, y) behind one small interface.

MODPO's margin rewards, the evaluation scorers and DPA's multi-objective reward model all score
(prompt, response) pairs. Every source has a `name`, a `fingerprint()` that changes whenever its scores
could change (used by the score cache), and `score_pairs(dataset)`, which scores the `chosen` and
`rejected` responses of a preference dataset (passing the dataset's other columns a source asks for, see
`input_columns`). Model-backed sources accept a loaded model or a local path;
a path is only loaded when scores are actually needed (a cache hit loads nothing) and released afterwards.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import uuid
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from trl.data_utils import common_prefix_length, is_conversational

from ..loading import load_model, load_tokenizer
from .cache import fingerprint, module_fingerprint, path_fingerprint
from .callables import Unfingerprintable, callable_fingerprint

Prompt = str | list[dict[str, Any]]
Response = str | list[dict[str, Any]]
# A preference row's columns, and the names a reward function's own arguments take: never passed as columns.
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
_CALL_NAMES = ("prompts", "completions", "responses")


class RewardSource(ABC):
    """A frozen scorer of (prompt, response) pairs; higher is better."""

    name: str
    # Whether scores are worth caching; reading precomputed columns is free, and their values are not in the key.
    cacheable: bool = True

    @abstractmethod
    def fingerprint(self) -> str:
        """A digest that changes whenever the scores of the same inputs could change."""

    @abstractmethod
    def score(self, prompts: Sequence[Prompt], responses: Sequence[Response]) -> torch.Tensor:
        """Scores one batch: a float tensor of shape `(len(prompts),)`."""

    def release(self) -> None:
        """Frees weights this source loaded itself (nothing for in-memory models or functions)."""

    def input_columns(self, available: Sequence[str]) -> list[str]:
        """The dataset columns among `available`, besides prompt/chosen/rejected, that `score` takes as keyword
        arguments (TRL's reward-function convention); none for sources that only read the text."""
        return []

    def score_pairs(
        self, dataset: Dataset, batch_size: int = 16, progress: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores `(prompt, chosen)` and `(prompt, rejected)` of every row, in batches.

        A response the source returns `None` for (TRL's "not applicable") scores NaN.
        """
        n = len(dataset)
        prompts = list(dataset["prompt"])
        responses = list(dataset["chosen"]) + list(dataset["rejected"])
        columns = {c: list(dataset[c]) for c in self.input_columns(dataset.column_names)}
        scores = []
        with torch.no_grad():
            starts = range(0, 2 * n, batch_size)
            if progress:  # (TQDM_DISABLE still applies)
                starts = tqdm(starts, desc=f"Scoring margin reward '{self.name}'")
            for start in starts:
                idx = range(start, min(start + batch_size, 2 * n))
                batch = self.score(
                    [prompts[i % n] for i in idx],
                    [responses[i] for i in idx],
                    **{c: [values[i % n] for i in idx] for c, values in columns.items()},
                )
                scores.append(
                    check_scores(self.name, batch, expected=len(idx), offset=start, n=n, allow_none=True)
                )
        scores = torch.cat(scores)
        return scores[:n], scores[n:]


class ScoreError(ValueError):
    """A reward source returned something else than one finite score per response."""


def check_scores(
    name: str, scores: Any, expected: int, offset: int = 0, n: int | None = None, allow_none: bool = False
) -> torch.Tensor:
    """`scores` as a float tensor of `expected` finite values; a `ScoreError` naming the source and the row.

    `None` is TRL's "this reward does not apply": NaN where `allow_none` (margins, see `MODPOConfig`), else an
    error (evaluation and DPA need a number for every response).
    """

    def where(j: int) -> str:
        i = offset + j
        return f"row {i % n} ({'chosen' if i < n else 'rejected'})" if n else f"item {i}"

    missing = [j for j, s in enumerate(scores) if s is None] if isinstance(scores, list | tuple) else []
    if missing and not allow_none:
        raise ScoreError(
            f"reward source '{name}' returned None (not applicable) at {where(missing[0])}; {len(missing)} in this "
            "batch. Here every response needs a score: None is only accepted from margin rewards."
        )
    if missing:
        scores = [math.nan if s is None else s for s in scores]
    try:
        scores = torch.as_tensor(scores, dtype=torch.float32).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        shown = repr(scores) if len(repr(scores)) <= 80 else repr(scores)[:77] + "..."
        raise ScoreError(
            f"reward source '{name}' returned {shown}; valid: a list (or tensor) of numbers, one per response"
        ) from None
    if scores.numel() != expected:
        raise ScoreError(f"reward source '{name}' returned {scores.numel()} scores for a batch of {expected}")
    finite = torch.isfinite(scores)
    finite[missing] = True
    bad = (~finite).nonzero().flatten()
    if len(bad):
        raise ScoreError(
            f"reward source '{name}' returned a non-finite score ({scores[bad[0]].item()}) at {where(int(bad[0]))}; "
            f"{len(bad)} non-finite in this batch. Rewards must be finite numbers (or None: not applicable)."
        )
    return scores


class FunctionReward(RewardSource):
    """A Python callable scoring responses (rule-based scores, APIs), in either of two forms:

    - TRL's reward-function convention (GRPO's), recognised by a `completions` parameter or by taking only
      `**kwargs`: `fn(prompts=..., completions=..., **columns)`, where `columns` are the dataset's other columns
      (one value per response), as TRL passes them; `prompts` is passed when `fn` takes it.
    - positional: `fn(prompts, responses)`, plus the dataset columns `fn` declares as keyword parameters (all of
      them if it takes `**kwargs`).

    It returns one score per response (a list or tensor); `None` marks a response the reward does not apply to
    (see `check_scores`). It receives the dataset's own values: strings for TRL's standard format, message lists
    for the conversational one.

    Its fingerprint follows everything the function's behaviour can depend on (`modpo_trl.rewards.callables`):
    its code and the code of its package, and the values it reads (defaults, closures, globals, the state of a
    callable object). When that cannot be known (it reaches a lock, an open file, a network client), its scores
    are not cached and a warning says why; pass `version` to cache them anyway, under a key that changes only
    when you change `version` (bump it whenever the function's behaviour changes).
    """

    def __init__(self, fn: Callable[..., Any], name: str | None = None, version: str | None = None):
        if not callable(fn):
            raise TypeError(f"FunctionReward needs a callable, got {type(fn).__name__}")
        if version is not None and not (isinstance(version, str) and version):
            raise ValueError(f"FunctionReward: version={version!r} must be a non-empty string")
        self.fn = fn
        self.version = version
        fn_name = getattr(fn, "__name__", type(fn).__name__)
        self.name = name or ("reward" if fn_name == "<lambda>" else fn_name)
        self.keyword, self._any_column, self._parameters = _call_form(fn)
        self._unknown = f"unknowable-{uuid.uuid4().hex}"  # the fingerprint when the behaviour cannot be read
        self._warned = False

    def _code_fingerprint(self) -> str | None:
        """The function's behaviour digest, or None (with a warning, once) when it cannot be known."""
        try:
            return callable_fingerprint(self.fn)
        except Unfingerprintable as e:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"FunctionReward '{self.name}': its scores are not cached, because what they depend on cannot be "
                    f"read: {e}. Pass FunctionReward(fn, version='...') (recipe: reward.version) to cache them under "
                    "a version you change whenever the function's behaviour changes.",
                    stacklevel=2,
                )
            return None

    @property
    def cacheable(self) -> bool:  # type: ignore[override]
        return self.version is not None or self._code_fingerprint() is not None

    def fingerprint(self) -> str:
        if self.version is not None:
            target = getattr(self.fn, "__qualname__", type(self.fn).__qualname__)
            return fingerprint(
                "function", getattr(self.fn, "__module__", None), target, "version", self.version
            )
        # Unknowable: a key of this instance only, so that no other run (nor an evaluation cache) ever matches it.
        return fingerprint("function", self._code_fingerprint() or self._unknown)

    def input_columns(self, available: Sequence[str]) -> list[str]:
        extra = [c for c in available if c not in PAIR_COLUMNS and c not in _CALL_NAMES]
        return extra if self._any_column else [c for c in extra if c in self._parameters]

    def score(self, prompts, responses, **columns):
        if not self.keyword:
            return self.fn(list(prompts), list(responses), **columns)
        if self._any_column or "prompts" in self._parameters:
            columns["prompts"] = list(prompts)
        return self.fn(completions=list(responses), **columns)


def _call_form(fn: Callable[..., Any]) -> tuple[bool, bool, frozenset[str]]:
    """How `FunctionReward` calls `fn`: (TRL's keyword convention?, takes `**kwargs`?, the names it can take as
    keyword arguments besides the prompts and responses of the positional form)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins have no signature: call them positionally
        return False, False, frozenset()
    kinds = [p.kind for p in parameters.values()]
    any_column = inspect.Parameter.VAR_KEYWORD in kinds
    positional = [
        name
        for name, p in parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    keyword = "completions" in parameters or (
        any_column and not positional and inspect.Parameter.VAR_POSITIONAL not in kinds
    )
    named = {
        name
        for name, p in parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    if not keyword:
        named -= set(positional[:2])  # they take the prompts and the responses
    return keyword, any_column, frozenset(named)


class ColumnReward(RewardSource):
    """Scores already stored in the dataset: one column for the chosen, one for the rejected response."""

    cacheable = False

    def __init__(self, chosen_column: str, rejected_column: str, name: str | None = None):
        self.chosen_column, self.rejected_column = chosen_column, rejected_column
        self.name = name or chosen_column

    def fingerprint(self) -> str:
        return fingerprint("columns", self.chosen_column, self.rejected_column)

    def score(self, prompts, responses):
        raise TypeError("ColumnReward reads dataset columns: use score_pairs(dataset)")

    def score_pairs(self, dataset: Dataset, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [c for c in (self.chosen_column, self.rejected_column) if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"ColumnReward '{self.name}': column(s) {missing} not in the dataset; "
                f"available columns: {dataset.column_names}"
            )
        n = len(dataset)
        chosen = check_scores(self.name, list(dataset[self.chosen_column]), expected=n, n=n)
        rejected = check_scores(self.name, list(dataset[self.rejected_column]), expected=n, offset=n, n=n)
        return chosen, rejected


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Vocabulary, special tokens and chat template: what decides how a text is tokenised."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        vocab = json.loads(backend.to_str())
        # Truncation and padding are call-time state that any earlier `tokenizer(..., truncation=True)`
        # leaves behind; they do not change how a text is tokenised here (we pass our own settings).
        vocab.pop("truncation", None)
        vocab.pop("padding", None)
    else:
        vocab = sorted(tokenizer.get_vocab().items())
    return fingerprint(
        type(tokenizer).__name__,
        vocab,
        tokenizer.special_tokens_map,
        getattr(tokenizer, "chat_template", None),
    )


def model_fingerprint(model: Any, model_kwargs: dict[str, Any] | None = None) -> str | None:
    """A model given as a path or hub id (`path_fingerprint`: content, or resolved commit at
    `model_kwargs["revision"]`) with the `from_pretrained` arguments it is loaded with (dtype, ...), or an
    in-memory model (`module_fingerprint`: weights, class, config, adapters); `None` stays `None`."""
    if model is None:
        return None
    if not isinstance(model, str | os.PathLike):
        return module_fingerprint(model)
    kwargs = model_kwargs or {}
    return fingerprint(
        path_fingerprint(model, kwargs.get("revision")), {k: str(v) for k, v in kwargs.items()}
    )


def tokenizer_source_fingerprint(tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None) -> str | None:
    """A tokenizer object by its vocabulary and template (`tokenizer_fingerprint`), a path by its files
    (`path_fingerprint`: an edited chat template on disk counts); `None` (the model's own, covered by the model's
    fingerprint) stays `None`. The same before and after a lazily loaded tokenizer is loaded."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer_fingerprint(tokenizer)
    return path_fingerprint(tokenizer)


def _as_messages(prompt: Prompt, response: Response) -> list[dict[str, Any]]:
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    response = [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
    return prompt + response


def render_pair(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, response: Response) -> str:
    """The text a sequence classifier scores: the chat template when the tokenizer has one, else prompt + response."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(_as_messages(prompt, response), tokenize=False)
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError("conversational data needs a tokenizer with a chat template to be scored")
    return prompt + response


class RewardModel(RewardSource):
    """A sequence-classification reward model scoring `prompt + response` with its own tokenizer.

    Args:
        model: a loaded `AutoModelForSequenceClassification`, or a local path / hub id loaded on demand.
        tokenizer: its tokenizer (loaded from `model` when it is a path and this is `None`).
        output: which output to use when the model has several (an index, or a label name from
            `config.id2label`); a model with one output needs none.
        max_length: longer inputs are truncated from the left, so the response is always kept.
        batch_size: scoring batch size.
        model_kwargs: `from_pretrained` keyword arguments when `model` is a path (e.g. `dtype`).
    """

    def __init__(
        self,
        model: PreTrainedModel | str | os.PathLike,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        output: int | str | None = None,
        max_length: int = 1024,
        batch_size: int = 8,
        name: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ):
        self._model_arg, self._tokenizer_arg = model, tokenizer
        self.output, self.max_length, self.batch_size = output, max_length, batch_size
        self.model_kwargs = model_kwargs or {}
        self.name = name or (Path(model).name if isinstance(model, str | os.PathLike) else "reward_model")
        self._model: PreTrainedModel | None = None if isinstance(model, str | os.PathLike) else model
        self._tokenizer: PreTrainedTokenizerBase | None = None
        if self._model is not None:
            self._output_index(self._model.config)  # fail now, not after loading data

    def fingerprint(self) -> str:
        return fingerprint(
            "reward_model",
            model_fingerprint(self._model_arg, self.model_kwargs),
            tokenizer_source_fingerprint(self._tokenizer_arg),
            self.output,
            self.max_length,
        )

    def check(self) -> None:
        """Fails now when the model at the path cannot give this reward (a causal LM; a missing output), reading
        only its config. A LoRA reward model's head, or a hub id's, is only known once loaded."""
        path = Path(str(self._model_arg))
        if self._model is not None or not path.is_dir() or (path / "adapter_config.json").is_file():
            return
        try:
            config = AutoConfig.from_pretrained(str(path))
        except Exception as e:
            raise OSError(f"could not read the config of the reward model {str(path)!r}: {e}") from e
        architectures = config.architectures or []
        if architectures and not any("ForSequenceClassification" in a for a in architectures):
            raise ValueError(
                f"RewardModel '{self.name}': {str(path)!r} is a {', '.join(architectures)} (a causal language model "
                "or another head), not a sequence classifier; valid: a reward model with a score head "
                "(AutoModelForSequenceClassification). A DPO-trained policy is a reward with type: implicit"
            )
        self._output_index(config)

    def _output_index(self, config) -> int:
        num_labels = config.num_labels
        if self.output is None:
            if num_labels != 1:
                raise ValueError(
                    f"RewardModel '{self.name}': the model has {num_labels} outputs "
                    f"({list(config.id2label.values())}); a reward needs exactly 1. "
                    "Pass output=<index or label name> to pick one."
                )
            return 0
        if isinstance(self.output, str):
            label2id = {v: int(k) for k, v in config.id2label.items()}
            if self.output not in label2id:
                raise ValueError(
                    f"RewardModel '{self.name}': output={self.output!r} is not a label of the model; "
                    f"valid: {sorted(label2id)}"
                )
            return label2id[self.output]
        if not 0 <= self.output < num_labels:
            raise ValueError(
                f"RewardModel '{self.name}': output={self.output} out of range 0..{num_labels - 1}"
            )
        return self.output

    @property
    def model(self) -> PreTrainedModel:
        if self._model is None:
            self._model = load_model(AutoModelForSequenceClassification, self._model_arg, **self.model_kwargs)
            self._output_index(self._model.config)
        return self._model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            tok = self._tokenizer_arg
            if tok is None and isinstance(self._model_arg, PreTrainedModel):
                raise ValueError(f"RewardModel '{self.name}': pass the tokenizer of the in-memory model")
            self._tokenizer = (
                tok if isinstance(tok, PreTrainedTokenizerBase) else load_tokenizer(tok or self._model_arg)
            )
        return self._tokenizer

    def score(self, prompts, responses):
        model, tokenizer = self.model.eval(), self.tokenizer
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        texts = [render_pair(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
        scores = []
        for start in range(0, len(texts), self.batch_size):
            enc = _encode(tokenizer, texts[start : start + self.batch_size], self.max_length, model.device)
            logits = model(**enc).logits.float()
            scores.append(logits[:, self._output_index(model.config)].cpu())
        return torch.cat(scores)

    def release(self) -> None:
        if isinstance(self._model_arg, str | os.PathLike):
            self._model = None


class ImplicitReward(RewardSource):
    """A DPO model's implicit reward `beta * (log pi(y|x) - log pi_ref(y|x))`.

    Args:
        model: the DPO-trained policy for this objective: a loaded causal LM or `PeftModel`, or a local path
            (a full model, or a LoRA adapter folder whose base is named in its `adapter_config.json`).
        tokenizer: the policy's tokenizer (loaded from `model` when it is a path and this is `None`).
        beta: the `beta` it was trained with.
        ref_model: the reference policy (model or path). `None` with a LoRA policy means the base model
            with the adapter disabled, the usual case of one base hosting all adapters.
        max_length: sequences are truncated to this many tokens, keeping the start (as TRL's DPO does).
    """

    def __init__(
        self,
        model: PreTrainedModel | str | os.PathLike,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        beta: float = 0.1,
        ref_model: PreTrainedModel | str | os.PathLike | None = None,
        max_length: int = 1024,
        batch_size: int = 8,
        name: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ):
        if not (isinstance(beta, int | float) and math.isfinite(beta) and beta > 0):
            raise ValueError(f"ImplicitReward: beta must be a finite number > 0, got {beta!r}")
        self._model_arg, self._ref_arg, self._tokenizer_arg = model, ref_model, tokenizer
        self.beta, self.max_length, self.batch_size = float(beta), max_length, batch_size
        self.model_kwargs = model_kwargs or {}
        self.name = name or (Path(model).name if isinstance(model, str | os.PathLike) else "implicit_reward")
        self._model = None if isinstance(model, str | os.PathLike) else model
        self._ref = None if isinstance(ref_model, str | os.PathLike) else ref_model
        self._tokenizer = tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else None
        if self._model is not None and ref_model is None and not hasattr(self._model, "disable_adapter"):
            raise ValueError(
                f"ImplicitReward '{self.name}': without ref_model the policy must be a PEFT model "
                "(its base, with the adapter disabled, is the reference); pass ref_model for a full model"
            )

    def fingerprint(self) -> str:
        # From the arguments only, so that loading the model or tokenizer on first use does not change it.
        return fingerprint(
            "implicit_reward",
            model_fingerprint(self._model_arg, self.model_kwargs),
            model_fingerprint(self._ref_arg, self.model_kwargs),
            tokenizer_source_fingerprint(self._tokenizer_arg),
            self.beta,
            self.max_length,
        )

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._tokenizer_arg or self._model_arg)
        return self._tokenizer

    def _models(self) -> tuple[PreTrainedModel, PreTrainedModel | None]:
        if self._model is None:
            self._model = load_model(AutoModelForCausalLM, self._model_arg, **self.model_kwargs)
        if self._ref is None and self._ref_arg is not None:
            self._ref = load_model(AutoModelForCausalLM, self._ref_arg, **self.model_kwargs)
        return self._model.eval(), self._ref.eval() if self._ref is not None else None

    def score(self, prompts, responses):
        model, ref = self._models()
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            batch = _completion_batch(
                self.tokenizer,
                prompts[start : start + self.batch_size],
                responses[start : start + self.batch_size],
                self.max_length,
                model.device,
            )
            policy = sequence_logps(model, batch)
            if ref is not None:
                reference = sequence_logps(ref, batch)
            else:
                with model.disable_adapter():
                    reference = sequence_logps(model, batch)
            scores.append((self.beta * (policy - reference)).float().cpu())
        return torch.cat(scores)

    def release(self) -> None:
        if isinstance(self._model_arg, str | os.PathLike):
            self._model = None
        if isinstance(self._ref_arg, str | os.PathLike):
            self._ref = None


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, device) -> dict:
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"  # keep the response, which is what is being scored
    try:
        enc = tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
            add_special_tokens=False,
        )
    finally:
        tokenizer.truncation_side = side
    return {k: v.to(device) for k, v in enc.items()}


def _completion_batch(tokenizer, prompts, responses, max_length: int, device) -> dict[str, torch.Tensor]:
    """Tokenises like TRL's DPO: the completion is where prompt and prompt+response token ids diverge."""
    rows, masks = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        if is_conversational({"prompt": prompt}):
            prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            full_ids = tokenizer.apply_chat_template(_as_messages(prompt, response), tokenize=True)
            prompt_ids, full_ids = _ids(prompt_ids), _ids(full_ids)
        else:
            if not response.endswith(tokenizer.eos_token):  # TRL appends EOS to standard-format completions
                response = response + tokenizer.eos_token
            # With the tokenizer's special tokens (BOS), as TRL's DPO tokenises standard-format text.
            prompt_ids = tokenizer(prompt)["input_ids"]
            full_ids = tokenizer(prompt + response)["input_ids"]
        cut = common_prefix_length(prompt_ids, full_ids)
        ids = full_ids[:max_length]
        rows.append(ids)
        masks.append([0] * min(cut, len(ids)) + [1] * max(len(ids) - cut, 0))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    completion = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=device)
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def _ids(encoded) -> list[int]:
    # apply_chat_template returns a list, or a BatchEncoding in recent transformers versions
    return list(encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded)


def sequence_logps(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the completion tokens' log-probabilities, one value per row."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = batch["input_ids"][:, 1:]
    token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * batch["completion_mask"][:, 1:]).sum(-1)


def as_reward_source(entry: Any, index: int) -> RewardSource:
    """Accepts a `RewardSource` or a plain callable; anything else is an error naming `margin_rewards[index]`."""
    if isinstance(entry, RewardSource):
        return entry
    if isinstance(entry, PreTrainedModel):
        raise TypeError(
            f"margin_rewards[{index}] is a bare {type(entry).__name__}: wrap it as RewardModel(model, tokenizer) "
            "or ImplicitReward(model, tokenizer, beta=...) so it is scored with the right tokenizer"
        )
    if callable(entry):
        return FunctionReward(entry)
    raise TypeError(
        f"margin_rewards[{index}] has unsupported type {type(entry).__name__}; valid: a callable "
        "fn(prompts, responses) -> floats or TRL-style fn(completions, **kwargs), RewardModel, ImplicitReward, "
        "ColumnReward or another RewardSource"
    )
