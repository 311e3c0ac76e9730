"""A recipe's `reward:` / `scorer:` sections as reward sources, with reward models trained first when asked."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from accelerate import PartialState

from ..rewards.modeling import is_trained, train_reward_model
from ..rewards.sources import ColumnReward, FunctionReward, ImplicitReward, RewardModel, RewardSource
from .engine import log
from .models import check_loadable
from .recipe import RecipeError, RewardConfig


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
        return FunctionReward(import_object(cfg.function, f"{key}.function"), name=name, version=cfg.version)
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
    return build_reward(cfg, name, key)
