"""MOC in the run engine: one preference-conditioned adapter for every weighting (`<run_dir>/moc/`).

Objectives with `data` give pairs; the others' `reward` is their margin. The adapter is evaluated at the
sweep's weightings (so that MOC and a MODPO sweep compare point by point), then at the held-out preferences.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from ..conditioning.preference import check_preference, condition_prompt, round_preference
from ..conditioning.svd_lora import saved_conditioning
from ..rewards.cache import path_fingerprint
from ..rewards.sources import RewardSource
from ..trainers.moc_config import MOCConfig
from ..trainers.moc_trainer import OBJECTIVE, MOCTrainer, objective_pairs
from .data import load_preference_data
from .engine import conditioned_run, is_done, pairs_on_disk
from .method import Candidate, Method, Prepared, Run, Trained, usage_notes
from .modpo import fit
from .recipe import Recipe, RecipeError, weight_tag
from .rewards import margin_columns, ready_reward

TAG = "moc"  # the run's manifest entry and adapter folder: <run_dir>/moc/
COLUMNS = ["prompt", "chosen", "rejected", OBJECTIVE]


class MOC(Method):
    name = "moc"
    trainer_class = MOCTrainer
    has_target = False  # every objective with pairs is trained on

    def check(self, recipe: Recipe) -> None:
        for i, objective in enumerate(recipe.objectives):
            if objective.data is None and objective.reward is None:
                raise RecipeError(
                    f"objectives[{i}] ({objective.name}) needs `data` (its preference pairs, trained with DPO) or a "
                    "`reward` (used as MODPO's margin): MOC trains every objective"
                )
        if all(objective.data is None for objective in recipe.objectives):
            raise RecipeError("method=moc needs at least one objective with `data`: the pairs it trains on")
        conditioning = recipe.training.get("conditioning", MOCConfig.conditioning)
        if conditioning not in ("prompt", "auto") and not recipe.lora.enabled:
            raise RecipeError(
                f"training.conditioning={conditioning!r} puts the preference into the LoRA adapter, but "
                "lora.enabled is false; enable LoRA or use training.conditioning=prompt"
            )

    def runs(self, recipe: Recipe, dry_run: bool = False) -> list[Run]:
        return [conditioned_run(MOCConfig, recipe, TAG, dry_run, objective_names=recipe.objective_names)]

    def describe(self, recipe: Recipe, runs: list[Run]) -> list[str]:
        args = runs[0].args
        sampling = (
            f"dirichlet(alpha={args.dirichlet_alpha})"
            if args.preference_sampling == "dirichlet"
            else f"grid(steps={args.grid_steps})"
        )
        pairs = [o.name for o in recipe.objectives if o.data is not None]
        margins = [o.name for o in recipe.objectives if o.data is None]
        radius = (
            f" (L1 radius {args.heldout_radius})"
            if args.heldout_preferences and args.preference_sampling != "grid"
            else ""
        )
        labels = [weight_tag(w) + ("-heldout" if held else "") for w, held in evaluation_preferences(recipe)]
        return [
            f"# MOC: one adapter '{TAG}'; pairs from {pairs}; margin rewards for {margins or 'none'}; "
            f"solver {args.moo_solver}, conditioning {args.conditioning}, control loss {args.control_loss}",
            f"# training preferences: {sampling}, {args.preference_augmentation} per pair, "
            f"held out: {args.heldout_preferences or 'none'}{radius}",
            f"# evaluated at {len(labels)} preference(s): {', '.join(labels)}",
        ]

    def card_notes(self, recipe: Recipe, run: Run) -> list[str]:
        names = recipe.objective_names
        return usage_notes(
            f"One adapter for every weighting of {names}: state the weighting in each prompt, as in training:",
            "from modpo_trl.conditioning.preference import condition_prompt",
            f"prompt = condition_prompt(prompt, w={[round(1 / len(names), 2)] * len(names)}, objective_names={names})",
        )

    def prepare(self, recipe: Recipe) -> Prepared:
        train, evals, margins = _load_data(recipe)
        (train, evals), readers = margin_columns(margins, [train, evals], recipe, MOCConfig)
        train, evals, data_fp = pairs_on_disk(train, evals, recipe.run_dir, COLUMNS, "moc-")
        fingerprints = {
            "base_model": path_fingerprint(recipe.model.path),
            "train_data": data_fp,
            "rewards": {name: source.fingerprint() for name, (source, _, _) in margins.items()},
        }
        margin_rewards = dict(zip(margins, readers, strict=True))
        return Prepared(fingerprints, {"train": train, "eval": evals, "margin_rewards": margin_rewards})

    def train(self, recipe: Recipe, run: Run, prepared: Prepared, resume: str | None) -> Trained:
        return fit(MOCTrainer, recipe, run, prepared, resume)

    def candidates(
        self, recipe: Recipe, run_dir: Path, entries: dict[str, dict[str, Any]]
    ) -> list[Candidate]:
        """The one adapter at each `evaluation_preferences(recipe)`, labelled `w-0.30-0.70` (or
        `w-0.50-0.50-heldout`), told that preference as in training (`_candidate`)."""
        entry = entries.get(TAG)
        if not is_done(entry, run_dir):
            return []
        return [
            _candidate(recipe, run_dir, entry, w, heldout) for w, heldout in evaluation_preferences(recipe)
        ]

    def candidate_at(
        self, recipe: Recipe, run_dir: Path, entries: dict[str, dict[str, Any]], weights: list[float]
    ) -> Candidate | None:
        entry = entries.get(TAG)
        return _candidate(recipe, run_dir, entry, weights, False) if is_done(entry, run_dir) else None


def _candidate(
    recipe: Recipe, run_dir: Path, entry: dict[str, Any], w: list[float], heldout: bool
) -> Candidate:
    """The adapter asked for `w` as it was trained (its folder says how, whatever the recipe says): a `prompt_fn`
    that conditions every prompt on `w` (`conditioning` "prompt" or "both"), and the adapter's gates set to `w` (a
    preference-gated adapter, `conditioning` "adapter" or "both")."""
    adapter = run_dir / entry["adapter"]
    conditioning = saved_conditioning(adapter)
    gated, in_prompt = conditioning != "prompt", conditioning != "adapter"
    return Candidate(
        "moc",
        weight_tag(w) + ("-heldout" if heldout else ""),
        weights=list(w),
        adapter=str(adapter),
        preference=round_preference(w),  # what the prompt states, as in training
        prompt_fn=partial(condition_prompt, w=list(w), objective_names=recipe.objective_names)
        if in_prompt
        else None,
        held_out=heldout,
        adapter_preference=list(w) if gated else None,
    )


def evaluation_preferences(recipe: Recipe) -> list[tuple[list[float], bool]]:
    """`(w, held_out)` for every preference the MOC adapter is evaluated at: the sweep's weightings
    (`recipe.weightings()`), then the held-out preferences (`training.heldout_preferences`)."""
    heldout = [
        check_preference(w, len(recipe.objectives), f"training.heldout_preferences[{i}]")
        for i, w in enumerate(recipe.training.get("heldout_preferences") or [])
    ]
    trained = [w for w in recipe.weightings() if not any(np.allclose(w, h) for h in heldout)]
    return [*((w, False) for w in trained), *((w, True) for w in heldout)]


def _load_data(recipe: Recipe) -> tuple[Dataset, Dataset | None, dict[str, tuple[RewardSource, Any, str]]]:
    """All objectives' pairs (with their `objective` column), eval pairs if any, and the margin rewards (source,
    recipe section, its key)."""
    train, evals, margins = {}, {}, {}
    for i, objective in enumerate(recipe.objectives):
        if objective.data is not None:
            train[objective.name], eval_pairs = load_preference_data(
                objective.data, key=f"objectives[{i}].data"
            )
            if eval_pairs is not None:
                evals[objective.name] = eval_pairs
            continue
        key = f"objectives[{i}] ({objective.name}).reward"
        margins[objective.name] = (ready_reward(objective.reward, objective.name, key), objective.reward, key)
    return objective_pairs(train), (objective_pairs(evals) if evals else None), margins
