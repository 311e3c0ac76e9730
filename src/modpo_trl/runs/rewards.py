"""A recipe's `reward:` / `scorer:` sections as reward sources, with reward models trained first when asked."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import fields
from typing import Any

import numpy as np
from accelerate import PartialState
from datasets import Dataset

from ..rewards.modeling import is_trained, train_reward_model
from ..rewards.sources import (
    ColumnReward,
    FunctionReward,
    ImplicitReward,
    RewardModel,
    RewardSource,
    ScoreError,
)
from ..trainers.margins import CHOSEN_MARGINS, REJECTED_MARGINS, MarginScorer
from .engine import log
from .models import check_loadable
from .recipe import Recipe, RecipeError, RewardConfig


def import_object(spec: str, key: str = "function") -> Any:
    """`package.module:attribute` -> the attribute, with an error naming `key` when it cannot be imported."""
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise RecipeError(f"{key}={spec!r} cannot be imported: {e}") from e
    return obj


def build_reward(cfg: RewardConfig, name: str, key: str = "reward") -> RewardSource:
    """The `RewardSource` a `RewardConfig` describes (models are loaded lazily, on first use)."""
    if cfg.type == "function":
        fn = import_object(cfg.function, f"{key}.function")
        if not callable(fn):
            kind = type(fn).__name__
            raise RecipeError(
                f"{key}.function={cfg.function!r} is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not callable; "
                "valid: a function fn(prompts, responses) -> one float per response"
            )
        return FunctionReward(fn, name=name, version=cfg.version)
    if cfg.type == "columns":
        return ColumnReward(cfg.chosen_column, cfg.rejected_column, name=name)
    common = dict(tokenizer=cfg.tokenizer, max_length=cfg.max_length, batch_size=cfg.batch_size, name=name)
    if cfg.type == "reward_model":
        return RewardModel(cfg.path, output=cfg.output, **common)
    return ImplicitReward(cfg.path, beta=cfg.beta, ref_model=cfg.ref_path, **common)


def train_reward_model_if_needed(train: dict[str, Any], path: str, key: str) -> None:
    """Trains the reward model a `reward.train` section describes into `path`, unless a finished one is there."""
    try:
        inspect.signature(train_reward_model).bind(**train, output_dir=path)
    except TypeError as e:
        raise RecipeError(
            f"{key}.train={train}: {e} (see modpo_trl.rewards.modeling.train_reward_model)"
        ) from e
    if not is_trained(path):
        log(f"{key}: training the reward model into {path} first ...")
        train_reward_model(**train, output_dir=path)  # every process takes part, as in any Trainer run
    PartialState().wait_for_everyone()


def ready_reward(cfg: RewardConfig, name: str, key: str, hint: str = "") -> RewardSource:
    """`build_reward` after training a reward model with a `train:` section that is not trained yet and
    checking that a model path can load (e.g. the adapter of a DPO stage not run yet is found now, not after
    the policy was loaded)."""
    if cfg.type == "reward_model" and cfg.train:
        train_reward_model_if_needed(cfg.train, cfg.path, key)
    if cfg.path:
        check_loadable(cfg.path, f"{key}.path", hint)
    source = build_reward(cfg, name, key)
    if isinstance(source, RewardModel):
        try:
            source.check()  # its config alone says whether it has the output asked for
        except ValueError as e:
            raise RecipeError(f"{key}.path={cfg.path!r}: {e}") from None
    return source


def margin_columns(
    margins: dict[str, tuple[RewardSource, RewardConfig, str]],
    datasets: list[Dataset | None],
    recipe: Recipe,
    config_class: type,
) -> tuple[list[Dataset | None], list[ColumnReward]]:
    """Scores every margin reward on every data set now, before the policy is loaded, so that a reward that fails
    or returns no finite score per response is a recipe error naming it rather than a traceback after loading.

    `margins` maps objective names to (source, its recipe section, the section's key); `datasets` are the train
    and the eval set (or None). Scores go through the
    score cache as the trainer would put them (`training.score_cache_dir`, `use_score_cache`); they come back as
    two columns per objective, with a `ColumnReward` reading them for the trainer.
    """
    defaults = {f.name: f.default for f in fields(config_class)}
    setting = {k: recipe.training.get(k, defaults.get(k)) for k in defaults}
    batch_size = setting["margin_batch_size"] or setting["per_device_eval_batch_size"]
    out, readers = list(datasets), []
    for name, (source, cfg, key) in margins.items():
        scorer = MarginScorer(
            [source], batch_size, "none", setting["score_cache_dir"], setting["use_score_cache"]
        )
        columns = (f"margin:{name}:chosen", f"margin:{name}:rejected")
        for i, (dataset, split) in enumerate(zip(out, ("train", "eval"), strict=True)):
            if dataset is not None:
                scored = _scored(scorer, dataset, split, cfg, key)
                values = [np.asarray(scored[c])[:, 0].tolist() for c in (CHOSEN_MARGINS, REJECTED_MARGINS)]
                out[i] = dataset.add_column(columns[0], values[0]).add_column(columns[1], values[1])
        readers.append(ColumnReward(*columns, name=source.name))
    return out, readers


def _scored(scorer: MarginScorer, dataset: Dataset, split: str, cfg: RewardConfig, key: str) -> Dataset:
    try:
        return scorer.add(dataset, split)
    except ScoreError as e:
        where = f"{key}.function={cfg.function!r}" if cfg.type == "function" else key
        raise RecipeError(f"{where}: {e}") from None
    except Exception as e:
        if cfg.type == "function":  # user code: what it raised is the message
            raise RecipeError(f"{key}.function={cfg.function!r} raised {type(e).__name__}: {e}") from e
        if isinstance(e, ValueError | OSError):  # a missing column, a model that cannot load or score
            raise RecipeError(f"{key}: {e}") from e
        raise
