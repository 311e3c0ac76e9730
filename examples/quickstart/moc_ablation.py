"""The MOC ablation table of docs/moc.md, from evaluated quickstart runs.

    python -m examples.quickstart.moc_ablation outputs/<report run> <run dir> ... \
        [--timings timings.json] [--out docs/results/moc-ablation.json]

The first run's `eval/results.json` must join the MODPO sweep and every other run (its `eval.compare`), so that
all hypervolumes share one reference point. Per MOC run: its training settings, hypervolume (and its ratio to the
MODPO sweep's), Kendall's tau per objective over every evaluated preference, whether each held-out preference
landed between its evaluated neighbours (per objective, on the line of `w_0`), the share of prompts whose answer
changes with the preference, and wall times (`--timings`: `{run_name: {"train_s": .., "eval_s": ..}}`, measured
around the two commands).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

SETTINGS = (
    "conditioning",
    "moo_solver",
    "control_loss",
    "control_weight",
    "preference_sampling",
    "grid_steps",
    "dirichlet_alpha",
    "preference_augmentation",
    "preference_rank",
    "learning_rate",
    "max_steps",
    "per_device_train_batch_size",
)


def between_neighbours(rows: list[dict], names: list[str]) -> list[dict[str, Any]]:
    """For each held-out preference: its evaluated neighbours along `w_0` and, per objective, whether its mean
    lies between theirs (inclusive)."""
    trained = sorted((r for r in rows if not r["held_out"]), key=lambda r: r["weights"][0])
    out = []
    for r in (r for r in rows if r["held_out"]):
        w0 = r["weights"][0]
        below = [t for t in trained if t["weights"][0] < w0]
        above = [t for t in trained if t["weights"][0] > w0]
        if not below or not above:
            out.append({"weights": r["weights"], "neighbours": None, "between": None})
            continue
        lo, hi = below[-1], above[0]
        between = {}
        for n in names:
            a, b = lo["scores"][n]["mean"], hi["scores"][n]["mean"]
            between[n] = min(a, b) <= r["scores"][n]["mean"] <= max(a, b)
        out.append(
            {"weights": r["weights"], "neighbours": [lo["weights"], hi["weights"]], "between": between}
        )
    return out


def changed_share(run_dir: Path, method: str = "moc") -> dict[str, Any]:
    """Prompts whose response differs between at least two of the run's evaluated preferences."""
    responses: dict[str, set[str]] = defaultdict(set)
    for line in (run_dir / "eval" / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["method"] == method:
            responses[json.dumps(row["prompt"])].add(row["response"])
    changed = sum(len(r) > 1 for r in responses.values())
    return {"changed": changed, "prompts": len(responses), "share": changed / max(len(responses), 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="the report's run first, then the other MOC runs")
    parser.add_argument("--timings", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    report = json.loads((args.runs[0] / "eval" / "results.json").read_text())
    names, pareto = report["objectives"], report["pareto"]
    timings = json.loads(args.timings.read_text()) if args.timings else {}
    modpo_hv = pareto["hypervolume"].get("modpo")
    cells = []
    for run_dir in args.runs:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        run_name = recipe["run_name"]
        key = "moc" if run_name == report["run_name"] else f"{run_name}/moc"
        rows = [r for r in report["candidates"] if r["method"] == key and r["status"] == "ok"]
        if not rows:
            raise SystemExit(f"{run_dir}: no candidates of {key!r} in {args.runs[0]}/eval/results.json")
        hv = pareto["hypervolume"][key]
        cells.append(
            {
                "run_name": run_name,
                "settings": {k: recipe["training"].get(k) for k in SETTINGS},
                "hypervolume": hv,
                "hypervolume_vs_modpo": hv / modpo_hv if modpo_hv else None,
                "kendall_tau": {n: pareto["controllability"][key][n]["kendall_tau"] for n in names},
                "heldout": between_neighbours(rows, names),
                "answers_changing_with_w": changed_share(run_dir),
                "points": {r["label"]: {n: r["scores"][n]["mean"] for n in names} for r in rows},
                "wall_time_s": timings.get(run_name),
            }
        )
    result = {
        "report": str(args.runs[0] / "eval" / "results.json"),
        "objectives": names,
        "num_prompts": report["num_prompts"],
        "generation": report["generation"],
        "reference_point": pareto["reference_point"],
        "modpo": {
            "hypervolume": modpo_hv,
            "kendall_tau": {
                n: v["kendall_tau"] for n, v in pareto["controllability"].get("modpo", {}).items()
            },
        },
        "reference_model_hypervolume": pareto["hypervolume"].get("reference"),
        "cells": cells,
    }
    text = json.dumps(result, indent=2) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")
    return result


if __name__ == "__main__":
    main()
