"""MOC: one preference-conditioned policy for the whole Pareto front, RL-free, as a thin `DPOTrainer` subclass."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, IterableDataset, concatenate_datasets
from torch.utils.data import Sampler
from trl import DPOTrainer

from ..conditioning.preference import check_preference, condition_prompt, sample_preferences
from ..conditioning.svd_lora import (
    PreferenceLoRA,
    active_adapter,
    apply_preference,
    attach,
    gated_lora_rank,
    is_lora,
)
from ..rewards.sources import RewardSource, as_reward_source
from .margins import (
    MARGIN_COLUMNS,
    MarginCollator,
    MarginScorer,
    pair_differences,
    with_explicit_prompt,
    without_margins,
)
from .mgda import descent_coefficients
from .moc_config import MOCConfig

OBJECTIVE, OBJECTIVE_ID, PREFERENCE = "objective", "objective_id", "preference"
PAIR = "pair_index"  # the copies of one pair under several preferences (preference_augmentation) share it
# The prompt may be implicit in chosen/rejected (whole conversations): it is extracted as TRL does.
REQUIRED_COLUMNS = ("chosen", "rejected", OBJECTIVE)
# MODPO divides by the preference mass on the objectives with pairs: kept >= the precision of a rendered preference.
MIN_DATA_WEIGHT = 0.01
# Added to the variance of the achieved rewards in their z-scores: they are all ~0 at the start of training.
CONTROL_VARIANCE_FLOOR = 1e-2


class MOCTrainer(DPOTrainer):
    """A preference-conditioned multi-objective DPO trainer (see [`MOCConfig`] for the loss and the solvers).

    Same constructor as `DPOTrainer`, except:
      - `train_dataset` (and `eval_dataset`) hold the pairs of every objective that has pairs, with an `objective`
        column naming the objective that labelled each pair (`objective_pairs({name: pairs, ...})` builds it), in
        any of TRL's forms (standard, conversational, implicit prompt; `Dataset` or streaming `IterableDataset`). A
        `preference` column, if present, fixes each row's `w`; otherwise `w` is sampled per row (`MOCConfig`; for a
        stream, from the row's index and the seed). A stream's labels are checked as its rows arrive.
      - `margin_rewards`: `{objective name: frozen reward source}` for the objectives without pairs (a callable
        `fn(prompts, responses)` or TRL's `fn(prompts=..., completions=..., **columns)`, `RewardModel`,
        `ImplicitReward` or `ColumnReward`). They are scored on the unconditioned pairs with MODPOTrainer's code and
        cache (so a MODPO sweep's scores are reused), once or per batch as `margin_scoring` says.

    Each row's `w` reaches the model through its prompt (`condition_prompt`, before tokenisation), through the
    LoRA adapter's gates (`modpo_trl.conditioning.svd_lora`, set row by row for every forward pass) or both
    (`MOCConfig.conditioning`). Per pair b of objective i with preference w, `delta_b` the chosen-minus-rejected
    policy/reference log-ratio, `dr_j` the chosen-minus-rejected margin reward of objective j (0 for objectives with
    pairs), `D` the objectives with pairs and `t = max(sum_{m in D} w_m, 0.01)`:

        z_b   = (beta * delta_b - sum_j w_j dr_j) / t           # MODPO's logit with target mass t
        l_b   = -log sigmoid(z_b)                               # "sigmoid"; TRL's other pair losses likewise
        u_b   = t * w_i / sum_{m in D} w_m                      # = w_i without margins, = t with one objective in D
        L_i   = sum_{b of i} u_b l_b / sum_{b of i} u_b
        linear loss = sum_b u_b l_b / sum_b u_b  (+ control_weight * C)

    so `w = e_k` gives exactly DPO on objective k's pairs, and with one objective in `D` every `w` gives MODPO's loss
    (weighted by its target weight, which keeps each pair's gradient bounded as that weight goes to 0). The
    controllability loss `C` (`zscore_control_loss` or `paired_control_loss`) asks the achieved implicit reward
    `beta * delta_b` of each objective to rise with that objective's weight; the solver (`MOCConfig.moo_solver`)
    combines the `L_i` and `C`.
    """

    _tag_names = ["trl", "moc", "modpo_trl"]
    _name = "MOC"
    _paper = {
        "title": "One Model for All: Multi-Objective Controllable Language Models",
        "id": "2604.04497",
        "citation": textwrap.dedent("""\
            @article{he2026one,
                title   = {{One Model for All: Multi-Objective Controllable Language Models}},
                author  = {Qiang He and Yucheng Yang and Tianyi Zhou and Meng Fang and Mykola Pechenizkiy and Setareh Maghsudi},
                year    = 2026,
                journal = {arXiv preprint arXiv:2604.04497},
            }"""),
    }

    def __init__(
        self,
        model,
        ref_model=None,
        args: MOCConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        margin_rewards: Mapping[str, RewardSource | Callable] | None = None,
    ):
        if not isinstance(args, MOCConfig):
            raise TypeError(
                f"args must be a MOCConfig (it carries objective_names), got {type(args).__name__}"
            )
        if compute_metrics is not None:
            raise ValueError(
                "compute_metrics is not supported by MOCTrainer (its losses are computed per pair)"
            )
        names = list(args.objective_names)
        margin_rewards = dict(margin_rewards or {})
        unknown = [k for k in margin_rewards if k not in names]
        if unknown:
            raise ValueError(f"margin_rewards has objective(s) {unknown} not in objective_names={names}")
        self.objective_names = names
        self.margin_names = [n for n in names if n in margin_rewards]
        self.margin_sources = [as_reward_source(margin_rewards[n], repr(n)) for n in self.margin_names]
        # Scored with MODPOTrainer's code and cache keys, so a MODPO sweep's margins are reused.
        self._margins = MarginScorer.for_config(self.margin_sources, args)
        self._has_pairs = torch.tensor([n not in margin_rewards for n in names])
        # Adapter conditioning: the layout is checked before anything expensive (scoring, reference log-probs).
        self.preference_layout = None
        if args.conditioning == "auto":  # resolved once, so that every later reader sees what was trained
            args.conditioning = "adapter" if is_lora(model, peft_config) else "prompt"
        if args.conditioning != "prompt":
            rank = gated_lora_rank(model, peft_config, args.conditioning)
            self.preference_layout = PreferenceLoRA.for_rank(names, rank, args.preference_rank)

        train_dataset = self._prepare_preferences(train_dataset, "train_dataset", args, args.seed)
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                k: self._prepare_preferences(d, f"eval_dataset[{k!r}]", args, args.seed + 1)
                for k, d in eval_dataset.items()
            }
        elif eval_dataset is not None:
            eval_dataset = self._prepare_preferences(eval_dataset, "eval_dataset", args, args.seed + 1)

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
        self.data_collator = PreferenceCollator(MarginCollator(self.data_collator))
        if self.preference_layout is not None:
            attach(self.model, self.preference_layout, active_adapter(self.model))

    # ------------------------------------------------------------------------------------------------ data
    def _prepare_preferences(
        self, dataset: Any, field_name: str, args: MOCConfig, seed: int
    ) -> Dataset | IterableDataset:
        """Checks `dataset`, scores the margins, gives each row its `w` and conditions its prompt on it."""
        names = self.objective_names
        _check_dataset(dataset, field_name)
        dataset = with_explicit_prompt(dataset, args.dataset_num_proc, field_name)
        if isinstance(dataset, IterableDataset):
            if args.preference_augmentation > 1:
                raise ValueError(
                    f"preference_augmentation={args.preference_augmentation} repeats every pair of a map-style "
                    f"data set, but {field_name} is streamed (an IterableDataset); use preference_augmentation=1 "
                    "or a map-style data set"
                )
            return self._margins.add(dataset, field_name).map(
                self._stream_row,
                with_indices=True,
                fn_kwargs={"field_name": field_name, "args": args, "seed": seed},
            )
        labels = set(dataset[OBJECTIVE])
        unknown = sorted(labels - set(names))
        if unknown:
            raise ValueError(f"{field_name}: column {OBJECTIVE!r} has value(s) {unknown}; valid: {names}")
        both = sorted(labels & set(self.margin_names))
        if both:
            raise ValueError(
                f"{field_name} has pairs for {both}, which also have a margin reward: give an objective pairs "
                "(it is trained with DPO on them) or a margin reward (MODPO's margin), not both"
            )
        if field_name == "train_dataset":
            missing = [n for n in names if n not in labels and n not in self.margin_names]
            if missing:
                raise ValueError(
                    f"objective(s) {missing} have no pairs in train_dataset (column {OBJECTIVE!r}) and no entry in "
                    "margin_rewards: every objective needs one or the other"
                )
        dataset = self._margins.add(dataset, field_name)
        ids = [names.index(label) for label in dataset[OBJECTIVE]]
        dataset = dataset.remove_columns([c for c in (OBJECTIVE_ID, PAIR) if c in dataset.column_names])
        dataset = dataset.add_column(OBJECTIVE_ID, ids).add_column(PAIR, list(range(len(dataset))))
        if PREFERENCE in dataset.column_names:  # the caller's preferences: no sampling, no copies
            for i, w in enumerate(dataset[PREFERENCE]):
                check_preference(w, len(names), f"{field_name}[{i}][{PREFERENCE!r}]")
        else:
            copies = args.preference_augmentation
            if copies > 1:  # the copies of a pair are consecutive rows: the sampler keeps them together
                dataset = dataset.select(np.repeat(np.arange(len(dataset)), copies))
            weights = _draw_preferences(args, len(dataset), seed, group_size=copies)
            dataset = dataset.add_column(PREFERENCE, weights.tolist())
        if (
            args.conditioning == "adapter"
        ):  # the prompt stays as it is: w reaches the model through the adapter
            return dataset
        return dataset.map(
            lambda row: {"prompt": condition_prompt(row["prompt"], row[PREFERENCE], names)},
            desc=f"Conditioning {field_name} prompts on their preference",
        )

    def _stream_row(
        self, row: dict[str, Any], index: int, field_name: str, args: MOCConfig, seed: int
    ) -> dict[str, Any]:
        """`_prepare_preferences` for one row of a stream, checked as it arrives."""
        names = self.objective_names
        label = row[OBJECTIVE]
        if label not in names or label in self.margin_names:
            why = (
                "has a margin reward (pairs or a margin reward, not both)" if label in names else "is unknown"
            )
            raise ValueError(
                f"{field_name}: row {index} has {OBJECTIVE}={label!r}, which {why}; valid: {names}"
            )
        if row.get(PREFERENCE) is not None:
            w = check_preference(row[PREFERENCE], len(names), f"{field_name}[{index}][{PREFERENCE!r}]")
        else:
            row_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
            w = _draw_preferences(args, 1, row_seed)[0].tolist()
        prompt = (
            row["prompt"] if args.conditioning == "adapter" else condition_prompt(row["prompt"], w, names)
        )
        return {"prompt": prompt, OBJECTIVE_ID: names.index(label), PREFERENCE: w, PAIR: index}

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in (*MARGIN_COLUMNS, OBJECTIVE_ID, PREFERENCE, PAIR):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def compute_ref_log_probs(self, model, inputs):
        # TRL passes every batch entry it does not know to the model's forward: only model inputs may reach it.
        model_inputs = {
            k: v for k, v in without_margins(inputs).items() if k not in (PREFERENCE, OBJECTIVE_ID, PAIR)
        }
        return super().compute_ref_log_probs(model, model_inputs)

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        # Under adapter conditioning the copies of a pair (preference_augmentation) have the same tokens, since w is
        # not in the prompt, and the reference never runs the adapter: each pair is scored once.
        if self.args.conditioning != "adapter" or not isinstance(dataset, Dataset):
            return super()._precompute_ref_logps(dataset, name, batch_size)
        pair_ids = dataset[PAIR]
        first_row = {}
        for row, pair in enumerate(pair_ids):
            first_row.setdefault(pair, row)
        if len(first_row) == len(dataset):
            return super()._precompute_ref_logps(dataset, name, batch_size)
        scored = super()._precompute_ref_logps(dataset.select(list(first_row.values())), name, batch_size)
        position = {pair: i for i, pair in enumerate(first_row)}
        for column in ("ref_chosen_logps", "ref_rejected_logps"):
            values = scored[column]
            dataset = dataset.add_column(column, [values[position[pair]] for pair in pair_ids])
        return dataset

    def _get_train_sampler(self, train_dataset=None):
        if self.args.preference_augmentation == 1:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return PairGroupSampler(dataset[PAIR], seed=self.args.data_seed or self.args.seed)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Saves the adapter as `DPOTrainer` does, plus the preference layout of an adapter-conditioned one."""
        super().save_model(output_dir, _internal_call)
        if self.preference_layout is not None and self.args.should_save:
            self.preference_layout.save(output_dir or self.args.output_dir, self.args.conditioning == "both")

    def training_step(self, *args, **kwargs):
        try:
            return super().training_step(*args, **kwargs)
        finally:  # a forward outside a step must not run at a batch's preferences
            self._unset_preferences()

    def prediction_step(self, *args, **kwargs):
        try:
            return super().prediction_step(*args, **kwargs)
        finally:
            self._unset_preferences()

    def _unset_preferences(self) -> None:
        if self.preference_layout is not None:
            apply_preference(self.model, None)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        # A dataset handed to `evaluate` directly needs margins and conditioned prompts too.
        def prepare(dataset, name):
            if "prompt_ids" in next(iter(dataset)):
                return dataset
            return self._prepare_preferences(dataset, name, self.args, self.args.seed + 1)

        if isinstance(eval_dataset, Dataset | IterableDataset):
            eval_dataset = prepare(eval_dataset, "eval_dataset")
        elif isinstance(eval_dataset, dict):
            eval_dataset = {k: prepare(d, f"eval_dataset[{k!r}]") for k, d in eval_dataset.items()}
        return super().evaluate(
            eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )

    # ------------------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("MOCTrainer does not return model outputs (compute_metrics is not supported)")
        inputs = dict(inputs)
        preferences, objective_ids, pair_ids = (
            inputs.pop(PREFERENCE),
            inputs.pop(OBJECTIVE_ID),
            inputs.pop(PAIR),
        )
        chosen_r, rejected_r = self._margins.pop(inputs)  # NaN: a reward that does not apply to the pair
        if "ref_chosen_logps" in inputs:
            ref_chosen, ref_rejected = inputs.pop("ref_chosen_logps"), inputs.pop("ref_rejected_logps")
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model or self.model, inputs)
        if self.preference_layout is not None:
            # Adapter conditioning: each row of [chosen; rejected] runs at its own w. Left set until the step is
            # over (`training_step`, `prediction_step`): activation checkpointing re-runs the forward in backward.
            apply_preference(model, torch.cat([preferences, preferences]))
        logps, outputs = self._sequence_logps(model, inputs)  # (2B,): the tensor MGDA works on
        chosen_logps, rejected_logps = logps.chunk(2)
        chosen_logratios, rejected_logratios = chosen_logps - ref_chosen, rejected_logps - ref_rejected
        delta = chosen_logratios - rejected_logratios
        # Margin rewards of the objectives without pairs, as (B, n) chosen-minus-rejected differences (0 elsewhere).
        has_pairs = self._has_pairs.to(preferences.device)
        margin_diffs = torch.zeros_like(preferences)
        margin_diffs[:, ~has_pairs] = pair_differences(chosen_r, rejected_r).to(preferences)

        chosen_rewards, rejected_rewards, t = margin_adjusted_rewards(
            chosen_logratios, rejected_logratios, preferences, margin_diffs, has_pairs, self.beta
        )
        lengths = inputs["completion_mask"].sum(dim=1).float().chunk(2)
        per_pair = pair_losses(chosen_rewards, rejected_rewards, self.beta / t, lengths, self.args)
        losses, linear = moc_losses(per_pair, preferences, objective_ids, has_pairs)
        args = self.args
        if args.control_weight > 0:
            achieved = self.beta * delta
            if args.control_loss == "paired":
                control = paired_control_loss(
                    achieved, preferences, objective_ids, pair_ids, margin_diffs, has_pairs
                )
            else:
                control = zscore_control_loss(achieved, preferences, objective_ids, margin_diffs, has_pairs)
            if control is not None:
                losses["control"] = args.control_weight * control
                linear["control"] = 1.0
        keys = list(losses)
        if args.moo_solver != "linear" and logps.requires_grad and len(keys) > 1:
            # MGDA-UB on the gradients w.r.t. the (2B,) log-probs: k small vectors, no extra pass through the model.
            grads = torch.stack([torch.autograd.grad(losses[k], logps, retain_graph=True)[0] for k in keys])
            weights = None
            if (
                args.moo_solver == "weighted_mgda"
            ):  # the linear shares, with control_weight for C (inside its loss)
                weights = torch.tensor([args.control_weight if k == "control" else linear[k] for k in keys])
            coefficients = descent_coefficients(
                grads, args.mgda_normalization, args.mgda_max_iter, args.mgda_tol, weights=weights
            )
            alphas = dict(zip(keys, coefficients, strict=True))
        else:
            alphas = {k: torch.tensor(linear[k]) for k in keys}
        # No weighted pair and no control signal in this batch (e.g. w = e_k on other objectives' pairs): no update.
        loss = sum((alphas[k].to(losses[k]) * losses[k] for k in keys), start=0.0 * logps.sum())

        self._log_metrics(
            chosen_logps, rejected_logps, ref_chosen, ref_rejected, outputs, inputs, losses, alphas
        )
        return loss

    def _sequence_logps(self, model, inputs):
        """Summed completion log-probs of the policy, `[chosen; rejected]`, with TRL's fused LM head."""
        model_kwargs = {k: v for k, v in inputs.items() if k != "completion_mask"}
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True, use_cache=False)
        seq_len = completion_mask.size(1) - 1  # prompt-learning PEFT prepends virtual tokens to the outputs
        return outputs.log_probs[:, -seq_len:].sum(dim=1), outputs

    def _log_metrics(
        self, chosen_logps, rejected_logps, ref_chosen, ref_rejected, outputs, inputs, losses, alphas
    ):
        mode = "train" if self.model.training else "eval"
        gather = self.accelerator.gather_for_metrics
        chosen_rewards = self.beta * (chosen_logps - ref_chosen).detach()
        rejected_rewards = self.beta * (rejected_logps - ref_rejected).detach()
        mask = inputs["completion_mask"][:, 1:].bool()
        entropy = outputs.entropy[:, -mask.size(1) :].detach()
        metrics = {
            "rewards/chosen": gather(chosen_rewards).mean(),
            "rewards/rejected": gather(rejected_rewards).mean(),
            "rewards/accuracies": gather((chosen_rewards > rejected_rewards).float()).mean(),
            "rewards/margins": gather(chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": gather(chosen_logps.detach()).mean(),
            "logps/rejected": gather(rejected_logps.detach()).mean(),
            "entropy": gather(entropy[mask].sum()).sum() / gather(mask.sum()).sum().clamp(min=1),
        }
        # Per-objective values: a loss left out of this batch is NaN (averaged over the processes that have it), its
        # coefficient 0.
        keys = [*range(len(self.objective_names)), "control"]
        values = [losses[k].item() if k in losses else float("nan") for k in keys]
        if "control" in losses:
            values[-1] /= self.args.control_weight  # logged unweighted
        coefficients = [float(alphas[k]) if k in alphas else 0.0 for k in keys]
        gathered = gather(torch.tensor([[values, coefficients]], device=chosen_logps.device))
        values, coefficients = gathered[:, 0].nanmean(0), gathered[:, 1].mean(0)
        for j, name in enumerate([*self.objective_names, "control"]):
            if not torch.isnan(values[j]):
                metrics["moc/control" if name == "control" else f"moc/loss_{name}"] = values[j]
            metrics[f"moc/alpha_{name}"] = coefficients[j]
        for key, value in metrics.items():
            self._metrics[mode][key].append(float(value))


def margin_adjusted_rewards(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    preferences: torch.Tensor,
    margin_diffs: torch.Tensor,
    has_pairs: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each pair's MODPO rewards `h / t` of the chosen and the rejected response, and the target mass `t`.

    `h(y) = beta * log-ratio(y) - w . (r(y) - (r(y_w) + r(y_l)) / 2)`: the margin rewards of the objectives without
    pairs centred on the pair (as in `MODPOTrainer`), so that `h(y_w) - h(y_l)` is the `MOCTrainer` docstring's
    `t * z_b`. `*_logratios`: (B,); `preferences`, `margin_diffs`: (B, n) (chosen-minus-rejected margin rewards);
    `has_pairs`: (n,) bool.
    """
    t = preferences[:, has_pairs].sum(dim=1).clamp(min=MIN_DATA_WEIGHT)
    half_margin = (preferences * margin_diffs).sum(dim=1) / 2
    return (beta * chosen_logratios - half_margin) / t, (beta * rejected_logratios + half_margin) / t, t


def pair_losses(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    beta: torch.Tensor,
    lengths: tuple[torch.Tensor, torch.Tensor],
    args: MOCConfig,
) -> torch.Tensor:
    """Each pair's loss under `args.loss_type` (summed with `args.loss_weights`): TRL's per-pair formulas with its
    implicit rewards `beta * log-ratio` replaced by `chosen_rewards` / `rejected_rewards`, (B,) each.

    `beta`: (B,) the loss's beta of each pair (for the losses TRL writes on log-ratios: log-ratio = reward / beta);
    `lengths`: the chosen and rejected completions' token counts (IPO and sigmoid_norm normalise by them).
    """
    r_c, r_r = chosen_rewards, rejected_rewards
    z, eps = r_c - r_r, args.label_smoothing
    n_c, n_r = (n.clamp(min=1.0) for n in lengths)
    total = torch.zeros_like(z)
    for loss_type, weight in zip(
        args.loss_type, args.loss_weights or [1.0] * len(args.loss_type), strict=True
    ):
        if loss_type == "sigmoid":
            loss = -F.logsigmoid(z)
        elif loss_type == "hinge":
            loss = torch.relu(1 - z)
        elif loss_type == "ipo":
            loss = ((r_c / n_c - r_r / n_r) / beta - 1 / (2 * beta)) ** 2
        elif loss_type == "exo_pair":
            loss = torch.sigmoid(z) * (F.logsigmoid(z) - np.log1p(-eps)) + torch.sigmoid(-z) * (
                F.logsigmoid(-z) - np.log(eps)
            )
        elif loss_type == "nca_pair":
            loss = -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)
        elif loss_type == "robust":
            loss = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        elif loss_type == "bco_pair":
            loss = -F.logsigmoid(r_c) - F.logsigmoid(-r_r)
        elif loss_type == "sppo_hard":
            loss = ((r_c - 0.5) / beta) ** 2 + ((r_r + 0.5) / beta) ** 2
        elif loss_type == "apo_zero":
            loss = 1 - torch.sigmoid(r_c) + torch.sigmoid(r_r)
        elif loss_type == "apo_down":
            loss = torch.sigmoid(r_c) + 1 - torch.sigmoid(z)
        elif loss_type == "discopop":
            modulation = torch.sigmoid(z / args.discopop_tau)
            loss = -F.logsigmoid(z) * (1 - modulation) + torch.exp(-z) * modulation
        elif loss_type == "sigmoid_norm":
            loss = -F.logsigmoid(r_c / n_c - r_r / n_r)
        else:  # MOCConfig only admits PAIR_LOSS_TYPES
            raise ValueError(f"loss_type {loss_type!r} has no per-pair form")
        total = total + weight * loss
    return total


def moc_losses(
    pair_loss: torch.Tensor,
    preferences: torch.Tensor,
    objective_ids: torch.Tensor,
    has_pairs: torch.Tensor,
) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
    """Per-objective losses `L_i` (objectives with weighted pairs in the batch) and their linear coefficients
    (each objective's share of the batch's weight), as in the `MOCTrainer` docstring.

    `pair_loss`: (B,) each pair's loss `l_b`; `preferences`: (B, n); `objective_ids`: (B,) the objective labelling
    each pair; `has_pairs`: (n,) bool.
    """
    data_mass = preferences[:, has_pairs].sum(dim=1)
    own = preferences.gather(1, objective_ids[:, None]).squeeze(1)
    share = torch.where(data_mass > 0, own / data_mass.clamp(min=1e-12), 1.0 / int(has_pairs.sum()))
    weight = share * data_mass.clamp(min=MIN_DATA_WEIGHT)
    losses, mass = {}, {}
    for i in objective_ids.unique().tolist():
        rows = objective_ids == i
        if weight[rows].sum() > 0:
            mass[i] = weight[rows].sum()
            losses[i] = (weight[rows] * pair_loss[rows]).sum() / mass[i]
    total = sum(mass.values())
    return losses, {i: float(m / total) for i, m in mass.items()}


def zscore_control_loss(
    achieved: torch.Tensor,
    preferences: torch.Tensor,
    objective_ids: torch.Tensor,
    margin_diffs: torch.Tensor,
    has_pairs: torch.Tensor,
) -> torch.Tensor | None:
    """Mean over objectives of `MSE(zscore(achieved reward), zscore(w_i))` across the batch, or `None` when no
    objective has 2 rows with different weights. `achieved`: (B,) implicit reward margins `beta * delta`."""

    def zscore(x, variance_floor=0.0):
        return (x - x.mean()) / (x.var(unbiased=False) + variance_floor).sqrt()

    terms = []
    for i in range(preferences.size(1)):
        if has_pairs[i]:
            rows, sign = objective_ids == i, torch.ones_like(achieved)
        else:  # a reward-only objective: every pair, oriented by which response its reward prefers
            sign = margin_diffs[:, i].sign()
            rows = sign != 0
        target = preferences[rows, i]
        if target.numel() >= 2 and target.std() > 1e-6:
            terms.append(
                ((zscore(achieved[rows] * sign[rows], CONTROL_VARIANCE_FLOOR) - zscore(target)) ** 2).mean()
            )
    return torch.stack(terms).mean() if terms else None


def paired_control_loss(
    achieved: torch.Tensor,
    preferences: torch.Tensor,
    objective_ids: torch.Tensor,
    pair_ids: torch.Tensor,
    margin_diffs: torch.Tensor,
    has_pairs: torch.Tensor,
) -> torch.Tensor | None:
    """The same pair under two preferences should be preferred more strongly under the one that weighs its
    objective more: over every two rows `a`, `b` with the same `pair_ids` and every objective `i` with
    `w_a,i > w_b,i`, the mean of `-log sigmoid(s_i (m_a - m_b))` weighted by `w_a,i - w_b,i`, where `m` is
    `achieved` (the implicit reward margins) and `s_i` is 1 on objective i's own pairs, the sign of `dr_i` for an
    objective with only a reward (0: no term). `None` when the batch has no such two rows."""
    same = pair_ids[:, None] == pair_ids[None, :]
    difference = achieved[:, None] - achieved[None, :]  # m_a - m_b
    total, mass = achieved.new_zeros(()), achieved.new_zeros(())
    for i in range(preferences.size(1)):
        sign = (objective_ids == i).to(achieved) if has_pairs[i] else margin_diffs[:, i].sign().to(achieved)
        gap = (preferences[:, i, None] - preferences[None, :, i]).clamp(min=0).to(achieved)
        weight = gap * same * (sign != 0)[:, None]  # the copies of a pair share its sign
        total = total + (weight * F.softplus(-sign[:, None] * difference)).sum()
        mass = mass + weight.sum()
    return total / mass if mass > 0 else None


class PairGroupSampler(Sampler[int]):
    """Shuffles the pairs, keeping the rows of one pair (its copies under several preferences) consecutive, so that
    they share a batch. Seeded by `seed` and the epoch (`set_epoch`), as an interrupted run resumes."""

    def __init__(self, pair_ids: list[int], seed: int = 0):
        self.groups: dict[int, list[int]] = {}
        for row, pair in enumerate(pair_ids):
            self.groups.setdefault(pair, []).append(row)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(rows) for rows in self.groups.values())

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(list(self.groups))
        for pair in order:
            yield from self.groups[int(pair)]


@dataclass
class PreferenceCollator:
    """Wraps a preference collator and adds each row's preference `(B, n)`, objective id and pair index `(B,)`."""

    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        batch[PREFERENCE] = torch.tensor([e[PREFERENCE] for e in examples], dtype=torch.float32)
        batch[OBJECTIVE_ID] = torch.tensor([e[OBJECTIVE_ID] for e in examples], dtype=torch.long)
        batch[PAIR] = torch.tensor([e[PAIR] for e in examples], dtype=torch.long)
        return batch


def _draw_preferences(args: MOCConfig, num: int, seed: int, group_size: int = 1) -> np.ndarray:
    """`num` preferences drawn as `args` says (`MOCConfig.preference_sampling`), reproducibly from `seed`; each
    `group_size` consecutive rows (the copies of one pair) get distinct ones."""
    return sample_preferences(
        num,
        len(args.objective_names),
        method=args.preference_sampling,
        dirichlet_alpha=args.dirichlet_alpha,
        grid_steps=args.grid_steps,
        heldout=args.heldout_preferences,
        heldout_radius=args.heldout_radius,
        seed=seed,
        group_size=group_size,
    )


def objective_pairs(datasets: Mapping[str, Dataset]) -> Dataset:
    """`{objective name: its preference pairs}` -> one data set with an `objective` column, for `MOCTrainer`.

    Columns all the data sets share are kept (a `ColumnReward` margin reads its scores from them).
    """
    if not datasets:
        raise ValueError("objective_pairs needs at least one {objective name: pairs} entry")
    for name, pairs in datasets.items():
        _check_dataset(pairs, f"the pairs of {name!r}", columns=("prompt", "chosen", "rejected"))
    shared = set.intersection(*(set(d.column_names) for d in datasets.values())) - {OBJECTIVE}
    parts = []
    for name, pairs in datasets.items():
        pairs = pairs.remove_columns([c for c in pairs.column_names if c not in shared])
        parts.append(pairs.add_column(OBJECTIVE, [name] * len(pairs)))
    kinds = {name: isinstance(p[0]["prompt"], list) for name, p in zip(datasets, parts, strict=True)}
    if len(set(kinds.values())) > 1:
        raise ValueError(
            f"objectives mix conversational and string prompts ({kinds}); use one format for all"
        )
    return concatenate_datasets(parts)


def _check_dataset(dataset: Any, field_name: str, columns: tuple[str, ...] = REQUIRED_COLUMNS) -> None:
    if dataset is None:
        raise ValueError(f"{field_name} is required")
    if isinstance(dataset, IterableDataset):  # a stream is checked as its rows arrive
        return
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"{field_name} must be a datasets.Dataset or IterableDataset, got {type(dataset).__name__}"
        )
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        hint = " (the objective that labelled each pair; objective_pairs({name: pairs}) adds it)"
        raise ValueError(
            f"{field_name} is missing column(s) {missing}; it has {dataset.column_names}, MOC needs {list(columns)}"
            + (hint if OBJECTIVE in missing else "")
        )
    if len(dataset) == 0:
        raise ValueError(f"{field_name} is empty: it needs at least one (prompt, chosen, rejected) row")
