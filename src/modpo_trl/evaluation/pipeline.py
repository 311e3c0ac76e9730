"""Evaluation of a sweep: which trade-offs did the adapters reach, and do they beat the simple alternatives?

    python -m modpo_trl.evaluate <sweep dir | recipe.yaml> [key=value ...] [--force]   (modpo_trl/evaluate.py)

Every candidate model (`modpo_trl.evaluation.candidates`: the method's own and the baselines) answers the same
held-out prompts (`eval.prompts`) with the same sampling seed, and every objective's scorer
(`objectives[i].scorer`, else its `reward`) scores the answers.

Every figure of the report comes with an interval over prompts (`modpo_trl.evaluation.bootstrap`): the means
Student-t intervals, differences between candidates, hypervolumes and rank correlations paired bootstrap ones.

Outputs in `<sweep dir>/eval/`: results.json, results.csv (per candidate), metrics.csv (the headline figures with
their intervals), pareto.png, samples.jsonl, and one cache file per candidate in candidates/ (responses and
scores, keyed by fingerprints of the adapter, base model, prompts, sampling settings and scorer), so a re-run
only generates or scores what changed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..generation import SamplingSettings
from ..rewards.cache import fingerprint
from ..runs.data import load_prompts
from ..runs.method import Candidate
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
    metrics_csv_text,
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
    if not 0.0 < cfg.confidence < 1.0:
        raise RecipeError(f"eval.confidence={cfg.confidence} must be in (0, 1), e.g. 0.95")
    if cfg.bootstrap_resamples < 100:
        raise RecipeError(
            f"eval.bootstrap_resamples={cfg.bootstrap_resamples} must be >= 100: a percentile interval needs "
            "hundreds of resamples (default 2000)"
        )
    unknown = [b for b in cfg.baselines if b not in BASELINES]
    if unknown:
        raise RecipeError(f"eval.baselines has unknown entries {unknown}; valid: {list(BASELINES)}")
    if cfg.reference_point is not None and len(cfg.reference_point) != n:
        raise RecipeError(
            f"eval.reference_point={list(cfg.reference_point)} has {len(cfg.reference_point)} entries; it needs "
            f"{n}, one per objective {recipe.objective_names}"
        )


@dataclass
class EvaluationPlan:
    """What an evaluation works on, resolved without loading a model: the candidates, the prompts each one sees,
    and each candidate's cache entry (responses and scores found for its fingerprint, if any)."""

    recipe: Recipe
    run_dir: Path
    settings: SamplingSettings
    backend: str
    sources: list
    candidates: list[Candidate]
    notes: list[str]
    prompts: list
    model_prompts: dict[str, list]
    entries: dict[str, dict[str, Any]]

    def todo(self) -> list[Candidate]:
        return [c for c in self.candidates if not self.entries[c.key]["cached"]]


def plan_evaluation(
    run_dir_or_recipe: str | Path | Recipe, overrides: list[str] | None = None, force: bool = False
) -> EvaluationPlan:
    """Checks the recipe's `eval:` section, finds the candidates, loads the prompts and looks up the caches."""
    recipe, run_dir = resolve(run_dir_or_recipe, overrides)
    check_eval(recipe)
    settings = sampling_settings(recipe.eval)
    backend = choose_backend(recipe.eval.backend)
    sources = scorers(recipe)
    candidates, notes = build_candidates(recipe, run_dir)
    prompts = load_prompts(recipe.eval.prompts, recipe.eval.num_prompts)
    if not prompts:
        raise RecipeError(f"eval.prompts: {recipe.eval.prompts.path!r} holds no prompts")
    entries, model_prompts = {}, {}
    for candidate in candidates:
        model_prompts[candidate.key] = (
            [candidate.prompt_fn(p) for p in prompts] if candidate.prompt_fn else prompts
        )
        fp = generation_fingerprint(recipe, candidate, model_prompts[candidate.key], settings, backend)
        entries[candidate.key] = cache_entry(candidate, fp, run_dir / EVAL_DIR, run_dir, force)
    return EvaluationPlan(
        recipe, run_dir, settings, backend, sources, candidates, notes, prompts, model_prompts, entries
    )


def plan_lines(plan: EvaluationPlan) -> list[str]:
    """`python -m modpo_trl.evaluate --dry-run`: every candidate and whether its responses are cached."""
    todo = plan.todo()
    s = plan.settings
    lines = [
        f"# {plan.run_dir}: {len(plan.candidates)} candidate(s), {len(todo)} to generate, {len(plan.prompts)} "
        f"prompt(s), backend {plan.backend}, max_new_tokens {s.max_new_tokens}, "
        f"{'sampling' if s.do_sample else 'greedy'}, seed {s.seed}",
        f"# scorers: {[source.name for source in plan.sources]}",
    ]
    rows = [("candidate", "model", "responses")]
    for c in plan.candidates:
        described = plan.entries[c.key]["candidate"]
        model = (
            " + ".join(f"{soup['coefficient']:.3g} {soup['adapter']}" for soup in described["soup"])
            if described["soup"]
            else described["adapter"] or "base model"
        )
        rows.append((c.key, model, "cached" if plan.entries[c.key]["cached"] else "generate"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return lines + [f"# note: {note}" for note in plan.notes]


def evaluate_sweep(
    run_dir_or_recipe: str | Path | Recipe, overrides: list[str] | None = None, force: bool = False
) -> dict[str, Any]:
    """Generates, scores and compares every candidate of a sweep; writes `<sweep dir>/eval/` and returns the
    content of results.json. `force` ignores the cached responses and scores."""
    plan = plan_evaluation(run_dir_or_recipe, overrides, force)
    recipe, run_dir, settings, backend = plan.recipe, plan.run_dir, plan.settings, plan.backend
    candidates, notes, prompts, entries = plan.candidates, plan.notes, plan.prompts, plan.entries
    names = recipe.objective_names
    eval_dir = run_dir / EVAL_DIR
    todo = plan.todo()
    print(
        f"{run_dir}: {len(candidates)} candidate(s), {len(todo)} to generate, {len(prompts)} prompt(s)",
        flush=True,
    )
    generate_all(recipe, todo, plan.model_prompts, settings, backend, entries)
    score_all(plan.sources, prompts, entries, recipe.eval.batch_size)

    results = [candidate_result(c, entries[c.key], names, recipe, run_dir) for c in candidates]
    prompts_fp, generation = fingerprint(prompts), {**asdict(settings), "backend": backend}
    compared, compare_notes = compared_results(recipe, names, prompts_fp, generation, results)
    results, notes = results + compared, notes + compare_notes
    ok = [r for r in results if r["status"] == "ok"]
    pareto = None
    if len(names) >= 2 and ok:
        cfg = recipe.eval
        pareto = pareto_report(
            results, names, cfg.reference_point, cfg.confidence, cfg.bootstrap_resamples, cfg.seed
        )
    elif len(names) < 2:
        notes.append("pareto: one objective, nothing to trade off; no front or plot")
    for r in results:  # pareto_report marks the candidates it compared
        r.setdefault("non_dominated", False)
        r.setdefault("front", None)

    files = {
        "results": eval_dir / "results.json",
        "csv": eval_dir / "results.csv",
        "samples": eval_dir / "samples.jsonl",
    }
    if pareto:
        files["metrics"] = eval_dir / "metrics.csv"
    else:  # nor would an earlier run's metrics
        (eval_dir / "metrics.csv").unlink(missing_ok=True)
    plot = plot_results(
        results, names, pareto, eval_dir / "pareto.png", f"{recipe.run_name}: {len(prompts)} held-out prompts"
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
    if pareto:
        write_atomic(files["metrics"], metrics_csv_text(report["pareto"]))
    write_atomic(files["samples"], samples_text(candidates, entries, prompts, plan.model_prompts))
    write_atomic(files["results"], json.dumps(report, indent=2) + "\n")
    return report
