from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from datasets import Dataset, IterableDataset
from trl import DPOTrainer
from trl.trainer.utils import get_config_model_id

from ..rewards.cache import ScoreCache, content_fingerprint, default_cache_dir, fingerprint, module_settings
from ..rewards.sources import RewardSource, as_reward_source
from .margins import (
    MARGIN_COLUMNS,
    MarginCollator,
    MarginScorer,
    pair_differences,
    with_explicit_prompt,
    without_margins,
)
from .modpo_config import MODPOConfig


class MODPOTrainer(DPOTrainer):
    """Multi-Objective DPO (Zhou et al., 2023, arXiv:2310.03708) as a thin subclass of TRL's `DPOTrainer`.

    Same constructor as `DPOTrainer` (`args=None` gives a default `MODPOConfig`, `weights=[1.0]`), plus
    `margin_rewards`: one frozen reward source per non-target objective, in the order of `args.weights[1:]`: a
    callable (`fn(prompts, responses)` or TRL's `fn(prompts=..., completions=..., **columns)`, returning floats, or
    `None` where the reward does not apply: that pair then has no margin for that objective), `RewardModel`,
    `ImplicitReward` or `ColumnReward`. Without margin rewards every step is TRL's, unchanged.

    How it plugs into DPO: with `m(y) = sum_j w_j (r_j(x, y) - (r_j(x, y_w) + r_j(x, y_l)) / 2) / beta`, the
    margin centred on the pair,

        h(y) / w_0 = (beta / w_0) * (log pi(y) - (log pi_ref(y) + m(y)))

    so MODPO is DPO with `beta / w_0` and the reference log-probs shifted by `m`: TRL computes every loss type and
    metric on these margin-adjusted implicit rewards. Overridden: `_prepare_dataset` (margins are scored where TRL
    prepares each data set, after extracting implicit prompts), `compute_loss` (the shift),
    `compute_ref_log_probs` (margins never reach the model), `_precompute_ref_logps` (the content-addressed
    cache) and the signature columns.
    """

    _tag_names = ["trl", "dpo", "modpo", "modpo_trl"]
    _name = "MODPO"
    _paper = {
        "title": "Beyond One-Preference-Fits-All Alignment: Multi-Objective Direct Preference Optimization",
        "id": "2310.03708",
        "citation": textwrap.dedent("""\
            @inproceedings{zhou2024beyond,
                title     = {{Beyond One-Preference-Fits-All Alignment: Multi-Objective Direct Preference Optimization}},
                author    = {Zhanhui Zhou and Jie Liu and Jing Shao and Xiangyu Yue and Chao Yang and Wanli Ouyang and Yu Qiao},
                year      = 2024,
                booktitle = {Findings of the Association for Computational Linguistics: ACL 2024},
            }"""),
    }

    def __init__(
        self,
        model,
        ref_model=None,
        args: MODPOConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        margin_rewards: list[RewardSource | Callable] | None = None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = MODPOConfig(f"{model_name.split('/')[-1]}-MODPO")
        elif not isinstance(args, MODPOConfig):
            raise TypeError(
                f"args must be a MODPOConfig (a DPOConfig with `weights`), got {type(args).__name__}; "
                "MODPOConfig(**your DPOConfig fields) trains exactly as DPO"
            )
        sources = [as_reward_source(entry, i) for i, entry in enumerate(margin_rewards or [])]
        if len(args.weights) != 1 + len(sources):
            raise ValueError(
                f"weights={args.weights} has {len(args.weights)} entries but there are {len(sources)} margin_rewards: "
                f"weights needs {1 + len(sources)} (the target objective's weight first, then one per margin reward)"
            )
        _check_dataset(train_dataset, "train_dataset")
        for name, dataset in _named_eval_datasets(eval_dataset):
            _check_dataset(dataset, name)
        if sources and _is_vision(train_dataset):
            raise ValueError(
                "margin_rewards are not supported with vision datasets (an 'image' or 'images' column): TRL prepares "
                "those on the fly, so there is no step where margins could be scored"
            )
        self.margin_sources = sources
        self.objective_names = args.objective_names or ["target"] + _unique([s.name for s in sources])
        self._score_cache = (
            ScoreCache(args.score_cache_dir or default_cache_dir()) if args.use_score_cache else None
        )
        # Set before the parent's __init__, which prepares the data sets through `_prepare_dataset`.
        self._margins = MarginScorer.for_config(sources, args) if sources else None

        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        # DPO's loss on beta / w_0 with shifted reference log-probs is MODPO's loss (see the class docstring).
        self.beta = args.beta / args.weights[0]
        self._shift_weights = torch.tensor(args.weights[1:], dtype=torch.float32) / args.beta
        if self._margins is not None:
            self.data_collator = MarginCollator(self.data_collator)

    # ----------------------------------------------------------------------------------------------- margins
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Margins are scored on the pairs as the data gives them: after extracting an implicit prompt (as TRL does
        # first), before TRL appends EOS to standard-format responses and tokenises. Prepared data sets (handed
        # back to `evaluate`) already carry theirs.
        if self._margins is not None and "prompt_ids" not in _first_row(dataset):
            dataset = with_explicit_prompt(dataset, args.dataset_num_proc, dataset_name)
            dataset = self._margins.add(dataset, dataset_name)
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._margins is not None:
            self._signature_columns += [c for c in MARGIN_COLUMNS if c not in self._signature_columns]

    def compute_ref_log_probs(self, model, inputs):
        # TRL passes every batch entry it does not know to the model's forward; margins are not model inputs.
        return super().compute_ref_log_probs(model, without_margins(inputs))

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        if self._score_cache is None or not isinstance(dataset, Dataset):
            return super()._precompute_ref_logps(dataset, name, batch_size)
        # TRL's hash covers the weights (taken before any sharding); equal weights under another config (e.g.
        # rms_norm_eps) give other log-probs, so the model's settings are part of the key too.
        key = fingerprint(
            content_fingerprint(dataset, ["prompt_ids", "chosen_ids", "rejected_ids"]),
            self._precompute_model_hash,
            module_settings(self.ref_model or self.model),
            self.args.max_length,
            self.args.truncation_mode,
            self.ld_alpha,
        )
        # Every rank must take the same branch: the parent's precompute gathers across processes.
        columns = ("ref_chosen_logps", "ref_rejected_logps")
        main = self.accelerator.is_main_process
        cached = [self._score_cache.load("ref_logps", key, columns, len(dataset)) if main else None]
        broadcast_object_list(cached, from_process=0)
        if cached[0] is None:
            dataset = super()._precompute_ref_logps(dataset, name, batch_size)
            if self.accelerator.is_main_process:
                self._score_cache.save("ref_logps", key, {c: np.asarray(dataset[c]) for c in columns})
            return dataset
        for column, values in cached[0].items():
            dataset = dataset.add_column(column, values.tolist())
        return dataset

    # -------------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._margins is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        chosen_r, rejected_r = self._margins.pop(inputs)  # (B, n_objectives - 1), NaN: not applicable
        device = inputs["input_ids"].device
        diffs = chosen_r.to(device) - rejected_r.to(device)
        self._log_margins(diffs)
        shift_weights = self._shift_weights.to(device)
        if not shift_weights.any():  # margins weighted 0: DPO, exactly
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not self.precompute_ref_logps:
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = self.compute_ref_log_probs(
                self.ref_model or self.model, inputs
            )
        # h(y) = beta * (log pi - log pi_ref) - w . r  ==  beta * (log pi - (log pi_ref + w . r / beta)), with r
        # centred on the pair: the chosen response's reference moves up by half the margin, the rejected one's down.
        half = pair_differences(chosen_r, rejected_r).to(device) @ shift_weights / 2
        inputs["ref_chosen_logps"] = inputs["ref_chosen_logps"] + half
        inputs["ref_rejected_logps"] = inputs["ref_rejected_logps"] - half
        with self._reference_from_batch():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    @contextlib.contextmanager
    def _reference_from_batch(self) -> Iterator[None]:
        """Makes TRL's loss read the (shifted) reference log-probs from the batch, as it does when they were
        precomputed; restored after, so `evaluate` keeps TRL's own choice."""
        precomputed = self.precompute_ref_logps
        self.precompute_ref_logps = True
        try:
            yield
        finally:
            self.precompute_ref_logps = precomputed

    def _log_margins(self, diffs: torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        gathered = self.accelerator.gather_for_metrics(diffs)
        for j, name in enumerate(self.objective_names[1:]):
            applicable = gathered[:, j][~gathered[:, j].isnan()]
            if applicable.numel():
                self._metrics[mode][f"margin/{name}"].append(applicable.mean().item())


def _named_eval_datasets(eval_dataset: Any) -> list[tuple[str, Any]]:
    if isinstance(eval_dataset, dict):
        return [(f"eval_dataset[{k!r}]", d) for k, d in eval_dataset.items()]
    return [] if eval_dataset is None else [("eval_dataset", eval_dataset)]


def _check_dataset(dataset: Any, field_name: str) -> None:
    """What TRL does not check itself, before any model is loaded; TRL's own checks (a missing or wrongly typed
    `train_dataset`) keep TRL's messages."""
    if not isinstance(dataset, Dataset):  # a stream is only read when training starts
        return
    missing = [c for c in ("chosen", "rejected") if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{field_name} is missing column(s) {missing}; it has {dataset.column_names}. Preference data needs "
            "'chosen' and 'rejected' columns, and a 'prompt' column unless the prompt is implicit in both"
        )
    if len(dataset) == 0:
        raise ValueError(f"{field_name} is empty: it needs at least one (prompt, chosen, rejected) row")


def _first_row(dataset: Dataset | IterableDataset) -> dict[str, Any]:
    return next(iter(dataset))


def _is_vision(dataset: Any) -> bool:
    return isinstance(dataset, Dataset | IterableDataset) and bool(
        {"image", "images"} & set(_first_row(dataset))
    )


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out
