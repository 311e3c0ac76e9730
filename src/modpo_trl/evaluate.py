"""Evaluation of a sweep: which trade-offs did the adapters reach, and do they beat the simple alternatives?

    python -m modpo_trl.evaluate <sweep dir | recipe.yaml> [key=value ...] [--force]

Every candidate model answers the same held-out prompts (`eval.prompts`) with the same sampling seed, and every
objective's scorer (`objectives[i].scorer`, else its `reward`) scores the answers. Candidates:

- `modpo`: every `done` weighting of the sweep (one LoRA adapter each).
- `reference` (baseline): the base model, adapters disabled.
- `rewarded_soups` (baseline, 2+ objectives): for each MODPO weighting, the linear interpolation of the
  weights of the *extreme* adapters, one per objective: the run with the largest weight on that objective
  (MODPO cannot train a target weight of 0, so the extreme of a margin objective is a run such as
  w-0.20-0.80). The coefficients are the barycentric coordinates of the weighting in the extremes' weightings,
  so the soup at an extreme's weighting is that adapter itself: the extremes are shared with `modpo` (marked
  `extreme`) and belong to both point sets.
- conditioned methods (`method: moc | dpa`): the candidates their module's `evaluation_candidates(recipe,
  run_dir)` returns (one model, the preference in the prompt through `Candidate.prompt_fn`).

Outputs in `<sweep dir>/eval/`: results.json, results.csv, pareto.png, samples.jsonl, and one cache file per
candidate in candidates/ (responses and scores, keyed by fingerprints of the adapter, base model, prompts,
sampling settings and scorer), so a re-run only generates or scores what changed.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cache import fingerprint, path_fingerprint
from .generation import SamplingSettings, as_response, choose_backend
from .recipe import Recipe, RecipeError, build_reward, load_recipe
from .sweep import MANIFEST, is_done, write_atomic

EVAL_DIR = "eval"
BASELINES = ("reference", "rewarded_soups")
DEFAULT_REFERENCE = "default: min - 10% of the range of all candidates' means, per objective"


@dataclass
class Candidate:
    """A model to evaluate: the base model (`adapter` None), a LoRA adapter, or a soup of adapters.

    Conditioned methods (one model for every preference) set `preference` and a `prompt_fn` that puts it
    into the prompt (`render_preference`); the scorers still see the original prompt.
    """

    method: str
    label: str
    weights: list[float] | None = None  # the requested weighting, in the order of `objectives`
    adapter: str | None = None
    preference: list[float] | None = None
    prompt_fn: Callable[[Any], Any] | None = field(default=None, repr=False)
    soup: list[tuple[str, float]] | None = None  # Rewarded Soups: (adapter folder, coefficient)
    extreme: str | None = None  # the objective this MODPO adapter is the soups' extreme of
    held_out: bool = False  # a preference the conditioned model never trained on (generalisation)

    @property
    def key(self) -> str:
        return f"{self.method}-{self.label}"

    def adapters(self) -> list[str]:
        return [p for p, _ in self.soup] if self.soup else [self.adapter] if self.adapter else []

    def describe(self, run_dir: Path) -> dict[str, Any]:
        def short(path: str) -> str:  # relative to the sweep directory when inside it
            p = Path(path)
            return str(p.relative_to(run_dir)) if p.is_relative_to(run_dir) else str(p)

        return {
            "method": self.method,
            "label": self.label,
            "weights": self.weights,
            "preference": self.preference,
            "adapter": short(self.adapter) if self.adapter else None,
            "soup": [{"adapter": short(p), "coefficient": c} for p, c in self.soup] if self.soup else None,
            "extreme": self.extreme,
            "held_out": self.held_out,
        }


# ---------------------------------------------------------------------------------------- the sweep and recipe
def resolve(target: str | Path | Recipe, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    """(recipe, sweep directory) from a sweep directory (its resolved `recipe.yaml`) or a recipe."""
    if isinstance(target, Recipe):
        return target, target.run_dir
    path = Path(target)
    if path.is_dir():
        if not (path / MANIFEST).is_file() and not (path / "recipe.yaml").is_file():
            raise RecipeError(f"no {MANIFEST} in {path}: run `python -m modpo_trl.train <recipe>` first")
        if not (path / "recipe.yaml").is_file():
            raise RecipeError(f"no recipe.yaml in {path}: the sweep writes it next to {MANIFEST}")
        return load_recipe(path / "recipe.yaml", overrides), path
    recipe = load_recipe(path, overrides)
    return recipe, recipe.run_dir


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


# ---------------------------------------------------------------------------------------------- the candidates
def modpo_candidates(run_dir: Path) -> tuple[list[Candidate], list[str]]:
    """Every finished weighting of the manifest; notes on those that are not."""
    manifest_path = run_dir / MANIFEST
    if not manifest_path.is_file():
        raise RecipeError(f"no {MANIFEST} in {run_dir}: run `python -m modpo_trl.train <recipe>` first")
    runs = json.loads(manifest_path.read_text()).get("runs", {})
    candidates, notes = [], []
    for tag, entry in runs.items():
        if is_done(entry, run_dir):
            candidates.append(
                Candidate("modpo", tag, weights=entry["weights"], adapter=str(run_dir / entry["adapter"]))
            )
        else:
            state = entry["status"] + (", adapter folder missing" if entry["status"] == "done" else "")
            notes.append(f"modpo {tag}: not evaluated ({state})")
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


def conditioned_candidates(recipe: Recipe, run_dir: Path) -> list[Candidate]:
    """A conditioned method's candidates, from `evaluation_candidates(recipe, run_dir)` of its module."""
    from .train import conditioned_trainer

    module = conditioned_trainer(recipe.method)
    if not hasattr(module, "evaluation_candidates"):
        raise RecipeError(
            f"method={recipe.method!r}: {module.__name__} has no evaluation_candidates(recipe, run_dir) to evaluate"
        )
    candidates = list(module.evaluation_candidates(recipe, run_dir))
    wrong = [type(c).__name__ for c in candidates if not isinstance(c, Candidate)]
    if wrong:
        raise TypeError(
            f"{module.__name__}.evaluation_candidates must return modpo_trl.evaluate.Candidate objects, got {wrong}"
        )
    return candidates


def build_candidates(recipe: Recipe, run_dir: Path) -> tuple[list[Candidate], list[str]]:
    """Baselines first, then the method's own candidates."""
    baselines = recipe.eval.baselines
    candidates = [Candidate("reference", "base")] if "reference" in baselines else []
    if recipe.method != "modpo":
        own, notes = conditioned_candidates(recipe, run_dir), []
        if "rewarded_soups" in baselines:
            notes.append("rewarded_soups: needs a MODPO sweep's adapters; not built for a conditioned method")
        return candidates + own, notes
    modpo, notes = modpo_candidates(run_dir)
    if not modpo:
        raise RecipeError(f"{run_dir}: no finished weighting to evaluate ({'; '.join(notes) or 'no runs'})")
    if "rewarded_soups" in baselines:
        soups, soup_notes = rewarded_soups(modpo, recipe.objective_names)
        return candidates + modpo + soups, notes + soup_notes
    return candidates + modpo, notes


# ------------------------------------------------------------------------------------- generation and scoring
def generation_fingerprint(
    recipe: Recipe, candidate: Candidate, prompts: list, settings: SamplingSettings, backend: str
) -> str:
    """Changes whenever the responses could: base model, adapter files, prompts as the model sees them,
    sampling settings, backend."""
    model = recipe.model
    return fingerprint(
        "generation",
        path_fingerprint(model.path),
        model.tokenizer,
        model.dtype,
        model.load_in_4bit,
        asdict(settings),
        backend,
        prompts,
        [path_fingerprint(p) for p in candidate.adapters()],
        [c for _, c in candidate.soup] if candidate.soup else None,
    )


def _make_generator(recipe: Recipe, settings: SamplingSettings, backend: str, candidates: list[Candidate]):
    from .generation import TransformersGenerator, VLLMGenerator, lora_rank

    if backend == "transformers":
        return TransformersGenerator(recipe, settings)
    ranks = [
        sum(lora_rank(p) for p in c.adapters()) if c.soup else lora_rank(c.adapter)
        for c in candidates
        if c.adapters()
    ]
    return VLLMGenerator(recipe, settings, max_lora_rank=max(ranks, default=8))


def _generate_all(recipe, todo, model_prompts, settings, backend, entries) -> None:
    """Generates for `todo` with one base model, unloading each adapter after the last candidate using it."""
    if not todo:
        return
    uses = Counter(p for c in todo for p in c.adapters())
    generator = _make_generator(recipe, settings, backend, todo)
    try:
        for candidate in todo:
            entry = entries[candidate.key]
            try:
                entry["responses"] = generator.generate(
                    model_prompts[candidate.key],
                    adapter=candidate.adapter,
                    soup=candidate.soup,
                    desc=f"Generating {candidate.key}",
                )
                entry["scores"], entry["error"] = {}, None
            except (OSError, ValueError) as e:  # an adapter that cannot load, a prompt the template rejects
                entry["responses"], entry["error"] = None, f"generation failed: {e}"
            for path in candidate.adapters():
                uses[path] -= 1
                if uses[path] == 0:
                    generator.release(path)
            if entry["responses"] is not None:
                _save_entry(entry)
    finally:
        del generator
        gc.collect()
        _empty_cuda_cache()


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _score(source, prompts: list, responses: list, batch_size: int) -> list[float]:
    from .rewards import _check_scores

    values = []
    for start in range(0, len(prompts), batch_size):
        batch = source.score(prompts[start : start + batch_size], responses[start : start + batch_size])
        values += _check_scores(
            source.name, batch, expected=len(prompts[start : start + batch_size]), offset=start
        ).tolist()
    return values


def _score_all(sources, prompts: list, entries: dict[str, dict], batch_size: int) -> None:
    """Scores every candidate's responses with every objective whose cached scores are missing or stale."""
    from tqdm.auto import tqdm

    fingerprints = [s.fingerprint() for s in sources]
    for entry in tqdm(list(entries.values()), desc="Scoring", leave=False):
        if entry["responses"] is None:
            continue
        responses = [as_response(p, r) for p, r in zip(prompts, entry["responses"], strict=True)]
        errors, changed = [], False
        for source, fp in zip(sources, fingerprints, strict=True):
            cached = entry["scores"].get(source.name)
            if cached and cached["fingerprint"] == fp:
                continue
            entry["scores"].pop(source.name, None)
            try:
                values = _score(source, prompts, responses, batch_size)
            except Exception as e:  # a scorer is user code: record its failure for this candidate, go on
                errors.append(f"scorer '{source.name}' failed: {type(e).__name__}: {e}")
                continue
            entry["scores"][source.name] = {"fingerprint": fp, "values": values}
            changed = True
        entry["error"] = "; ".join(errors) or None
        if changed:
            _save_entry(entry)
    for source in sources:
        source.release()


def _save_entry(entry: dict[str, Any]) -> None:
    keep = ("candidate", "fingerprint", "responses", "scores")
    write_atomic(entry["cache_path"], json.dumps({k: entry[k] for k in keep}, indent=1) + "\n")


def _load_entry(path: Path, fp: str, force: bool) -> dict[str, Any] | None:
    if force or not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # an unreadable cache file is regenerated
    return cached if cached.get("fingerprint") == fp and cached.get("responses") is not None else None


def _entry(candidate: Candidate, fp: str, eval_dir: Path, run_dir: Path, force: bool) -> dict[str, Any]:
    """A candidate's responses and scores: from its cache file when that matches `fp`, else empty."""
    name = re.sub(r"[^\w.+-]+", "_", candidate.key)  # labels may hold spaces or brackets
    path = eval_dir / "candidates" / f"{name}.json"
    cached = _load_entry(path, fp, force)
    return {
        "candidate": candidate.describe(run_dir),
        "fingerprint": fp,
        "responses": cached["responses"] if cached else None,
        "scores": cached.get("scores", {}) if cached else {},
        "error": None,
        "cached": cached is not None,
        "cache_path": path,
    }


def compared_results(
    recipe: Recipe, names: list[str], prompts_fp: str, generation: dict[str, Any], own: list[dict]
) -> tuple[list[dict], list[str]]:
    """The finished candidates of the runs in `eval.compare` (their eval/results.json), for one report with this
    run's; notes on runs that cannot be compared: other objectives, prompts or sampling distribution (the
    batch size, seed and backend only pick other samples of it). A compared method that this run also has (another MODPO
    sweep, say) is renamed `<run_name>/<method>`; a candidate this run has too (the reference) is taken once."""
    own_methods, own_keys = {r["method"] for r in own}, {(r["method"], r["label"]) for r in own}
    sampling = ("max_new_tokens", "do_sample", "temperature", "top_p")
    rows, notes = [], []
    for i, folder in enumerate(recipe.eval.compare):
        key, path = f"eval.compare[{i}]", Path(folder) / EVAL_DIR / "results.json"
        if not path.is_file():
            notes.append(f"{key}: no {path}; evaluate that run first (python -m modpo_trl.evaluate {folder})")
            continue
        other = json.loads(path.read_text())
        differs = [
            what
            for what, mine, theirs in (
                ("objectives", names, other.get("objectives")),
                ("prompts", prompts_fp, other.get("prompts_fingerprint")),
                (
                    "sampling settings",
                    [generation[k] for k in sampling],
                    [other.get("generation", {}).get(k) for k in sampling],
                ),
            )
            if mine != theirs
        ]
        if differs:
            notes.append(f"{key}: {folder} was evaluated with other {', '.join(differs)}; not compared")
            continue
        for r in other["candidates"]:
            if r["status"] != "ok" or (r["method"], r["label"]) in own_keys:
                continue
            method = r["method"] if r["method"] not in own_methods else f"{other['run_name']}/{r['method']}"
            rows.append({**r, "method": method, "run": other["run_name"]})
    return rows, notes


# ------------------------------------------------------------------------------------------------ the report
def _result(
    candidate: Candidate, entry: dict, names: list[str], recipe: Recipe, run_dir: Path
) -> dict[str, Any]:
    from .pareto import mean_ci

    scores = {}
    for name in names:
        cached = entry["scores"].get(name)
        if cached:
            mean, ci = mean_ci(cached["values"])
            scores[name] = {"mean": mean, "ci": ci, "n": len(cached["values"])}
    ok = entry["error"] is None and len(scores) == len(names)
    return {
        **candidate.describe(run_dir),
        "run": recipe.run_name,
        "status": "ok" if ok else "failed",
        "error": None if ok else entry["error"] or "not scored",
        "cached": entry["cached"],
        "scores": scores,
    }


def pareto_report(
    results: list[dict], names: list[str], reference_point: list[float] | None
) -> dict[str, Any]:
    """Reference point, hypervolume and non-dominated labels per method (and over all), controllability, and
    generalisation to held-out preferences for conditioned methods."""
    from .pareto import controllability, default_reference_point, generalization, hypervolume, non_dominated

    ok = [r for r in results if r["status"] == "ok"]
    sets: dict[str, list[dict]] = {}
    for r in ok:
        sets.setdefault(r["method"], []).append(r)
    if "rewarded_soups" in sets:  # the soup at an extreme's weighting is the extreme itself
        sets["rewarded_soups"] += [r for r in sets.get("modpo", []) if r["extreme"]]

    def means(rows: list[dict]) -> np.ndarray:
        return np.array([[r["scores"][n]["mean"] for n in names] for r in rows])

    everything = means(ok)
    if reference_point is not None:
        ref, source = np.asarray(reference_point, dtype=float), "eval.reference_point"
    else:
        ref, source = default_reference_point(everything), DEFAULT_REFERENCE
    front = non_dominated(everything)
    report: dict[str, Any] = {
        "reference_point": ref.tolist(),
        "reference_point_source": source,
        "hypervolume": {m: hypervolume(means(rows), ref) for m, rows in sets.items()},
        "non_dominated": {
            "all": [f"{r['method']}/{r['label']}" for r, keep in zip(ok, front, strict=True) if keep],
            **{
                m: [r["label"] for r, keep in zip(rows, non_dominated(means(rows)), strict=True) if keep]
                for m, rows in sets.items()
            },
        },
        "controllability": {},
        "generalization": {},
    }
    for method, rows in sets.items():
        if len(rows) >= 2 and all(r["weights"] is not None for r in rows):
            weights = np.array([r["weights"] for r in rows], dtype=float)
            report["controllability"][method] = controllability(weights, means(rows), names)
        trained = [r for r in rows if not r.get("held_out")]
        heldout = [r for r in rows if r.get("held_out")]
        if heldout and len(trained) >= 2:
            result = generalization(
                [r["weights"] for r in trained],
                means(trained),
                [r["weights"] for r in heldout],
                means(heldout),
                names,
            )
            for row, entry in zip(heldout, result["per_preference"], strict=True):
                entry["label"] = row["label"]
            report["generalization"][method] = result
    return report


def _finite(value: Any) -> Any:
    """NaN/inf -> None, so results.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _csv(results: list[dict], names: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    header = ["run", "method", "label", "status", *(f"w_{n}" for n in names)]
    header += [f"{n}_{s}" for n in names for s in ("mean", "ci")] + ["n", "extreme", "non_dominated", "error"]
    writer.writerow(header)
    for r in results:
        weights = r["weights"] or [None] * len(names)
        cells = [r["run"], r["method"], r["label"], r["status"], *weights]
        for n in names:
            score = r["scores"].get(n, {})
            cells += [score.get("mean"), score.get("ci")]
        n_scored = max((s["n"] for s in r["scores"].values()), default=0)
        cells += [n_scored, r["extreme"], r["non_dominated"], r["error"]]
        writer.writerow(["" if c is None else c for c in cells])
    return out.getvalue()


def _samples(candidates: list[Candidate], entries: dict, prompts: list, model_prompts: dict) -> str:
    """samples.jsonl: one line per candidate and prompt with the response and its scores."""
    lines = []
    for candidate in candidates:
        entry = entries[candidate.key]
        for i, (prompt, response) in enumerate(zip(prompts, entry["responses"] or [], strict=False)):
            row = {
                "method": candidate.method,
                "label": candidate.label,
                "prompt": prompt,
                "response": response,
            }
            if candidate.prompt_fn:
                row["model_prompt"] = model_prompts[candidate.key][i]
            row["scores"] = {n: s["values"][i] for n, s in entry["scores"].items()}
            lines.append(json.dumps(row) + "\n")
    return "".join(lines)


def _plot(results: list[dict], names: list[str], path: Path, title: str) -> Path | None:
    from .plots import plot_pareto

    ok = [r for r in results if r["status"] == "ok"]
    if len(names) < 2 or not ok:
        return None
    points = [
        {
            "method": r["method"],
            "label": r["label"],
            "scores": [r["scores"][n]["mean"] for n in names],
            "ci": [r["scores"][n]["ci"] for n in names],
        }
        for r in ok
    ]
    if any(r["method"] == "rewarded_soups" for r in ok):  # close the soups' front with the shared extremes
        points += [
            {**p, "method": "rewarded_soups", "label": "", "ci": None}
            for p, r in zip(points, ok, strict=True)
            if r["extreme"]
        ]
    return plot_pareto(points, names, path, title=title)


def print_report(report: dict[str, Any]) -> None:
    names = report["objectives"]
    rows = [["method", "label", *names, "front"]]
    for r in report["candidates"]:
        label = r["label"] + (f" (extreme: {r['extreme']})" if r["extreme"] else "")
        if r["run"] != report["run_name"]:  # from eval.compare
            label += f" [{r['run']}]"
        if r["status"] != "ok":
            rows.append([r["method"], label, *["-"] * len(names), f"FAILED: {r['error']}"])
            continue
        cells = [f"{r['scores'][n]['mean']:.4f} ± {r['scores'][n]['ci']:.4f}" for n in names]
        rows.append([r["method"], label, *cells, "*" if r["non_dominated"] else ""])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:  # the last column (mark or error) is not padded
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    pareto = report["pareto"]
    if pareto:
        print("* = non-dominated among all candidates (every objective: higher is better)")
        hv = ", ".join(f"{m} {v:.4g}" for m, v in pareto["hypervolume"].items())
        ref = [round(x, 4) for x in pareto["reference_point"]]
        print(f"hypervolume (reference point {ref}, {pareto['reference_point_source']}): {hv}")
        for method, per_objective in pareto["controllability"].items():
            ranks = ", ".join(
                f"{n} {_fmt(v['spearman'])} / {_fmt(v['kendall_tau'])}" for n, v in per_objective.items()
            )
            print(f"controllability of {method} (Spearman / Kendall, requested weight vs score): {ranks}")
        for method, result in pareto.get("generalization", {}).items():
            errors = ", ".join(f"{n} {v:.4f}" for n, v in result["mean_abs_error"].items())
            print(
                f"generalisation of {method} to held-out preferences (mean |achieved - interpolated|): {errors}"
            )
    for note in report["notes"]:
        print(f"note: {note}")
    for name, path in report["files"].items():
        print(f"{name}: {path}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:+.2f}"


# ------------------------------------------------------------------------------------------------- entry points
def evaluate_sweep(
    run_dir_or_recipe: str | Path | Recipe, overrides: list[str] | None = None, force: bool = False
) -> dict[str, Any]:
    """Generates, scores and compares every candidate of a sweep; writes `<sweep dir>/eval/` and returns the
    content of results.json. `force` ignores the cached responses and scores."""
    from .data import load_prompts

    recipe, run_dir = resolve(run_dir_or_recipe, overrides)
    check_eval(recipe)
    settings = SamplingSettings.from_eval(recipe.eval)
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
        entries[candidate.key] = _entry(candidate, fp, eval_dir, run_dir, force)
    todo = [c for c in candidates if not entries[c.key]["cached"]]
    print(
        f"{run_dir}: {len(candidates)} candidate(s), {len(todo)} to generate, {len(prompts)} prompt(s)",
        flush=True,
    )
    _generate_all(recipe, todo, model_prompts, settings, backend, entries)
    _score_all(sources, prompts, entries, recipe.eval.batch_size)

    results = [_result(c, entries[c.key], names, recipe, run_dir) for c in candidates]
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
    plot = _plot(
        results, names, eval_dir / "pareto.png", f"{recipe.run_name}: {len(prompts)} held-out prompts"
    )
    if plot:
        files["plot"] = plot
    else:  # a plot from an earlier run would no longer match results.json
        (eval_dir / "pareto.png").unlink(missing_ok=True)
    report = _finite(
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
    write_atomic(files["csv"], _csv(results, names))
    write_atomic(files["samples"], _samples(candidates, entries, prompts, model_prompts))
    write_atomic(files["results"], json.dumps(report, indent=2) + "\n")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m modpo_trl.evaluate",
        description="Generate, score and compare every adapter of a sweep with the baselines; plot the front.",
        epilog="example: python -m modpo_trl.evaluate outputs/quickstart eval.num_prompts=16 eval.do_sample=false",
    )
    parser.add_argument(
        "target", help="a sweep directory (with manifest.json) or the recipe YAML that made it"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted recipe overrides, e.g. eval.num_prompts=32"
    )
    parser.add_argument("--force", action="store_true", help="ignore cached responses and scores")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .train import is_user_error

    args = build_parser().parse_intermixed_args(argv)
    try:
        report = evaluate_sweep(args.target, args.overrides, force=args.force)
    except (RecipeError, OSError) as e:
        if not is_user_error(e):
            raise
        print(f"modpo_trl.evaluate: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print_report(report)
    return 0


if __name__ == "__main__":
    # `python -m` runs this file as `__main__`, a second copy of the module: run the importable one, whose
    # `Candidate` is the class that the conditioned methods' `evaluation_candidates` return.
    from modpo_trl.evaluate import main as package_main

    sys.exit(package_main())
