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
from .bootstrap import DOMINATED, DOMINATED_NOISY, FRONT, FRONT_NOISY, PromptBootstrap, resolved
from .candidates import INTERPOLATIONS
from .pareto import default_reference_point, generalization, mean_ci, non_dominated
from .plots import plot_pareto

EVAL_DIR = "eval"
DEFAULT_REFERENCE = "default: min - 10% of the range of all candidates' means, per objective"


def compared_results(
    recipe: Recipe, names: list[str], prompts_fp: str, generation: dict[str, Any], own: list[dict]
) -> tuple[list[dict], list[str]]:
    """The finished candidates of the runs in `eval.compare` (their eval/results.json), for one report with this
    run's; notes on runs that cannot be compared: other objectives, prompts or sampling distribution (the
    batch size, seed and backend only pick other samples of it). Only a compared run's own candidates are taken, not
    those its report got from its own `eval.compare` (an older evaluation of some sweep, say). A method that this run
    or an earlier compared run already has (another MODPO sweep, say) is renamed `<run_name>/<method>`, whatever
    its labels; the reference (the same untrained model on the same prompts) is taken once."""
    holder = {r["method"]: None for r in own}  # method -> the compared run whose candidates go by that name
    references = {r["label"] for r in own if r["method"] == "reference"}
    sampling = ["max_new_tokens", "do_sample"] + (["temperature", "top_p"] if generation["do_sample"] else [])
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
        run = other["run_name"]
        # that run's own candidates: the rows its report took from its own eval.compare have another "run"
        rows_of_run = [r for r in other["candidates"] if r["status"] == "ok" and r.get("run", run) == run]
        if any("values" not in score for r in rows_of_run for score in r["scores"].values()):
            notes.append(
                f"{key}: {path} has no per-prompt scores (made by an older version): evaluate {folder} again "
                "(its answers are cached) to compare it"
            )
            continue
        for r in rows_of_run:
            if r["method"] == "reference":
                if r["label"] in references:
                    continue
                references.add(r["label"])
            method = r["method"] if holder.setdefault(r["method"], run) == run else f"{run}/{r['method']}"
            rows.append({**r, "method": method, "run": run})
    return rows, notes


def candidate_result(
    candidate: Candidate, entry: dict, names: list[str], recipe: Recipe, run_dir: Path
) -> dict[str, Any]:
    scores = {}
    for name in names:
        cached = entry["scores"].get(name)
        if cached:
            mean, ci = mean_ci(cached["values"], recipe.eval.confidence)
            # the per-prompt values make the report's paired intervals (and other runs' eval.compare) possible
            scores[name] = {"mean": mean, "ci": ci, "n": len(cached["values"]), "values": cached["values"]}
    ok = entry["error"] is None and len(scores) == len(names)
    return {
        **candidate.describe(run_dir),
        "run": recipe.run_name,
        "status": "ok" if ok else "failed",
        "error": None if ok else entry["error"] or "not scored",
        "cached": entry["cached"],
        "scores": scores,
    }


def key_of(row: dict) -> str:
    return f"{row['method']}/{row['label']}"


def pareto_report(
    results: list[dict],
    names: list[str],
    reference_point: list[float] | None,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Reference point, hypervolume and non-dominated labels per method (and over all), controllability, the
    order of neighbouring weightings, and generalisation to held-out preferences for conditioned methods; every
    figure with its paired bootstrap interval over prompts (`modpo_trl.evaluation.bootstrap`).

    Adds to each candidate row of `results`: `non_dominated` (on the means, among all candidates), `front` (its
    place in that front, beyond noise or not) and, per objective, `vs_reference` (its paired difference from
    the reference model)."""
    ok = [r for r in results if r["status"] == "ok"]
    sets: dict[str, list[int]] = {}
    for i, r in enumerate(ok):
        sets.setdefault(r["method"], []).append(i)
    for method in INTERPOLATIONS:  # a soup or MOD mixture at an extreme's weighting is the extreme itself
        if method in sets:
            sets[method] += [i for i in sets.get("modpo", []) if ok[i]["extreme"]]
    values = np.array([[r["scores"][n]["values"] for n in names] for r in ok], dtype=float)
    boot = PromptBootstrap(values.transpose(0, 2, 1), confidence, resamples, seed)
    if reference_point is not None:
        ref, source = np.asarray(reference_point, dtype=float), "eval.reference_point"
    else:
        ref, source = default_reference_point(boot.means), DEFAULT_REFERENCE
    # the reference model last, so that differences read "method - reference"
    hypervolumes = boot.hypervolumes({m: sets[m] for m in sorted(sets, key=lambda m: m == "reference")}, ref)
    report: dict[str, Any] = {
        "reference_point": ref.tolist(),
        "reference_point_source": source,
        "intervals": {
            "confidence": confidence,
            "method": "percentile bootstrap over prompts, paired: one resample of the prompts for all candidates",
            "resamples": resamples,
            "seed": seed,
            "num_prompts": values.shape[2],
        },
        "hypervolume": {m: v["estimate"] for m, v in hypervolumes["value"].items()},
        "hypervolume_ci": {m: v["ci"] for m, v in hypervolumes["value"].items()},
        "hypervolume_difference": hypervolumes["difference"],
        "non_dominated": {
            "all": [key_of(ok[i]) for i in np.flatnonzero(non_dominated(boot.means))],
            **{
                m: [
                    ok[i]["label"]
                    for i, keep in zip(rows, non_dominated(boot.means[rows]), strict=True)
                    if keep
                ]
                for m, rows in sets.items()
            },
        },
        "controllability": {},
        "neighbours": {},
        "generalization": {},
    }
    reference = next((i for i, r in enumerate(ok) if r["method"] == "reference"), None)
    for row in ok:  # a compared run's rows carry its own report's differences
        for name in names:
            row["scores"][name].pop("vs_reference", None)
    for i, (row, place) in enumerate(zip(ok, boot.front(), strict=True)):
        row["non_dominated"] = place["status"] in (FRONT, FRONT_NOISY)
        row["front"] = {
            "status": place["status"],
            "dominated_by": [key_of(ok[j]) for j in place["dominated_by"]],
            "may_be_dominated_by": [key_of(ok[j]) for j in place["may_be_dominated_by"]],
        }
        if reference is not None:
            estimate, lo, hi = boot.difference(reference, i)
            for k, name in enumerate(names):
                row["scores"][name]["vs_reference"] = {
                    "difference": float(estimate[k]),
                    "ci": [float(lo[k]), float(hi[k])],
                    "resolved": bool(resolved(lo[k], hi[k])),
                }
    for method, rows in sets.items():
        # Controllability: each objective's score against the weight requested for it (DPA: v's component), so a
        # model that follows its preference has positive tau on every objective, whatever the angle range.
        weights = [ok[i]["weights"] for i in rows]
        if len(rows) >= 2 and all(w is not None and len(w) == len(names) for w in weights):
            requested = np.array(weights, dtype=float)
            labels = [ok[i]["label"] for i in rows]
            report["controllability"][method] = boot.controllability(rows, requested, names)
            report["neighbours"][method] = boot.neighbours(rows, requested, labels, names)
        # Generalisation: interpolated over the preference's own coordinates (DPA's angle: v = (cos t, sin t)
        # folds +t and -t together in cos t) when every candidate has them, else over its weights.
        parameters = [ok[i].get("parameter") for i in rows]
        by_parameter = all(parameters) and len({tuple(p) for p in parameters}) == 1
        coordinates = [
            list(p.values()) if by_parameter else w for p, w in zip(parameters, weights, strict=True)
        ]
        trained = [(c, i) for c, i in zip(coordinates, rows, strict=True) if not ok[i].get("held_out")]
        heldout = [(c, i) for c, i in zip(coordinates, rows, strict=True) if ok[i].get("held_out")]
        if heldout and len(trained) >= 2:
            result = generalization(
                [c for c, _ in trained],
                boot.means[[i for _, i in trained]],
                [c for c, _ in heldout],
                boot.means[[i for _, i in heldout]],
                names,
                simplex=not by_parameter,
            )
            for (_, i), entry in zip(heldout, result["per_preference"], strict=True):
                entry.update(label=ok[i]["label"], weights=ok[i]["weights"], parameter=ok[i].get("parameter"))
            result["interpolated_over"] = " / ".join(parameters[0]) if by_parameter else "weights"
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
    """results.csv: one row per candidate; per objective its mean with the half-width of its interval, and its
    paired difference from the reference model with that interval's bounds."""
    out = io.StringIO()
    writer = csv.writer(out)
    header = ["run", "method", "label", "status", *(f"w_{n}" for n in names)]
    for n in names:
        header += [f"{n}_mean", f"{n}_ci", f"{n}_minus_reference", f"{n}_minus_reference_lo"]
        header += [f"{n}_minus_reference_hi"]
    header += ["n", "extreme", "non_dominated", "front", "error"]
    writer.writerow(header)
    for r in results:
        weights = r["weights"] or [None] * len(names)
        cells = [r["run"], r["method"], r["label"], r["status"], *weights]
        for n in names:
            score = r["scores"].get(n, {})
            vs = score.get("vs_reference") or {"difference": None, "ci": [None, None]}
            cells += [score.get("mean"), score.get("ci"), vs["difference"], *vs["ci"]]
        n_scored = max((s["n"] for s in r["scores"].values()), default=0)
        front = (r.get("front") or {}).get("status")
        cells += [n_scored, r["extreme"], r["non_dominated"], front, r["error"]]
        writer.writerow(["" if c is None else c for c in cells])
    return out.getvalue()


def metrics_csv_text(pareto: dict[str, Any]) -> str:
    """metrics.csv: the report's headline figures, one per row, each with its interval (long format; an
    undefined figure, e.g. a rank correlation of constant scores, is left empty)."""
    out = io.StringIO()
    writer = csv.writer(out)

    def row(*cells: Any) -> None:
        writer.writerow(["" if c is None else c for c in cells])

    row("metric", "method", "objective", "first", "second", "estimate", "ci_lo", "ci_hi", "resolved")
    for method, value in pareto["hypervolume"].items():
        row("hypervolume", method, "", "", "", value, *pareto["hypervolume_ci"][method], "")
    for d in pareto["hypervolume_difference"]:
        row("hypervolume_difference", "", "", d["first"], d["second"], d["estimate"], *d["ci"], d["resolved"])
    for method, per_objective in pareto["controllability"].items():
        for name, c in per_objective.items():
            for metric in ("kendall_tau", "spearman"):
                row(metric, method, name, "", "", c[metric], *c[f"{metric}_ci"], "")
    for method, per_objective in pareto["neighbours"].items():
        for name, pairs in per_objective.items():
            for d in pairs:
                row(
                    "neighbour_difference",
                    method,
                    name,
                    d["lower"],
                    d["higher"],
                    d["difference"],
                    *d["ci"],
                    d["resolved"],
                )
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


def plot_results(
    results: list[dict], names: list[str], pareto: dict | None, path: Path, title: str
) -> Path | None:
    """pareto.png: every candidate's means, the methods' fronts, and a dotted link between neighbouring
    weightings whose order is not resolved."""
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
    index = {(r["method"], r["label"]): i for i, r in enumerate(ok)}
    for method in INTERPOLATIONS:  # close the soups' and mixtures' fronts with the shared extremes
        if any(r["method"] == method for r in ok):
            for p, r in zip(points[: len(ok)], ok, strict=True):
                if r["extreme"]:
                    index[method, r["label"]] = len(points)  # the interpolation's neighbour is this copy
                    points.append({**p, "method": method, "label": "", "ci": None})
    unresolved = [
        (index[method, d["lower"]], index[method, d["higher"]], names.index(name))
        for method, per_objective in (pareto or {}).get("neighbours", {}).items()
        for name, pairs in per_objective.items()
        for d in pairs
        if not d["resolved"]
    ]
    return plot_pareto(points, names, path, title=title, unresolved=unresolved)


MARKS = {FRONT: "*", FRONT_NOISY: "*?", DOMINATED_NOISY: "?", DOMINATED: ""}


def print_report(report: dict[str, Any]) -> None:
    names = report["objectives"]
    rows = [["method", "label", *names, "front"]]
    differences = [["method", "label", *names]]
    for r in report["candidates"]:
        label = r["label"] + (f" (extreme: {r['extreme']})" if r["extreme"] else "")
        if r["run"] != report["run_name"]:  # from eval.compare
            label += f" [{r['run']}]"
        if r["status"] != "ok":
            rows.append([r["method"], label, *["-"] * len(names), f"FAILED: {r['error']}"])
            continue
        cells = [f"{r['scores'][n]['mean']:.4f} ± {r['scores'][n]['ci']:.4f}" for n in names]
        rows.append([r["method"], label, *cells, MARKS[r["front"]["status"]] if r.get("front") else ""])
        if r["method"] != "reference" and "vs_reference" in r["scores"][names[0]]:
            vs = [r["scores"][n]["vs_reference"] for n in names]
            differences.append(
                [r["method"], label, *(f"{v['difference']:+.4f} {_interval(v['ci'])}" for v in vs)]
            )
    _print_table(rows)
    pareto = report["pareto"]
    if pareto:
        level = f"{pareto['intervals']['confidence']:.0%}"
        print(
            "front: * non-dominated among all candidates on the means (every objective: higher is better);\n"
            "       *? non-dominated, but within noise of being dominated; ? dominated, but only within noise"
        )
        over = f"paired bootstrap over the {pareto['intervals']['num_prompts']} prompts"
        if len(differences) > 1:
            print(f"difference from the reference model, {level} interval ({over}):")
            _print_table([[*row, ""] for row in differences], indent="  ")
        hv = ", ".join(
            f"{m} {v:.4g} {_interval(pareto['hypervolume_ci'][m], '.4g')}"
            for m, v in pareto["hypervolume"].items()
        )
        ref = [round(x, 4) for x in pareto["reference_point"]]
        print(
            f"hypervolume, {level} interval (reference point {ref}, {pareto['reference_point_source']}): {hv}"
        )
        if pareto["hypervolume_difference"]:
            print(
                "hypervolume difference: "
                + "; ".join(
                    f"{d['first']} - {d['second']} {d['estimate']:+.4g} {_interval(d['ci'], '+.4g')}"
                    + ("" if d["resolved"] else " (unresolved)")
                    for d in pareto["hypervolume_difference"]
                )
            )
        for method, per_objective in pareto["controllability"].items():
            ranks = ", ".join(
                f"{n} {_fmt(v['spearman'])} {_interval(v['spearman_ci'], '+.2f')} / {_fmt(v['kendall_tau'])} "
                f"{_interval(v['kendall_tau_ci'], '+.2f')}"
                for n, v in per_objective.items()
            )
            print(
                f"controllability of {method} (Spearman / Kendall, requested weight vs score, {level}): {ranks}"
            )
        for method, per_objective in pareto["neighbours"].items():
            print(f"neighbouring weightings of {method} (more weight minus less, {level} paired interval):")
            for name, pairs in per_objective.items():
                print(f"  {name}: {_neighbour_summary(pairs)}")
        for method, result in pareto.get("generalization", {}).items():
            errors = ", ".join(f"{n} {v:.4f}" for n, v in result["mean_abs_error"].items())
            print(
                f"generalisation of {method} to held-out preferences (mean |achieved - interpolated|): {errors}"
            )
    for note in report["notes"]:
        print(f"note: {note}")
    for name, path in report["files"].items():
        print(f"{name}: {path}")


def _neighbour_summary(pairs: list[dict]) -> str:
    """`3 of 4 resolved as requested; unresolved: a -> b -0.0140 [-0.0301, +0.0021]`."""
    good = sum(d["resolved"] and d["as_requested"] for d in pairs)
    text = f"{good} of {len(pairs)} resolved as requested"
    for kind, keep in (
        ("inverted", lambda d: d["resolved"] and not d["as_requested"]),
        ("unresolved", lambda d: not d["resolved"]),
    ):
        listed = [
            f"{d['lower']} -> {d['higher']} {d['difference']:+.4f} {_interval(d['ci'])}"
            for d in pairs
            if keep(d)
        ]
        if listed:
            text += f"; {kind}: " + ", ".join(listed)
    return text


def _print_table(rows: list[list[str]], indent: str = "") -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:  # the last column (mark or error) is not padded
        print(
            indent
            + ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1]).rstrip()
        )


def _interval(bounds: list[float | None], spec: str = "+.4f") -> str:
    return "[" + ", ".join("n/a" if b is None else format(b, spec) for b in bounds) + "]"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:+.2f}"
