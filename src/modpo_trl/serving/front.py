"""A trained run answering at any preference: `ParetoSet`.

    front = ParetoSet("outputs/quickstart")             # a run directory (or the recipe that made it)
    front.strategies                                    # ['nearest', 'soup', 'mod'] for a MODPO sweep
    front.generate(["Name a colour."], weights=[0.3, 0.7], strategy="mod", do_sample=False)

The run's base model is loaded once (on the first `generate`) and its adapters on first use. Strategies:

- `nearest` (MODPO): the trained weighting closest to `w` (Euclidean);
- `soup` (MODPO): the Rewarded Soup of the objectives' extreme adapters at `w`'s barycentric coordinates
  (`modpo_trl.serving.interpolation`), built once per `w` and kept, in eval mode;
- `mod` (MODPO): MOD decoding, the extremes' next-token log-probs mixed with the same coordinates
  (`modpo_trl.serving.mod`), all adapters in one batched forward per token;
- `conditioned` (MOC, DPA): the run's one adapter asked for `w` as in training (`Method.candidate_at`).

`soup` and `mod` reach the extremes' convex hull; `w` outside it is refused (use `nearest`). A preference is a
point of the simplex (weights >= 0 summing to 1) for MODPO and MOC, a direction (any non-zero vector,
normalised) for DPA. Sampling defaults to the recipe's `eval:` settings; every `generate` may override them.
Prompts are encoded as in training (`modpo_trl.generation.encode_prompt`: message lists through the chat
template).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..conditioning.directions import unit_vector
from ..conditioning.preference import check_preference
from ..generation import SamplingSettings
from ..runs.engine import MANIFEST, Manifest, is_done
from ..runs.method import Candidate
from ..runs.methods import method_of
from ..runs.recipe import Recipe, RecipeError, load_recipe, weight_tag
from .generators import TransformersGenerator, sampling_settings
from .interpolation import Extremes

STRATEGIES = ("nearest", "soup", "mod", "conditioned")


def resolve(target: str | Path | Recipe, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    """(recipe, run directory) from a run directory (its resolved `recipe.yaml`) or a recipe."""
    if isinstance(target, Recipe):
        return target, target.run_dir
    path = Path(target)
    if path.is_dir():
        if not (path / MANIFEST).is_file() and not (path / "recipe.yaml").is_file():
            raise RecipeError(f"no {MANIFEST} in {path}: run `python -m modpo_trl.train <recipe>` first")
        if not (path / "recipe.yaml").is_file():
            raise RecipeError(f"no recipe.yaml in {path}: the sweep writes it next to {MANIFEST}")
        return load_recipe(path / "recipe.yaml", overrides), path
    if not path.exists():
        raise RecipeError(f"{path} does not exist: give a run directory (with {MANIFEST}) or its recipe YAML")
    recipe = load_recipe(path, overrides)
    return recipe, recipe.run_dir


def method_candidates(recipe: Recipe, run_dir: Path) -> tuple[list[Candidate], list[str]]:
    """The recipe's method's candidates from the finished runs of `run_dir`; notes on the runs that are not."""
    if not (run_dir / MANIFEST).is_file():
        raise RecipeError(f"no {MANIFEST} in {run_dir}: run `python -m modpo_trl.train <recipe>` first")
    entries = Manifest(run_dir).runs()
    notes = []
    for tag, entry in entries.items():
        if not is_done(entry, run_dir):
            state = entry["status"] + (", adapter folder missing" if entry["status"] == "done" else "")
            notes.append(f"{recipe.method} {tag}: not evaluated ({state})")
    candidates = method_of(recipe).candidates(recipe, run_dir, entries)
    if not candidates:
        raise RecipeError(
            f"{run_dir}: no finished {recipe.method} run to evaluate ({'; '.join(notes) or 'no runs'}); "
            "train it with python -m modpo_trl.train <recipe>"
        )
    return candidates, notes


class ParetoSet:
    """A finished run (MODPO sweep, MOC or DPA run) that answers prompts at any preference `w` (module doc).

    Everything about a request (`w`, strategy, sampling) is checked before the base model is loaded."""

    def __init__(
        self,
        run: str | Path | Recipe,
        overrides: list[str] | None = None,
        device: str | torch.device | None = None,
    ):
        self.recipe, self.run_dir = resolve(run, overrides)
        self.method = method_of(self.recipe)
        self.objectives = self.recipe.objective_names
        self.candidates, self.notes = method_candidates(self.recipe, self.run_dir)
        self.entries = Manifest(self.run_dir).runs()
        self.settings = sampling_settings(self.recipe.eval)
        self.device = device
        self.conditioned = self.candidates[0].preference is not None
        self.extremes: Extremes | None = None
        self._no_interpolation = "a conditioned model is asked for w directly"
        if not self.conditioned:
            try:
                self.extremes = Extremes(self.candidates, self.objectives)
            except ValueError as e:
                self._no_interpolation = str(e)
        self._generator: TransformersGenerator | None = None

    @property
    def strategies(self) -> list[str]:
        """The strategies this run serves; the first is the default."""
        if self.conditioned:
            return ["conditioned"]
        return ["nearest", "soup", "mod"] if self.extremes else ["nearest"]

    @property
    def generator(self) -> TransformersGenerator:
        """The base model with the adapters loaded so far (loaded on first use)."""
        if self._generator is None:
            self._generator = TransformersGenerator(self.recipe, self.settings, self.device)
        return self._generator

    def check_weights(self, weights: Any) -> list[float]:
        """`weights` as floats: on the simplex, or a direction (normalised) for DPA; ValueError otherwise."""
        n = len(self.objectives)
        if isinstance(weights, str | bytes) or not hasattr(weights, "__len__") or len(weights) != n:
            raise ValueError(
                f"weights={weights!r} must be a list of {n} numbers, one per objective {self.objectives}"
            )
        if self.method.preference_space == "direction":
            return list(unit_vector(weights, n, "weights"))
        return check_preference(weights, n, "weights")

    def check_strategy(self, strategy: str | None) -> str:
        if strategy is None:
            return self.strategies[0]
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r} is not valid; valid: {list(STRATEGIES)}")
        if strategy not in self.strategies:
            if self.conditioned:
                reason = f"{self.recipe.method} conditions one model on w"
            elif strategy == "conditioned":
                reason = f"{self.recipe.method} trains one adapter per weighting"
            else:
                reason = f"{strategy} interpolates between the objectives' extreme adapters: {self._no_interpolation}"
            raise ValueError(
                f"strategy={strategy!r} cannot serve the {self.recipe.method} run {self.run_dir} ({reason}); "
                f"it serves {self.strategies}"
            )
        return strategy

    def sampling(self, **overrides: Any) -> SamplingSettings:
        """The recipe's `eval:` sampling settings with `overrides` (max_new_tokens, do_sample, temperature, top_p,
        batch_size, seed), checked."""
        known = [f.name for f in fields(SamplingSettings)]
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(f"unknown sampling settings {unknown}; valid: {known}")
        settings = replace(self.settings, **overrides)
        settings.check()
        return settings

    def candidate(self, weights: Any, strategy: str | None = None) -> Candidate:
        """What answers at `weights` with `strategy` (default: the run's first): an adapter, a soup, a MOD
        mixture, or the conditioned adapter with the prompt function that states `w`."""
        strategy = self.check_strategy(strategy)
        w = self.check_weights(weights)
        if strategy == "nearest":
            distances = [np.linalg.norm(np.subtract(c.weights, w)) for c in self.candidates]
            return self.candidates[int(np.argmin(distances))]
        if strategy == "conditioned":
            candidate = self.method.candidate_at(self.recipe, self.run_dir, self.entries, w)
            if candidate is None:
                raise ValueError(f"{self.run_dir}: the {self.recipe.method} adapter is not trained")
            return candidate
        parts = self.extremes.parts(w)
        if parts is None:
            raise ValueError(
                f"weights={w} lie outside the weightings of the objectives' extreme adapters "
                f"({self.extremes.describe()}): {strategy} only interpolates between them; use strategy='nearest'"
            )
        if strategy == "soup":
            return Candidate("soup", weight_tag(w), weights=w, soup=parts)
        return Candidate("mod", weight_tag(w), weights=w, mixture=parts)

    def generate(
        self,
        prompts: Sequence[str | list[dict[str, Any]]],
        weights: Any,
        strategy: str | None = None,
        **sampling: Any,
    ) -> list[str]:
        """One response per prompt (a string, or a list of chat messages) at the preference `weights`; `sampling`
        overrides the recipe's sampling settings (e.g. `do_sample=False`, `max_new_tokens=128`, `seed=1`)."""
        if isinstance(prompts, str) or not all(isinstance(p, str | list) for p in prompts):
            raise ValueError(
                "prompts must be a list of prompts, each a text or a list of chat messages, e.g. ['Hello.'] or "
                "[[{'role': 'user', 'content': 'Hello.'}]]"
            )
        candidate = self.candidate(weights, strategy)
        settings = self.sampling(**sampling)
        model_prompts = [candidate.prompt_fn(p) for p in prompts] if candidate.prompt_fn else list(prompts)
        return self.generator.generate(
            model_prompts,
            adapter=candidate.adapter,
            soup=candidate.soup,
            mixture=candidate.mixture,
            settings=settings,
            desc=f"Generating {candidate.key}",
        )
