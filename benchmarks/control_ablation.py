"""Controllability ablations of the preference-conditioned methods (MOC, DPA) on the offline quickstart: train
and evaluate variants of recipes/quickstart/<method>.yaml, then put them in one report with the MODPO sweep and
write the table as JSON.

    python benchmarks/control_ablation.py run METHOD NAME [key=value ...]   train + evaluate one variant
                                            (run_name=NAME), its wall times in outputs/NAME/timing.json
    python benchmarks/control_ablation.py report METHOD --main NAME --variants NAME [NAME ...] --modpo DIR
                                            [--out docs/results/METHOD-ablation.json] [--note TEXT]

`report` re-evaluates the main variant with `eval.compare` = the MODPO sweep and the other variants (their
candidates are cached, so this only rebuilds the report): every hypervolume is measured against that one
report's reference point. Per variant it records the training overrides, hypervolume, Kendall tau and Spearman
rho per objective (requested weight vs mean score over the evaluated preferences or directions), the share of
prompts whose answer changes with the preference (from the variant's eval/samples.jsonl) and the wall times. Run
it under the CPU lock of a shared machine (`flock /tmp/modpo_cpu.lock python benchmarks/control_ablation.py ...`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from modpo_trl.evaluation.report import pareto_report

OUTPUTS = Path("outputs")
# The targets: Kendall tau >= 0.8 on every objective for MOC (with hypervolume >= 0.9x the sweep's), 0.6 for DPA.
TARGET_TAU = {"moc": 0.8, "dpa": 0.6}
TARGET_HYPERVOLUME_RATIO = {"moc": 0.9}


def recipe(method: str) -> str:
    return f"recipes/quickstart/{method}.yaml"


def run_variant(method: str, name: str, overrides: list[str]) -> dict[str, Any]:
    """Trains and evaluates one variant in fresh processes (as a user would); returns and stores its wall times."""
    args = [recipe(method), f"run_name={name}", "eval.compare=[]", *overrides]
    timing: dict[str, Any] = {"overrides": overrides}
    for step in ("train", "evaluate"):
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", f"modpo_trl.{step}", *args], check=True, env=os.environ.copy())
        timing[f"{step}_s"] = round(time.monotonic() - started, 1)
    timing["total_s"] = round(timing["train_s"] + timing["evaluate_s"], 1)
    (OUTPUTS / name / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    return timing


def answer_changes(samples: Path, weights: dict[str, list[float]], method: str) -> dict[str, Any]:
    """How often the one adapter answers a prompt differently when asked for another preference: the share of
    prompts whose answers at the two ends of the evaluated preferences differ, whose answers at the first, middle
    and last are all different (the issue's measure at t = 0, 45, 90), and whose answers differ anywhere.
    `weights`: each label's requested weights, which order the preferences (most weight on the first objective
    first)."""
    answers: dict[str, list[str]] = {}
    for line in samples.read_text().splitlines():
        row = json.loads(line)
        if row["method"] == method:
            answers.setdefault(row["label"], []).append(json.dumps(row["response"]))
    labels = sorted(answers, key=lambda label: -weights[label][0])
    first, middle, last = (answers[labels[i]] for i in (0, len(labels) // 2, -1))
    n = len(first)
    ends = sum(a != b for a, b in zip(first, last, strict=True))
    three = sum(len({a, b, c}) == 3 for a, b, c in zip(first, middle, last, strict=True))
    return {
        "angles": [labels[0], labels[len(labels) // 2], labels[-1]],
        "prompts": n,
        "share_first_vs_last_differ": ends / n,
        "share_three_differ": three / n,
        "any_direction_differs": sum(len({a[i] for a in answers.values()}) > 1 for i in range(n)) / n,
    }


def own_report(results: dict[str, Any], key: str, method: str) -> dict[str, Any]:
    """The variant `key` against the MODPO sweep in the report its own evaluation would make (its candidates, the
    sweep, its baselines and the reference model: their reference point alone), from the joint report's per-prompt
    scores. The joint report's default reference point moves with every variant in it (a variant that collapses
    far along one objective stretches that axis for all), so the hypervolume ratio is given both ways."""
    ok = [r for r in results["candidates"] if r["status"] == "ok"]
    rows = [{**r, "method": method} for r in ok if r["method"] == key] + [  # first: "method - modpo" below
        r for r in ok if r["method"] != method and "/" not in r["method"]
    ]
    rows = copy.deepcopy(rows)  # pareto_report annotates its rows
    joint, intervals = results["pareto"], results["pareto"]["intervals"]
    fixed = joint["reference_point"] if joint["reference_point_source"] == "eval.reference_point" else None
    pareto = pareto_report(
        rows, results["objectives"], fixed, intervals["confidence"], intervals["resamples"], intervals["seed"]
    )
    hv = pareto["hypervolume"]
    (difference,) = [
        d for d in pareto["hypervolume_difference"] if (d["first"], d["second"]) == (method, "modpo")
    ]
    return {
        "reference_point": pareto["reference_point"],
        "hypervolume": hv[method],
        "hypervolume_ci": pareto["hypervolume_ci"][method],
        "modpo_hypervolume": hv["modpo"],
        "hypervolume_ratio_to_modpo": hv[method] / hv["modpo"] if hv["modpo"] else None,
        "difference_from_modpo": {k: difference[k] for k in ("estimate", "ci", "resolved")},
    }


def report(
    method: str, main: str, variants: list[str], modpo: str, out: Path, note: str | None
) -> dict[str, Any]:
    others = [v for v in variants if v != main]
    compare = [modpo, *(str(OUTPUTS / v) for v in others)]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "modpo_trl.evaluate",
            recipe(method),
            f"run_name={main}",
            *json.loads((OUTPUTS / main / "timing.json").read_text())["overrides"],
            f"eval.compare=[{','.join(compare)}]",
        ],
        check=True,
    )
    results = json.loads((OUTPUTS / main / "eval" / "results.json").read_text())
    pareto = results["pareto"]
    missing = [m for m in ("modpo", *(f"{v}/{method}" for v in others)) if m not in pareto["hypervolume"]]
    if missing:
        raise SystemExit(f"not in the report: {missing}; its notes: {results['notes']}")
    target_tau, modpo_hv = TARGET_TAU[method], pareto["hypervolume"].get("modpo")
    table = []
    for name in [main, *others]:
        key = method if name == main else f"{name}/{method}"
        timing = json.loads((OUTPUTS / name / "timing.json").read_text())
        control = pareto["controllability"][key]
        tau = {k: v["kendall_tau"] for k, v in control.items()}
        rows = [r for r in results["candidates"] if r["method"] == key and r["status"] == "ok"]
        hypervolume = pareto["hypervolume"][key]
        ratio = hypervolume / modpo_hv if modpo_hv else None
        alone = own_report(results, key, method)
        table.append(
            {
                "variant": name,
                "overrides": timing["overrides"],
                "hypervolume": hypervolume,
                "hypervolume_ci": pareto["hypervolume_ci"][key],
                "hypervolume_ratio_to_modpo": ratio,
                "own_report": alone,
                "kendall_tau": tau,
                "kendall_tau_ci": {k: v["kendall_tau_ci"] for k, v in control.items()},
                "spearman": {k: v["spearman"] for k, v in control.items()},
                "target_tau_met": all(t is not None and t >= target_tau for t in tau.values()),
                "short_of_target": {
                    k: round(max(0.0, target_tau - (t if t is not None else -1.0)), 4) for k, t in tau.items()
                },
                "target_hypervolume_met": (
                    None
                    if method not in TARGET_HYPERVOLUME_RATIO or alone["hypervolume_ratio_to_modpo"] is None
                    else min(ratio, alone["hypervolume_ratio_to_modpo"]) >= TARGET_HYPERVOLUME_RATIO[method]
                ),
                "answers_change": answer_changes(
                    OUTPUTS / name / "eval" / "samples.jsonl",
                    {r["label"]: r["weights"] for r in rows},
                    method,
                ),
                "wall_s": {k: timing[k] for k in ("train_s", "evaluate_s", "total_s")},
                "means": {r["label"]: {n: s["mean"] for n, s in r["scores"].items()} for r in rows},
            }
        )
    document = {
        "what": f"{method.upper()} variants on the offline quickstart (relevance vs brevity, SmolLM2-135M, 2 CPU "
        "cores), in one report with the MODPO sweep",
        "label": note,
        "command": f"python benchmarks/control_ablation.py report {method} --main {main} --variants "
        f"{' '.join(variants)} --modpo {modpo} (each variant: run {method} NAME overrides)",
        "date": time.strftime("%Y-%m-%d"),
        "source": f"outputs/{main}/eval/results.json (one report: the variants and the MODPO sweep)",
        "recipe": recipe(method),
        "targets": {
            "kendall_tau": target_tau,
            "hypervolume_ratio_to_modpo": TARGET_HYPERVOLUME_RATIO.get(method),
        },
        "eval": results["generation"],
        "prompts": results["num_prompts"],
        "notes": results["notes"],
        "reference_point": pareto["reference_point"],
        "modpo": {
            "run": modpo,
            "hypervolume": modpo_hv,
            "hypervolume_ci": pareto["hypervolume_ci"].get("modpo"),
            "kendall_tau": {
                k: v["kendall_tau"] for k, v in pareto["controllability"].get("modpo", {}).items()
            },
        },
        "reference_hypervolume": pareto["hypervolume"].get("reference"),
        "variants": table,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    return document


def markdown(document: dict[str, Any]) -> str:
    """The ablation as a markdown table: one row per variant."""
    modpo = document["modpo"]
    lines = [
        f"| variant | hypervolume (MODPO sweep {modpo['hypervolume']:.4f}) | x MODPO (this report / its own) | "
        "Kendall tau "
        + " / ".join(modpo["kendall_tau"])
        + " | answers that change (ends / anywhere) | wall time (train + evaluate) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in document["variants"]:
        lo, hi = row["hypervolume_ci"]
        taus = " / ".join(
            f"{t:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"
            for t, ci in zip(row["kendall_tau"].values(), row["kendall_tau_ci"].values(), strict=True)
        )
        change, wall = row["answers_change"], row["wall_s"]
        lines.append(
            f"| {row['variant']} | {row['hypervolume']:.4f} [{lo:.4f}, {hi:.4f}] | "
            f"{row['hypervolume_ratio_to_modpo']:.2f} / {row['own_report']['hypervolume_ratio_to_modpo']:.2f} | {taus} | {change['share_first_vs_last_differ']:.0%} / "
            f"{change['any_direction_differs']:.0%} | {wall['total_s'] / 60:.1f} min ({wall['train_s'] / 60:.1f} + "
            f"{wall['evaluate_s'] / 60:.1f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run")
    one.add_argument("method", choices=sorted(TARGET_TAU))
    one.add_argument("name")
    one.add_argument("overrides", nargs="*")
    rep = sub.add_parser("report")
    rep.add_argument("method", choices=sorted(TARGET_TAU))
    rep.add_argument("--main", required=True)
    rep.add_argument("--variants", nargs="+", required=True)
    rep.add_argument("--modpo", required=True)
    rep.add_argument("--out", type=Path, help="default: docs/results/METHOD-ablation.json")
    rep.add_argument("--note")
    args = parser.parse_args(argv)
    if args.command == "run":
        print(json.dumps(run_variant(args.method, args.name, args.overrides)))
    else:
        out = args.out or Path(f"docs/results/{args.method}-ablation.json")
        print(markdown(report(args.method, args.main, args.variants, args.modpo, out, args.note)))


if __name__ == "__main__":
    main()
