"""Margin rewards: what MODPO and MOC add to DPO.

A margin reward `r_j(x, y)` depends only on the data, not on the weighting nor on the policy, so by default it is
scored once per data set before training (or read from the content-addressed score cache, shared by every run of a
sweep) and travels with each pair as two columns, `(n_margins,)` floats for the chosen and the rejected response.
Data that cannot be scored ahead (a streaming `IterableDataset`) or rewards that must be scored afresh each time
(`margin_scoring="per_batch"`: stochastic rewards, APIs) instead carry each row's raw values in one column and are
scored inside the training step. `MarginCollator` puts either into the batch, `MarginScorer.pop` takes them out as
`(B, n_margins)` tensors. A reward's `None` (not applicable) is NaN here: the pair has no margin for that objective.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from datasets import Dataset, IterableDataset
from trl.data_utils import extract_prompt

from ..rewards.cache import ScoreCache, content_fingerprint, default_cache_dir, fingerprint
from ..rewards.sources import PAIR_COLUMNS, RewardSource

CHOSEN_MARGINS, REJECTED_MARGINS = "chosen_margin_rewards", "rejected_margin_rewards"
MARGIN_INPUTS = "margin_inputs"  # a row's raw values, for margins scored inside the step
MARGIN_COLUMNS = (CHOSEN_MARGINS, REJECTED_MARGINS, MARGIN_INPUTS)
MARGIN_NORMALIZATIONS = ("none", "zscore")
MARGIN_SCORINGS = ("precompute", "per_batch")


def check_margin_fields(args: Any) -> None:
    """Validates the margin fields `MODPOConfig` and `MOCConfig` share."""
    for name, valid in (("margin_scoring", MARGIN_SCORINGS), ("margin_normalization", MARGIN_NORMALIZATIONS)):
        if getattr(args, name) not in valid:
            raise ValueError(f"{name}={getattr(args, name)!r} is not valid; valid: {list(valid)}")
    if args.margin_scoring == "per_batch" and args.margin_normalization != "none":
        raise ValueError(
            f"margin_normalization={args.margin_normalization!r} needs each reward's spread over the training set "
            "before training, which margin_scoring='per_batch' does not score; use margin_normalization='none' or "
            "margin_scoring='precompute'"
        )


class MarginScorer:
    """Adds the margins of `sources` to preference data sets and takes them out of collated batches.

    The first data set scored ahead (the training set) fixes each objective's scale under `normalization`; later
    ones (evaluation sets, batches scored in the step) reuse it, so a reward means the same everywhere.
    """

    def __init__(
        self,
        sources: Sequence[RewardSource],
        batch_size: int,
        normalization: str = "none",
        cache_dir: str | None = None,
        use_cache: bool = True,
        scoring: str = "precompute",
    ):
        self.sources = list(sources)
        self.batch_size = batch_size
        self.normalization = normalization
        self.scoring = scoring
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
            args.margin_scoring,
        )

    def add(self, dataset: Dataset | IterableDataset, name: str) -> Dataset | IterableDataset:
        """`dataset` (with a `prompt` column) ready for margins: scored columns for a map-style data set under
        `scoring="precompute"`, else each row's raw values, scored per batch by `pop`."""
        if isinstance(dataset, Dataset):
            dataset = dataset.remove_columns([c for c in MARGIN_COLUMNS if c in dataset.column_names])
            if self.scoring == "precompute" or not self.sources:
                return self._precompute(dataset, name)
        elif not self.sources:  # (MOC without margin objectives) nothing to score: empty margins
            return dataset.map(lambda row: {CHOSEN_MARGINS: [], REJECTED_MARGINS: []})
        if self.scale is None:
            if self.normalization != "none":
                raise ValueError(
                    f"margin_normalization={self.normalization!r} needs each reward's spread over the training set "
                    f"before training, but the {name} dataset is scored per batch (streaming data or "
                    "margin_scoring='per_batch'); use margin_normalization='none' or a map-style training set"
                )
            self.scale = np.ones(len(self.sources), dtype=np.float32)
        kwargs = (
            {"desc": f"Keeping the {name} dataset's values for margin scoring"}
            if isinstance(dataset, Dataset)
            else {}
        )
        return dataset.map(
            lambda row: {MARGIN_INPUTS: {k: v for k, v in row.items() if k not in MARGIN_COLUMNS}}, **kwargs
        )

    def pop(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Removes the margins from a collated batch: `(B, n)` chosen and rejected rewards (NaN: not applicable),
        scored now when the batch carries raw rows."""
        if MARGIN_INPUTS not in inputs:
            return inputs.pop(CHOSEN_MARGINS), inputs.pop(REJECTED_MARGINS)
        rows = Dataset.from_list(inputs.pop(MARGIN_INPUTS))
        chosen, rejected = self._scores(rows, lambda source: source.score_pairs(rows, self.batch_size, False))
        return torch.from_numpy(chosen / self.scale), torch.from_numpy(rejected / self.scale)

    def _precompute(self, dataset: Dataset, name: str) -> Dataset:
        chosen, rejected = self._scores(dataset, lambda source: self._cached_score(source, dataset))
        for j, source in enumerate(self.sources):
            if np.isnan(chosen[:, j]).all() and np.isnan(rejected[:, j]).all():
                warnings.warn(
                    f"margin reward '{source.name}' returned None (not applicable) for every response of the {name} "
                    "dataset: it has no effect there",
                    stacklevel=2,
                )
        if self.scale is None:
            self.scale = margin_scale(chosen, rejected, self.normalization)
        chosen, rejected = chosen / self.scale, rejected / self.scale
        return dataset.add_column(CHOSEN_MARGINS, chosen.tolist()).add_column(
            REJECTED_MARGINS, rejected.tolist()
        )

    def _scores(self, dataset: Dataset, score: Callable) -> tuple[np.ndarray, np.ndarray]:
        chosen = np.zeros((len(dataset), len(self.sources)), dtype=np.float32)
        rejected = np.zeros_like(chosen)
        for j, source in enumerate(self.sources):
            chosen[:, j], rejected[:, j] = (np.asarray(s) for s in score(source))
        return chosen, rejected

    def _cached_score(self, source: RewardSource, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
        cache = self.cache if source.cacheable else None
        # The key covers every column the source reads: the pair, and the columns a reward function takes.
        columns = list(PAIR_COLUMNS) + source.input_columns(dataset.column_names)
        key = fingerprint(content_fingerprint(dataset, columns), source.fingerprint())
        state = PartialState()
        # The main process scores and fills the cache first; the others then read it instead of scoring again.
        with state.main_process_first():
            # NaN: the source does not apply to that response (None)
            names, rows = ("chosen", "rejected"), len(dataset)
            cached = cache.load("margins", key, names, rows, allow_nan=True) if cache is not None else None
            if cached is None:
                chosen, rejected = source.score_pairs(dataset, self.batch_size)
                source.release()
                cached = {"chosen": chosen.numpy(), "rejected": rejected.numpy()}
                if cache is not None and state.is_main_process:
                    cache.save("margins", key, cached)
        return cached["chosen"], cached["rejected"]


def margin_scale(chosen: np.ndarray, rejected: np.ndarray, normalization: str) -> np.ndarray:
    """The divisor of each objective's rewards: 1 (`"none"`), or their standard deviation over both responses
    (`"zscore"`, ignoring responses the reward does not apply to; the shift cancels in chosen-minus-rejected
    differences)."""
    if normalization == "none" or chosen.shape[1] == 0:
        return np.ones(chosen.shape[1], dtype=np.float32)
    with warnings.catch_warnings():  # a reward that applies to no response has no spread: kept as it is
        warnings.simplefilter("ignore", RuntimeWarning)
        std = np.nanstd(np.concatenate([chosen, rejected]), axis=0)
    return np.where(std > 0, std, 1.0).astype(np.float32)  # a constant reward stays as it is


def pair_differences(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """`(B, n)` chosen-minus-rejected margin rewards, 0 for a pair an objective's reward does not apply to."""
    return (chosen - rejected).nan_to_num(0.0)


def without_margins(inputs: dict[str, Any]) -> dict[str, Any]:
    """A batch without its margin entries: what may reach a model's forward."""
    return {k: v for k, v in inputs.items() if k not in MARGIN_COLUMNS}


@dataclass
class MarginCollator:
    """Wraps a preference collator and adds the margins: the scored columns as `(batch, n_margins)` tensors, or
    the rows' raw values (a list of dicts) to be scored in the step."""

    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        if MARGIN_INPUTS in examples[0]:
            batch[MARGIN_INPUTS] = [example[MARGIN_INPUTS] for example in examples]
        else:
            for column in (CHOSEN_MARGINS, REJECTED_MARGINS):
                batch[column] = torch.tensor([example[column] for example in examples], dtype=torch.float32)
        return batch


def with_explicit_prompt(
    dataset: Dataset | IterableDataset, num_proc: int | None, name: str
) -> Dataset | IterableDataset:
    """`dataset` with a `prompt` column: TRL's first preparation step (`extract_prompt` for implicit-prompt data,
    whole conversations in `chosen`/`rejected`), done first so that margins score, and MOC conditions, the same
    prompt and responses TRL trains on (TRL then skips it)."""
    if "prompt" in next(iter(dataset)):
        return dataset
    if isinstance(dataset, IterableDataset):  # `IterableDataset.map` takes neither `num_proc` nor `desc`
        return dataset.map(extract_prompt)
    return dataset.map(extract_prompt, num_proc=num_proc, desc=f"Extracting prompt from {name} dataset")
