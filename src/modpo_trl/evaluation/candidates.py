"""What an evaluation compares: the method's own candidates (from its run directory) and the baselines.

- the method's candidates: every `done` MODPO weighting (one LoRA adapter each), or a conditioned method's
  one adapter at each evaluated preference (`Method.candidates`);
- `reference` (baseline): the base model, adapters disabled;
- `rewarded_soups` (baseline, MODPO, 2+ objectives): for each MODPO weighting, the linear interpolation of the
  weights of the *extreme* adapters, one per objective: the run with the largest weight on that objective
  (MODPO cannot train a target weight of 0, so the extreme of a margin objective is a run such as
  w-0.20-0.80). The coefficients are the barycentric coordinates of the weighting in the extremes' weightings,
  so the soup at an extreme's weighting is that adapter itself: the extremes are shared with `modpo` (marked
  `extreme`) and belong to both point sets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runs.engine import MANIFEST, Manifest, is_done
from ..runs.method import Candidate
from ..runs.methods import method_of
from ..runs.recipe import Recipe, RecipeError

BASELINES = ("reference", "rewarded_soups")


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


def rewarded_soups(modpo: list[Candidate], names: list[str]) -> tuple[list[Candidate], list[str]]:
    """Soups of the extreme adapters at every other MODPO weighting; marks the extremes (see the module doc)."""
    n = len(names)
    if n < 2:
        return [], ["rewarded_soups: needs 2+ objectives to interpolate between"]
    if len(modpo) < n + 1:
        return [], [
            f"rewarded_soups: needs {n + 1}+ finished weightings (one extreme per objective and one to "
            f"interpolate); the sweep has {len(modpo)}"
        ]
    weights = np.array([c.weights for c in modpo], dtype=float)
    # The extreme of objective i: the largest weight on i, then the least weight spread over the others.
    extremes = [
        max(range(len(modpo)), key=lambda k, i=i: (weights[k, i], -np.sum(np.delete(weights[k], i) ** 2)))
        for i in range(n)
    ]
    vertices = weights[extremes].T  # column j: the weighting of objective j's extreme
    if len(set(extremes)) < n or abs(np.linalg.det(vertices)) < 1e-9:
        tags = [modpo[e].label for e in extremes]
        return [], [
            f"rewarded_soups: the extremes {dict(zip(names, tags, strict=True))} do not span the objectives"
        ]
    for name, e in zip(names, extremes, strict=True):
        modpo[e].extreme = name
    soups, notes = [], []
    for k, candidate in enumerate(modpo):
        if k in extremes:
            continue
        coefficients = np.linalg.solve(vertices, weights[k])
        if coefficients.min() < -1e-9:
            notes.append(
                f"rewarded_soups {candidate.label}: outside the extremes' weightings "
                f"({', '.join(modpo[e].label for e in extremes)}), so no interpolation reaches it"
            )
            continue
        soup = [(modpo[e].adapter, float(c)) for e, c in zip(extremes, coefficients, strict=True) if c > 1e-9]
        soups.append(Candidate("rewarded_soups", candidate.label, weights=candidate.weights, soup=soup))
    return soups, notes


def build_candidates(recipe: Recipe, run_dir: Path) -> tuple[list[Candidate], list[str]]:
    """Baselines first, then the method's own candidates."""
    baselines = recipe.eval.baselines
    candidates = [Candidate("reference", "base")] if "reference" in baselines else []
    own, notes = method_candidates(recipe, run_dir)
    if "rewarded_soups" not in baselines:
        return candidates + own, notes
    if recipe.method != "modpo":
        notes.append("rewarded_soups: needs a MODPO sweep's adapters; not built for a conditioned method")
        return candidates + own, notes
    soups, soup_notes = rewarded_soups(own, recipe.objective_names)
    return candidates + own + soups, notes + soup_notes
