"""What several test modules do: train a recipe through the run engine, ask its method for its candidates."""

from __future__ import annotations

from typing import Any

from modpo_trl.runs.engine import execute, make_plan, print_plan
from modpo_trl.runs.method import Candidate
from modpo_trl.runs.methods import method_of
from modpo_trl.runs.recipe import Recipe
from modpo_trl.serving.front import method_candidates


def train_recipe(recipe: Recipe, dry_run: bool = False) -> dict[str, Any] | None:
    """What `python -m modpo_trl.train` does with a loaded recipe (the manifest; `None` for a dry run)."""
    plan = make_plan(recipe, method_of(recipe), dry_run=dry_run)
    if dry_run:
        print_plan(plan)
        return None
    return execute(plan)


def candidates_of(recipe: Recipe) -> list[Candidate]:
    """The recipe's method's evaluation candidates from its run directory."""
    return method_candidates(recipe, recipe.run_dir)[0]
