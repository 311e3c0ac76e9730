from __future__ import annotations

import textwrap
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from datasets import Dataset
from trl import DPOTrainer

from ..rewards.cache import ScoreCache, content_fingerprint, default_cache_dir, fingerprint, module_settings
from ..rewards.sources import RewardSource, as_reward_source
from .margins import CHOSEN_MARGINS, MARGIN_COLUMNS, REJECTED_MARGINS, MarginCollator, MarginScorer
from .modpo_config import MODPOConfig

REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")


class MODPOTrainer(DPOTrainer):
    """Multi-Objective DPO (Zhou et al., 2023, arXiv:2310.03708) as a thin subclass of TRL's `DPOTrainer`.

    Same constructor as `DPOTrainer`, plus `margin_rewards`: one frozen reward source per non-target objective
    (a callable `fn(prompts, responses) -> floats`, `RewardModel`, `ImplicitReward` or `ColumnReward`), in the order
    of `args.weights[1:]`. Margin rewards are scored once before training, stored as dataset columns and cached
    by content; no margin model runs inside a training step.

    How it plugs into DPO: with `c(y) = sum_j w_j r_j(x, y) / beta`,

        (h(y_w) - h(y_l)) / w_0 = (beta / w_0) * [(log pi(y_w) - (log pi_ref(y_w) + c(y_w)))
                                                 - (log pi(y_l) - (log pi_ref(y_l) + c(y_l)))]

    so MODPO is DPO with `beta / w_0` and the reference log-probs shifted by `c`. Only `compute_loss` (the shift),
    `_precompute_ref_logps` (the cache), `evaluate` (margins for new datasets) and the signature columns are
    overridden; every DPO loss detail, metric and distributed path stays TRL's.
    """

    _tag_names = ["trl", "modpo", "modpo_trl"]
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
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        margin_rewards: list[RewardSource | Callable] | None = None,
    ):
        if not isinstance(args, MODPOConfig):
            raise TypeError(f"args must be a MODPOConfig (it carries `weights`), got {type(args).__name__}")
        sources = [as_reward_source(entry, i) for i, entry in enumerate(margin_rewards or [])]
        if len(args.weights) != 1 + len(sources):
            raise ValueError(
                f"weights={args.weights} has {len(args.weights)} entries but there are {len(sources)} margin_rewards: "
                f"weights needs {1 + len(sources)} (the target objective's weight first, then one per margin reward)"
            )
        self.margin_sources = sources
        self.objective_names = args.objective_names or ["target"] + _unique([s.name for s in sources])
        self._score_cache = (
            ScoreCache(args.score_cache_dir or default_cache_dir()) if args.use_score_cache else None
        )
        self._margins = MarginScorer.for_config(sources, args)

        train_dataset = self._with_margins(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self._with_margins(d, f"eval_dataset[{k!r}]") for k, d in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = self._with_margins(eval_dataset, "eval_dataset")

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
        # The parent reads reference log-probs from the batch only when they were precomputed; MODPO always puts
        # (shifted) reference log-probs in the batch, computing them in `compute_loss` when they were not.
        self.precompute_ref_logps = True
        self.data_collator = MarginCollator(self.data_collator)

    # ----------------------------------------------------------------------------------------------- margins
    def _with_margins(self, dataset: Any, field_name: str) -> Dataset:
        """Validates `dataset` and adds the margin reward columns, scored once (or read from the cache)."""
        _check_dataset(dataset, field_name)
        return self._margins.add(dataset)

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        if self._score_cache is None:
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
        cached = [self._score_cache.load("ref_logps", key) if self.accelerator.is_main_process else None]
        broadcast_object_list(cached, from_process=0)
        if cached[0] is None:
            dataset = super()._precompute_ref_logps(dataset, name, batch_size)
            if self.accelerator.is_main_process:
                columns = {c: np.asarray(dataset[c]) for c in ("ref_chosen_logps", "ref_rejected_logps")}
                self._score_cache.save("ref_logps", key, columns)
            return dataset
        for column, values in cached[0].items():
            dataset = dataset.add_column(column, values.tolist())
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in MARGIN_COLUMNS:
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        # A dataset handed to `evaluate` directly needs its margins too (the parent then tokenises it).
        if isinstance(eval_dataset, Dataset) and "prompt_ids" not in eval_dataset.column_names:
            eval_dataset = self._with_margins(eval_dataset, "eval_dataset")
        elif isinstance(eval_dataset, dict):
            eval_dataset = {
                k: self._with_margins(d, f"eval_dataset[{k!r}]") if "prompt_ids" not in d.column_names else d
                for k, d in eval_dataset.items()
            }
        return super().evaluate(
            eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )

    # -------------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        chosen_r, rejected_r = (
            inputs.pop(CHOSEN_MARGINS),
            inputs.pop(REJECTED_MARGINS),
        )  # (B, n_objectives - 1)
        if "ref_chosen_logps" not in inputs:
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = self.compute_ref_log_probs(
                self.ref_model or self.model, inputs
            )
        # h(y) = beta * (log pi - log pi_ref) - w . r  ==  beta * (log pi - (log pi_ref + w . r / beta))
        shift = self._shift_weights.to(chosen_r.device)
        inputs["ref_chosen_logps"] = inputs["ref_chosen_logps"] + chosen_r @ shift
        inputs["ref_rejected_logps"] = inputs["ref_rejected_logps"] + rejected_r @ shift

        mode = "train" if self.model.training else "eval"
        gathered = self.accelerator.gather_for_metrics(chosen_r - rejected_r)
        for j, name in enumerate(self.objective_names[1:]):
            self._metrics[mode][f"margin/{name}"].append(gathered[:, j].mean().item())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _check_dataset(dataset: Any, field_name: str) -> None:
    if dataset is None:
        raise ValueError(f"{field_name} is required")
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"{field_name} must be a datasets.Dataset (margins are scored once over the whole dataset), "
            f"got {type(dataset).__name__}"
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{field_name} is missing column(s) {missing}; it has {dataset.column_names}. MODPO needs explicit "
            "'prompt', 'chosen' and 'rejected' columns (for implicit-prompt data, map trl.extract_prompt first)"
        )
    if len(dataset) == 0:
        raise ValueError(f"{field_name} is empty: it needs at least one (prompt, chosen, rejected) row")


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out
