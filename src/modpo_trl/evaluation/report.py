"""The evaluation report: per-candidate scores with intervals, the Pareto analysis (hypervolume, non-dominated
sets, controllability, generalisation), other runs joined for comparison, and the files people look at
(results.json, results.csv, samples.jsonl, pareto.png)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..runs.method import Candidate
from ..runs.recipe import Recipe
from .candidates import INTERPOLATIONS
from .pareto import (
    controllability,
    default_reference_point,
    generalization,
    hypervolume,
    mean_ci,
    non_dominated,
)
from .plots import plot_pareto

EVAL_DIR = "eval"
DEFAULT_REFERENCE = "default: min - 10% of the range of all candidates' means, per objective"


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


def candidate_result(
    candidate: Candidate, entry: dict, names: list[str], recipe: Recipe, run_dir: Path
) -> dict[str, Any]:
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
    ok = [r for r in results if r["status"] == "ok"]
    sets: dict[str, list[dict]] = {}
    for r in ok:
        sets.setdefault(r["method"], []).append(r)
    for method in INTERPOLATIONS:  # a soup or MOD mixture at an extreme's weighting is the extreme itself
        if method in sets:
            sets[method] += [r for r in sets.get("modpo", []) if r["extreme"]]

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


def finite(value: Any) -> Any:
    """NaN/inf -> None, so results.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def csv_text(results: list[dict], names: list[str]) -> str:
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


def samples_text(candidates: list[Candidate], entries: dict, prompts: list, model_prompts: dict) -> str:
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


def plot_results(results: list[dict], names: list[str], path: Path, title: str) -> Path | None:
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
    for method in INTERPOLATIONS:  # close the soups' and mixtures' fronts with the shared extremes
        if any(r["method"] == method for r in ok):
            points += [
                {**p, "method": method, "label": "", "ci": None}
                for p, r in zip(points[: len(ok)], ok, strict=True)
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
