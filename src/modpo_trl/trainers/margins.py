"""Margin rewards as dataset columns: what MODPO and MOC add to DPO.

A margin reward `r_j(x, y)` depends only on the data, not on the weighting nor on the policy, so it is scored
once per data set before training (or read from the content-addressed score cache, shared by every run of a
sweep) and travels with each pair as two columns, `(n_margins,)` floats for the chosen and the rejected
response. `MarginCollator` turns them into `(B, n_margins)` tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from datasets import Dataset

from ..rewards.cache import ScoreCache, content_fingerprint, default_cache_dir, fingerprint
from ..rewards.sources import RewardSource

CHOSEN_MARGINS, REJECTED_MARGINS = "chosen_margin_rewards", "rejected_margin_rewards"
MARGIN_COLUMNS = (CHOSEN_MARGINS, REJECTED_MARGINS)
PAIR_COLUMNS = ["prompt", "chosen", "rejected"]
MARGIN_NORMALIZATIONS = ("none", "zscore")


class MarginScorer:
    """Adds the margin columns of `sources` to preference data sets.

    The first data set given (the training set) fixes each objective's scale under `normalization`; later ones
    (evaluation sets) reuse it, so a reward means the same in training and evaluation.
    """

    def __init__(
        self,
        sources: Sequence[RewardSource],
        batch_size: int,
        normalization: str = "none",
        cache_dir: str | None = None,
        use_cache: bool = True,
    ):
        self.sources = list(sources)
        self.batch_size = batch_size
        self.normalization = normalization
        self.cache = ScoreCache(cache_dir or default_cache_dir()) if use_cache else None
        self.scale: np.ndarray | None = None

    @classmethod
    def for_config(cls, sources: Sequence[RewardSource], args: Any) -> MarginScorer:
        """Built from a trainer config's margin fields (`MODPOConfig`, `MOCConfig`)."""
        return cls(
            sources,
            args.margin_batch_size or args.per_device_eval_batch_size,
            args.margin_normalization,
            args.score_cache_dir,
            args.use_score_cache,
        )

    def add(self, dataset: Dataset) -> Dataset:
        """`dataset` with (re-)scored margin columns."""
        if CHOSEN_MARGINS in dataset.column_names:  # already scored (e.g. a dataset reused across trainers)
            dataset = dataset.remove_columns(list(MARGIN_COLUMNS))
        n = len(dataset)
        chosen = np.zeros((n, len(self.sources)), dtype=np.float32)
        rejected = np.zeros_like(chosen)
        if self.sources:
            data_key = content_fingerprint(dataset, PAIR_COLUMNS)
            for j, source in enumerate(self.sources):
                chosen[:, j], rejected[:, j] = self._score(source, dataset, data_key)
        if self.scale is None:
            self.scale = margin_scale(chosen, rejected, self.normalization)
        chosen, rejected = chosen / self.scale, rejected / self.scale
        return dataset.add_column(CHOSEN_MARGINS, chosen.tolist()).add_column(
            REJECTED_MARGINS, rejected.tolist()
        )

    def _score(self, source: RewardSource, dataset: Dataset, data_key: str) -> tuple[np.ndarray, np.ndarray]:
        cache = self.cache if source.cacheable else None
        key = fingerprint(data_key, source.fingerprint())
        state = PartialState()
        # The main process scores and fills the cache first; the others then read it instead of scoring again.
        with state.main_process_first():
            cached = cache.load("margins", key) if cache is not None else None
            if cached is None:
                chosen, rejected = source.score_pairs(dataset, self.batch_size)
                source.release()
                cached = {"chosen": chosen.numpy(), "rejected": rejected.numpy()}
                if cache is not None and state.is_main_process:
                    cache.save("margins", key, cached)
        return cached["chosen"], cached["rejected"]


def margin_scale(chosen: np.ndarray, rejected: np.ndarray, normalization: str) -> np.ndarray:
    """The divisor of each objective's rewards: 1 (`"none"`), or their standard deviation over both responses
    (`"zscore"`; the shift cancels in chosen-minus-rejected differences)."""
    if normalization == "none" or chosen.shape[1] == 0:
        return np.ones(chosen.shape[1], dtype=np.float32)
    std = np.concatenate([chosen, rejected]).std(axis=0)
    return np.where(std > 0, std, 1.0).astype(np.float32)  # a constant reward stays as it is


@dataclass
class MarginCollator:
    """Wraps a preference collator and adds the margin reward columns as `(batch, n_margins)` tensors."""

    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        for column in MARGIN_COLUMNS:
            batch[column] = torch.tensor([example[column] for example in examples], dtype=torch.float32)
        return batch
