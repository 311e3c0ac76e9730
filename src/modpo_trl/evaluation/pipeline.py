"""Evaluation of a sweep: which trade-offs did the adapters reach, and do they beat the simple alternatives?

    python -m modpo_trl.evaluate <sweep dir | recipe.yaml> [key=value ...] [--force]   (modpo_trl/evaluate.py)

Every candidate model (`modpo_trl.evaluation.candidates`: the method's own and the baselines) answers the same
held-out prompts (`eval.prompts`) with the same sampling seed, and every objective's scorer
(`objectives[i].scorer`, else its `reward`) scores the answers.

Outputs in `<sweep dir>/eval/`: results.json, results.csv, pareto.png, samples.jsonl, and one cache file per
candidate in candidates/ (responses and scores, keyed by fingerprints of the adapter, base model, prompts,
sampling settings and scorer), so a re-run only generates or scores what changed.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..rewards.cache import fingerprint
from ..runs.data import load_prompts
from ..runs.recipe import Recipe, RecipeError
from ..runs.rewards import build_reward
from ..serving.front import resolve
from ..serving.generators import choose_backend, sampling_settings
from ..storage import write_atomic
from .candidates import BASELINES, build_candidates
from .report import (
    EVAL_DIR,
    candidate_result,
    compared_results,
    csv_text,
    finite,
    pareto_report,
    plot_results,
    samples_text,
)
from .responses import cache_entry, generate_all, generation_fingerprint, score_all


def scorers(recipe: Recipe) -> list:
    """One reward source per objective, in recipe order: its `scorer`, else its `reward`."""
    sources = []
    for i, objective in enumerate(recipe.objectives):
        key = f"objectives[{i}] ({objective.name})"
        cfg, kind = (
            (objective.scorer, "scorer") if objective.scorer is not None else (objective.reward, "reward")
        )
        if cfg is None:
            raise RecipeError(
                f"{key} has neither `scorer` nor `reward` to score generated responses with; add e.g. "
                f"{key}.scorer: {{type: function, function: my_module:my_scorer}}"
            )
        if cfg.type == "columns":
            raise RecipeError(
                f"{key}.{kind}.type=columns reads precomputed scores and cannot score generated responses; "
                f"set {key}.scorer (valid types: reward_model, implicit, function)"
            )
        sources.append(build_reward(cfg, objective.name, f"{key}.{kind}"))
    return sources


def check_eval(recipe: Recipe) -> None:
    """The `eval:` section's problems, before anything is loaded."""
    cfg, n = recipe.eval, len(recipe.objectives)
    if cfg.prompts is None:
        raise RecipeError(
            "eval.prompts is not set: name a data set whose prompt_column holds held-out prompts"
        )
    if cfg.num_prompts < 1:
        raise RecipeError(f"eval.num_prompts={cfg.num_prompts} must be >= 1")
    unknown = [b for b in cfg.baselines if b not in BASELINES]
    if unknown:
        raise RecipeError(f"eval.baselines has unknown entries {unknown}; valid: {list(BASELINES)}")
    if cfg.reference_point is not None and len(cfg.reference_point) != n:
        raise RecipeError(
            f"eval.reference_point={list(cfg.reference_point)} has {len(cfg.reference_point)} entries; it needs "
            f"{n}, one per objective {recipe.objective_names}"
        )


def evaluate_sweep(
    run_dir_or_recipe: str | Path | Recipe, overrides: list[str] | None = None, force: bool = False
) -> dict[str, Any]:
    """Generates, scores and compares every candidate of a sweep; writes `<sweep dir>/eval/` and returns the
    content of results.json. `force` ignores the cached responses and scores."""
    recipe, run_dir = resolve(run_dir_or_recipe, overrides)
    check_eval(recipe)
    settings = sampling_settings(recipe.eval)
    backend = choose_backend(recipe.eval.backend)
    sources = scorers(recipe)
    candidates, notes = build_candidates(recipe, run_dir)
    prompts = load_prompts(recipe.eval.prompts, recipe.eval.num_prompts)
    if not prompts:
        raise RecipeError(f"eval.prompts: {recipe.eval.prompts.path!r} holds no prompts")
    names = recipe.objective_names
    eval_dir = run_dir / EVAL_DIR

    entries, model_prompts = {}, {}
    for candidate in candidates:
        model_prompts[candidate.key] = (
            [candidate.prompt_fn(p) for p in prompts] if candidate.prompt_fn else prompts
        )
        fp = generation_fingerprint(recipe, candidate, model_prompts[candidate.key], settings, backend)
        entries[candidate.key] = cache_entry(candidate, fp, eval_dir, run_dir, force)
    todo = [c for c in candidates if not entries[c.key]["cached"]]
    print(
        f"{run_dir}: {len(candidates)} candidate(s), {len(todo)} to generate, {len(prompts)} prompt(s)",
        flush=True,
    )
    generate_all(recipe, todo, model_prompts, settings, backend, entries)
    score_all(sources, prompts, entries, recipe.eval.batch_size)

    results = [candidate_result(c, entries[c.key], names, recipe, run_dir) for c in candidates]
    prompts_fp, generation = fingerprint(prompts), {**asdict(settings), "backend": backend}
    compared, compare_notes = compared_results(recipe, names, prompts_fp, generation, results)
    results, notes = results + compared, notes + compare_notes
    ok = [r for r in results if r["status"] == "ok"]
    pareto = None
    if len(names) >= 2 and ok:
        pareto = pareto_report(results, names, recipe.eval.reference_point)
    elif len(names) < 2:
        notes.append("pareto: one objective, nothing to trade off; no front or plot")
    front = set(pareto["non_dominated"]["all"]) if pareto else set()
    for r in results:
        r["non_dominated"] = f"{r['method']}/{r['label']}" in front

    files = {
        "results": eval_dir / "results.json",
        "csv": eval_dir / "results.csv",
        "samples": eval_dir / "samples.jsonl",
    }
    plot = plot_results(
        results, names, eval_dir / "pareto.png", f"{recipe.run_name}: {len(prompts)} held-out prompts"
    )
    if plot:
        files["plot"] = plot
    else:  # a plot from an earlier run would no longer match results.json
        (eval_dir / "pareto.png").unlink(missing_ok=True)
    report = finite(
        {
            "run_dir": str(run_dir),
            "run_name": recipe.run_name,
            "method": recipe.method,
            "objectives": names,
            "target": names[recipe.target_index],
            "num_prompts": len(prompts),
            "prompts_fingerprint": prompts_fp,
            "generation": generation,
            "candidates": results,
            "pareto": pareto,
            "notes": notes,
            "files": {k: str(v) for k, v in files.items()},
        }
    )
    write_atomic(files["csv"], csv_text(results, names))
    write_atomic(files["samples"], samples_text(candidates, entries, prompts, model_prompts))
    write_atomic(files["results"], json.dumps(report, indent=2) + "\n")
    return report
