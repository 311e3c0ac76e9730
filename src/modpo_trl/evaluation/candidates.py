"""What an evaluation compares: the method's own candidates (from its run directory) and the baselines.

- the method's candidates: every `done` MODPO weighting (one LoRA adapter each), or a conditioned method's
  one adapter at each evaluated preference (`Method.candidates`);
- `reference` (baseline): the base model, adapters disabled;
- `rewarded_soups` and `mod` (baselines, MODPO, 2+ objectives, no training): at every other MODPO weighting,
  the *extreme* adapters, one per objective (`modpo_trl.serving.interpolation`), combined with the weighting's
  barycentric coordinates in the extremes' weightings: their weights interpolated (Rewarded Soups) or their
  next-token log-probs mixed at decoding (MOD, `modpo_trl.serving.mod`). Either at an extreme's weighting is
  that adapter itself: the extremes are shared with `modpo` (marked `extreme`) and belong to every point set.
"""

from __future__ import annotations

from pathlib import Path

from ..runs.method import Candidate
from ..runs.recipe import Recipe
from ..serving.front import method_candidates
from ..serving.interpolation import Extremes

BASELINES = ("reference", "rewarded_soups", "mod")
INTERPOLATIONS = {"rewarded_soups": "soup", "mod": "mixture"}  # baseline -> the Candidate field it fills


def interpolated(modpo: list[Candidate], names: list[str], method: str) -> tuple[list[Candidate], list[str]]:
    """`method`'s candidates (a key of `INTERPOLATIONS`) at every MODPO weighting but the extremes; marks the
    extremes (see the module doc)."""
    n = len(names)
    if n >= 2 and len(modpo) < n + 1:
        return [], [
            f"{method}: needs {n + 1}+ finished weightings (one extreme per objective and one to "
            f"interpolate); the sweep has {len(modpo)}"
        ]
    try:
        extremes = Extremes(modpo, names)
    except ValueError as e:
        return [], [f"{method}: {e}"]
    for name, candidate in zip(names, extremes.candidates, strict=True):
        candidate.extreme = name
    built, notes = [], []
    for candidate in modpo:
        if candidate.extreme:
            continue
        parts = extremes.parts(candidate.weights)
        if parts is None:
            notes.append(
                f"{method} {candidate.label}: outside the extremes' weightings ({extremes.describe()}), so no "
                "interpolation reaches it"
            )
            continue
        fields = {INTERPOLATIONS[method]: parts}
        built.append(Candidate(method, candidate.label, weights=candidate.weights, **fields))
    return built, notes


def build_candidates(recipe: Recipe, run_dir: Path) -> tuple[list[Candidate], list[str]]:
    """Baselines first, then the method's own candidates, then the interpolations of its adapters."""
    baselines = recipe.eval.baselines
    candidates = [Candidate("reference", "base")] if "reference" in baselines else []
    own, notes = method_candidates(recipe, run_dir)
    built = []
    for method in (m for m in INTERPOLATIONS if m in baselines):
        if recipe.method != "modpo":
            notes.append(f"{method}: needs a MODPO sweep's adapters; not built for a conditioned method")
            continue
        more, more_notes = interpolated(own, recipe.objective_names, method)
        built, notes = built + more, notes + more_notes
    return candidates + own + built, notes
