from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from transformers import TrainingArguments
from trl import DPOConfig, SFTConfig

from ..conditioning.directions import (
    DEFAULT_SYSTEM_PROMPT,
    angle_grid,
    direction,
    direction_weights,
    unit_vector,
)


@dataclass
class DPAConfig(SFTConfig):
    r"""
    Configuration class for the [`DPATrainer`]: the fields below plus every [`~trl.SFTConfig`] field, which
    configures the update that ends each iteration (`learning_rate`, `num_train_epochs`,
    `per_device_train_batch_size`, `max_length`, ...; with `update="dpo"` they are copied into a
    [`~trl.DPOConfig`], see `dpo_config`). `output_dir` holds one folder per iteration (`iter-<k>/data.jsonl`,
    `iter-<k>/adapter`); `seed` seeds the directions, the sampling and the training.

    DPA (Wang et al., 2024, arXiv:2402.18571) is preference-conditioned rejection-sampling fine-tuning: each
    iteration samples a direction `v` for every prompt, states it in the system prompt
    (`modpo_trl.conditioning.directions.render_direction`), samples `num_samples` responses from the current
    policy, keeps the one with the largest `v . r` under the multi-objective reward `r`, and fine-tunes the policy
    on the kept responses with `v` in the prompt (`update="sft"`). `update="dpo"` (directional DPO) trains on
    the best against the worst response instead, so the update carries the contrast the direction asks for.

    The paper's settings: `update="sft"`, `reward_scale="raw"` (its reward model rates on 0-100 already),
    `directions_per_prompt=1`, the default `system_prompt`.

    Parameters:
        attribute_names (`list[str]`, *optional*):
            The reward attributes, in the order of the direction vectors (e.g. `["helpfulness", "verbosity"]`).
            They must be outputs of the reward (labels in a reward model's `config.id2label`). Defaults to the
            reward's attributes.
        update (`str`, *optional*, defaults to `"dpo"`):
            How each iteration updates the policy: `"sft"`, the paper's rejection-sampling fine-tuning (TRL's
            `SFTTrainer` on the best response per prompt and direction), or `"dpo"`, directional DPO (TRL's
            `DPOTrainer` on the pair best vs worst response by `v . r`). The DPO reference is the policy the
            iteration starts from (the base model in iteration 1, then the previous iteration's adapter, as in
            iterative DPO), so each round moves a `beta`-controlled step from where sampling happened.
        conditioning (`str`, *optional*, defaults to `"auto"`):
            How the policy is told `v`. `"prompt"`: the system prompt states it (the paper's way). `"adapter"`: the
            LoRA adapter is gated by it, as MOC's adapter conditioning (`modpo_trl.conditioning.svd_lora`: one block
            of `r // k` units per attribute, each scaled by the direction's stated weight divided by their sum,
            `directions.direction_gates`), in sampling and in the update, and the prompt stays as it is. `"both"`:
            the two at once. Gating needs `update="dpo"` and directions with no negative component; the saved
            adapter holds `preference_lora.json` and runs with an explicit preference. `"auto"`: `"adapter"` where
            gating can be used (a LoRA adapter is trained, `update="dpo"`, every training and evaluation direction
            non-negative, e.g. `angle_range_degrees=[0, 90]`), else `"prompt"` (e.g. the default [-45, 45], whose
            negative weights a gate cannot express); the trainer writes the resolved value back.
        beta (`float`, *optional*, defaults to `0.1`):
            `update="dpo"`: DPO's beta (the strength of the tie to the reference), as in [`~trl.DPOConfig`].
        min_pair_gap (`float`, *optional*, defaults to `0.0`):
            `update="dpo"`: a pair is trained on only when its best and worst `v . r` differ by at least this
            much (on the `reward_scale`: with `"minmax"`, points out of 100) and by more than 0, so near-ties,
            whose order is noise, do not teach a direction.
        dpo_kwargs (`dict`, *optional*):
            `update="dpo"`: other [`~trl.DPOConfig`] fields for the update (e.g. `{"loss_type": ["sigmoid",
            "sft"], "loss_weights": [1.0, 1.0]}`); training-loop fields come from this config itself.
        reward_scale (`str`, *optional*, defaults to `"minmax"`):
            The scale `v . r` is computed on. `"minmax"`: each attribute is mapped linearly to 0-100 over the
            iteration's sampled responses (its lowest score 0, its highest 100), the scale the system prompt's
            integer weights `round(100 v_i)` refer to, so "relevance*71 + brevity*71" weighs both attributes'
            observed ranges equally, whatever the units of the reward. `"raw"`: the reward's own values (the
            paper's reward model already rates every attribute on 0-100). Either way the weights are the
            stated ones, `round(100 v_i) / 100`: the selection is exactly the rating the prompt asks for.
        num_samples (`int`, *optional*, defaults to `4`):
            Responses sampled per prompt and direction (N); the best under `v . r` is kept. N = 1 is plain
            conditioned SFT on the policy's own samples (and gives no DPO pairs unless `share_candidates`).
        directions_per_prompt (`int`, *optional*, defaults to `1`):
            Directions each prompt is sampled under per iteration (M): the training directions, in their order,
            are cut into M contiguous strata and one is drawn from each, so a prompt is seen under distinct,
            spread directions (with 2 attributes: a low and a high angle for M = 2).
        share_candidates (`bool`, *optional*, defaults to `False`):
            With M > 1: each direction of a prompt chooses among all M x N responses sampled for that prompt (under
            any of its directions), not only its own N, so the same answers are ranked differently under
            different directions and that contrast is in the data.
        iterations (`int`, *optional*, defaults to `2`):
            Rejection-sampling rounds; each starts from the previous round's adapter.
        angle_range_degrees (`list[float]`, *optional*, defaults to `[-45, 45]`):
            Two attributes: training directions are `(cos t, sin t)` for angles `t` in this range. The paper
            suggests keeping the first attribute's weight >= 0.71, i.e. |t| <= 45.
        angle_step_degrees (`float`, *optional*, defaults to `5.0`):
            Spacing of the training angles `lo, lo + step, ..., hi` (the prompt states integer weights, so
            finer steps add little).
        heldout_angles (`list[float]`, *optional*, defaults to `[]`):
            Angles never sampled in training (removed from the grid), to evaluate unseen preferences.
        directions (`list[list[float]]`, *optional*):
            Explicit training directions (each normalised to unit length) instead of the angle grid; required
            when there are not exactly 2 attributes.
        eval_angles (`list[float]`, *optional*):
            Angles evaluated by `modpo_trl.evaluate`. Defaults to 7 angles evenly spread over
            `angle_range_degrees` plus the held-out angles. With `directions`, those are evaluated.
        system_prompt (`str`, *optional*):
            The text before `Your response should maximize weighted rating = ...` in the system prompt. Defaults
            to the released DPA model's.
        prompts_per_iteration (`int`, *optional*):
            Prompts used per iteration: consecutive slices of one seeded shuffle of the prompts, so iterations see
            different prompts while there are enough. `None`: every prompt in every iteration.
        temperature (`float`, *optional*, defaults to `0.7`), top_p (`float`, *optional*, defaults to `1.0`),
        max_new_tokens (`int`, *optional*, defaults to `256`):
            Sampling settings of the N responses.
        generation_batch_size (`int`, *optional*, defaults to `8`):
            Prompts per generation call (each yields `num_samples` sequences).
    """

    attribute_names: list[str] | None = field(
        default=None, metadata={"help": "Reward attributes, in the order of the direction vectors."}
    )
    update: str = field(
        default="dpo",
        metadata={"help": "Update per iteration: 'sft' (rejection-sampling SFT) or 'dpo' (directional DPO)."},
    )
    conditioning: str = field(
        default="auto",
        metadata={"help": "How v reaches the policy: 'prompt', 'adapter' (gated LoRA), 'both' or 'auto'."},
    )
    beta: float = field(default=0.1, metadata={"help": "update='dpo': DPO's beta."})
    min_pair_gap: float = field(
        default=0.0,
        metadata={"help": "update='dpo': least v . r gap between best and worst to train on a pair."},
    )
    dpo_kwargs: dict[str, Any] | None = field(
        default=None, metadata={"help": "update='dpo': other DPOConfig fields (loss_type, ...)."}
    )
    reward_scale: str = field(
        default="minmax",
        metadata={
            "help": "'minmax': attributes mapped to 0-100 over the iteration's samples; 'raw': as scored."
        },
    )
    num_samples: int = field(
        default=4, metadata={"help": "Responses sampled per prompt and direction (N >= 1)."}
    )
    directions_per_prompt: int = field(
        default=1, metadata={"help": "Directions each prompt is sampled under per iteration (M >= 1)."}
    )
    share_candidates: bool = field(
        default=False, metadata={"help": "Each direction chooses among all M x N samples of its prompt."}
    )
    iterations: int = field(default=2, metadata={"help": "Rejection-sampling fine-tuning rounds."})
    angle_range_degrees: list[float] = field(
        default_factory=lambda: [-45.0, 45.0],
        metadata={"help": "Range of training angles t, directions (cos t, sin t) (2 attributes)."},
    )
    angle_step_degrees: float = field(default=5.0, metadata={"help": "Spacing of the training angles."})
    heldout_angles: list[float] = field(
        default_factory=list, metadata={"help": "Angles never sampled in training."}
    )
    directions: list[list[float]] | None = field(
        default=None, metadata={"help": "Explicit training directions instead of the angle grid."}
    )
    eval_angles: list[float] | None = field(
        default=None, metadata={"help": "Angles to evaluate; default: 7 over the range + held-out angles."}
    )
    system_prompt: str = field(
        default=DEFAULT_SYSTEM_PROMPT, metadata={"help": "System text before the stated weighted rating."}
    )
    prompts_per_iteration: int | None = field(
        default=None, metadata={"help": "Prompts per iteration (a new seeded slice each time); None: all."}
    )
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (> 0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold in (0, 1]."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest sampled response, in tokens."})
    generation_batch_size: int = field(default=8, metadata={"help": "Prompts per generation call."})

    def __post_init__(self):
        super().__post_init__()
        check_dpa_fields(self)

    def training_directions(self) -> list[tuple[float, ...]]:
        """The pool training directions are sampled from (held-out angles excluded)."""
        return training_directions(self)

    def dpo_config(self, **overrides: Any) -> DPOConfig:
        """The `DPOConfig` of a `update="dpo"` iteration: this config's training-loop fields (every
        `TrainingArguments` field) and the fields `SFTConfig` and `DPOConfig` share (`max_length`,
        `truncation_mode`, `padding_free`, ...; not SFT's `loss_type`), `beta`, `dpo_kwargs`, then `overrides`."""
        values = {name: getattr(self, name) for name in _COPIED_TO_DPO}
        return DPOConfig(**{**values, "beta": self.beta, **(self.dpo_kwargs or {}), **overrides})

    def evaluation_directions(self) -> list[tuple[float, ...]]:
        """The directions `modpo_trl.evaluate` compares, held-out ones included."""
        return evaluation_directions(self)


# Defined by DPAConfig itself (not inherited from SFTConfig): what `check_dpa_fields` covers.
DPA_FIELDS = tuple(DPAConfig.__annotations__)
UPDATES, REWARD_SCALES = ("sft", "dpo"), ("minmax", "raw")
GATED = ("adapter", "both")  # the conditionings that gate the adapter by the direction
CONDITIONINGS = ("auto", "prompt", *GATED)


def _init_fields(cls: type) -> set[str]:
    return {f.name for f in fields(cls) if f.init}


# What a DPO iteration takes from the DPAConfig: the training loop, and the fields SFT and DPO mean alike (SFT's
# `loss_type` is its token loss, DPO's the preference loss). `dpo_kwargs` may set every other DPOConfig field.
_COPIED_TO_DPO = sorted(
    _init_fields(TrainingArguments) | ((_init_fields(SFTConfig) & _init_fields(DPOConfig)) - {"loss_type"})
)
_DPO_ONLY = sorted(_init_fields(DPOConfig) - set(_COPIED_TO_DPO) - {"beta"})


def dpa_defaults() -> dict[str, Any]:
    """The DPA fields' defaults, for checking a recipe's `training:` section without building the SFT config
    (which validates hardware settings such as `bf16` that a dry run on another machine must not)."""
    defaults = {}
    for f in fields(DPAConfig):
        if f.name in DPA_FIELDS:
            defaults[f.name] = f.default_factory() if callable(f.default_factory) else f.default
    return defaults


def check_dpa_fields(cfg: Any) -> None:
    """Validates the DPA fields of `cfg` (a `DPAConfig`, or any object with those attributes)."""
    for name in (
        "num_samples",
        "iterations",
        "max_new_tokens",
        "generation_batch_size",
        "directions_per_prompt",
    ):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if cfg.update not in UPDATES:
        raise ValueError(f"update={cfg.update!r} is not valid; valid: {list(UPDATES)}")
    if cfg.conditioning not in CONDITIONINGS:
        raise ValueError(f"conditioning={cfg.conditioning!r} is not valid; valid: {list(CONDITIONINGS)}")
    if cfg.conditioning in GATED and cfg.update != "dpo":
        raise ValueError(
            f"conditioning={cfg.conditioning!r} gates the adapter row by row, which only update='dpo' does; got "
            f"update={cfg.update!r} (valid with it: conditioning='prompt')"
        )
    if cfg.reward_scale not in REWARD_SCALES:
        raise ValueError(f"reward_scale={cfg.reward_scale!r} is not valid; valid: {list(REWARD_SCALES)}")
    if not isinstance(cfg.share_candidates, bool):
        raise ValueError(f"share_candidates={cfg.share_candidates!r} must be true or false")
    if not (_is_number(cfg.beta) and cfg.beta > 0):
        raise ValueError(f"beta={cfg.beta!r} must be a finite number > 0")
    if not (_is_number(cfg.min_pair_gap) and cfg.min_pair_gap >= 0):
        raise ValueError(f"min_pair_gap={cfg.min_pair_gap!r} must be a finite number >= 0")
    _check_dpo_kwargs(cfg.dpo_kwargs)
    ppi = cfg.prompts_per_iteration
    if ppi is not None and (isinstance(ppi, bool) or not isinstance(ppi, int) or ppi < 1):
        raise ValueError(f"prompts_per_iteration={ppi!r} must be an integer >= 1, or None for every prompt")
    if not (
        isinstance(cfg.temperature, int | float) and math.isfinite(cfg.temperature) and cfg.temperature > 0
    ):
        raise ValueError(f"temperature={cfg.temperature!r} must be a number > 0 (N samples need sampling)")
    if not (isinstance(cfg.top_p, int | float) and 0 < cfg.top_p <= 1):
        raise ValueError(f"top_p={cfg.top_p!r} must be in (0, 1]")
    names = cfg.attribute_names
    if names is not None:
        if isinstance(names, str) or not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"attribute_names={names!r} must be a non-empty list of attribute names")
        if len(set(names)) != len(names):
            raise ValueError(f"attribute_names={list(names)} has duplicates")
    pool = training_directions(cfg)
    if cfg.directions_per_prompt > len(pool):
        raise ValueError(
            f"directions_per_prompt={cfg.directions_per_prompt} exceeds the {len(pool)} training directions"
        )
    negative = negative_directions(cfg)
    if cfg.conditioning in GATED and negative:
        raise ValueError(
            f"conditioning={cfg.conditioning!r} gates the adapter by each direction's weights, which must be >= 0, "
            f"but the training or evaluation directions include {negative[:3]}; use angle_range_degrees (and "
            "heldout_angles, eval_angles) within [0, 90], or conditioning='prompt'"
        )


def negative_directions(cfg: Any) -> list[list[float]]:
    """The training and evaluation directions with a negative weight, which an adapter gate cannot express."""
    evaluated = [*training_directions(cfg), *evaluation_directions(cfg)]
    return [[round(x, 4) for x in v] for v in evaluated if min(direction_weights(v)) < 0]


def auto_conditioning(cfg: Any, lora: bool) -> str:
    """`conditioning="auto"` resolved: the gated adapter where it can be used (measured to follow the direction
    far better than the prompt on the quickstart, docs/dpa.md), else the prompt."""
    return "adapter" if lora and cfg.update == "dpo" and not negative_directions(cfg) else "prompt"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_dpo_kwargs(kwargs: Any) -> None:
    if kwargs is None:
        return
    if not isinstance(kwargs, dict):
        raise ValueError(f"dpo_kwargs={kwargs!r} must be a mapping of DPOConfig fields, or None")
    for key in kwargs:
        if key == "beta":
            raise ValueError("dpo_kwargs.beta: set `beta`, a DPAConfig field, instead")
        if key in _COPIED_TO_DPO:
            raise ValueError(
                f"dpo_kwargs.{key} is a field of this config itself (copied into the DPOConfig); set `{key}`"
            )
        if key not in _DPO_ONLY:
            raise ValueError(f"dpo_kwargs.{key} is not a DPOConfig field; valid: {_DPO_ONLY}")


def training_directions(cfg: Any) -> list[tuple[float, ...]]:
    """`cfg.directions` (normalised), else `(cos t, sin t)` over the angle grid without held-out angles."""
    k = len(cfg.attribute_names) if cfg.attribute_names is not None else None
    if cfg.directions is not None:
        if isinstance(cfg.directions, str) or not cfg.directions:
            raise ValueError(f"directions={cfg.directions!r} must be a non-empty list of vectors, or None")
        return [unit_vector(v, k, f"directions[{i}]") for i, v in enumerate(cfg.directions)]
    if k is not None and k != 2:
        raise ValueError(
            f"attribute_names has {k} entries {list(cfg.attribute_names)}: angles describe 2 attributes; "
            f"give the training directions as `directions` (vectors of {k} numbers)"
        )
    return [
        direction(t) for t in angle_grid(cfg.angle_range_degrees, cfg.angle_step_degrees, cfg.heldout_angles)
    ]


def evaluation_angles(cfg: Any) -> list[float]:
    """`cfg.eval_angles`, else 7 angles evenly spread over the training range plus the held-out angles."""
    if cfg.eval_angles is not None:
        angles = [float(a) for a in cfg.eval_angles]
        if not angles or not all(math.isfinite(a) for a in angles):
            raise ValueError(f"eval_angles={cfg.eval_angles!r} must be a non-empty list of finite angles")
        return angles
    lo, hi = (float(a) for a in cfg.angle_range_degrees)
    spread = [round(float(a), 6) for a in np.linspace(lo, hi, 7)]
    return sorted(set(spread) | {float(a) for a in cfg.heldout_angles})


def evaluation_directions(cfg: Any) -> list[tuple[float, ...]]:
    if cfg.directions is not None:
        return training_directions(cfg)
    return [direction(t) for t in evaluation_angles(cfg)]
