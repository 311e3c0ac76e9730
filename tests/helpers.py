"""What several test modules do: train a recipe through the run engine, ask its method for its candidates, save
the tiny models the tiny recipe (tests/data/tiny_modpo.yaml) trains with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

from modpo_trl.runs import models
from modpo_trl.runs.engine import execute, make_plan, print_plan
from modpo_trl.runs.method import Candidate
from modpo_trl.runs.methods import method_of
from modpo_trl.runs.recipe import Recipe
from modpo_trl.serving.front import method_candidates
from modpo_trl.testing import tiny_causal_lm, tiny_reward_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny_modpo.yaml"
PAIRS = REPO / "tests" / "data" / "tiny_pairs.jsonl"


def train_recipe(
    recipe: Recipe, dry_run: bool = False, retrain_changed: bool = False
) -> dict[str, Any] | None:
    """What `python -m modpo_trl.train` does with a loaded recipe (the manifest; `None` for a dry run)."""
    plan = make_plan(recipe, method_of(recipe), dry_run=dry_run, retrain_changed=retrain_changed)
    if dry_run:
        print_plan(plan)
        return None
    return execute(plan)


def candidates_of(recipe: Recipe) -> list[Candidate]:
    """The recipe's method's evaluation candidates from its run directory."""
    return method_candidates(recipe, recipe.run_dir)[0]


def save_tiny_models(root: Path) -> Path:
    """A tiny random policy (`root/policy`) and reward model (`root/rm`) saved with their tokenizer."""
    tokenizer = tiny_tokenizer()
    for name, model in [("policy", tiny_causal_lm(tokenizer)), ("rm", tiny_reward_model(tokenizer, seed=1))]:
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def tiny_overrides(models: Path, out: Path, *extra: str) -> list[str]:
    """The tiny recipe's overrides for models saved by `save_tiny_models` and the output folder `out`."""
    return [
        f"model.path={models / 'policy'}",
        f"objectives.0.data.path={PAIRS}",
        f"objectives.1.reward.path={models / 'rm'}",
        f"output_dir={out}",
        *extra,
    ]


def fake_quantised_loading(monkeypatch) -> dict[str, Any]:
    """CUDA faked as available, `from_pretrained` and `prepare_model_for_kbit_training` recording their arguments
    (into the returned dict: `path`, the keyword arguments, `prepared`) and returning a tiny model."""
    seen: dict[str, Any] = {}

    def fake_from_pretrained(path, **kwargs):
        seen.update(path=path, **kwargs)
        return tiny_causal_lm(tiny_tokenizer())

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(
        models, "prepare_model_for_kbit_training", lambda model, **kw: seen.update(prepared=kw) or model
    )
    return seen
