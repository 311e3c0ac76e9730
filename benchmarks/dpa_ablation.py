"""DPA ablation on the offline quickstart: train and evaluate variants of recipes/quickstart/dpa.yaml, then put
them in one report with the MODPO sweep and write the table as JSON.

    python benchmarks/dpa_ablation.py run NAME [key=value ...]      train + evaluate one variant (run_name=NAME),
                                                                    its wall times in outputs/NAME/timing.json
    python benchmarks/dpa_ablation.py report --main NAME --variants NAME [NAME ...] --modpo DIR
                                            [--out docs/results/dpa-ablation.json] [--note TEXT]

`report` re-evaluates the main variant with `eval.compare` = the MODPO sweep and the other variants (their
candidates are cached, so this only rebuilds the report): every hypervolume is measured against that one
report's reference point. Per variant it records the training overrides, hypervolume, Kendall tau and Spearman
rho per objective (requested weight vs mean score over the evaluated directions), the share of prompts whose
answer changes with the direction (from the variant's eval/samples.jsonl) and the wall times. Run it under the
CPU lock of a shared machine (`flock /tmp/modpo_cpu.lock python benchmarks/dpa_ablation.py ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RECIPE = "recipes/quickstart/dpa.yaml"
OUTPUTS = Path("outputs")
TARGET_TAU = 0.6


def run_variant(name: str, overrides: list[str]) -> dict[str, Any]:
    """Trains and evaluates one variant in fresh processes (as a user would); returns and stores its wall times."""
    args = [RECIPE, f"run_name={name}", "eval.compare=[]", *overrides]
    timing: dict[str, Any] = {"overrides": overrides}
    for step in ("train", "evaluate"):
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", f"modpo_trl.{step}", *args], check=True, env=os.environ.copy())
        timing[f"{step}_s"] = round(time.monotonic() - started, 1)
    timing["total_s"] = round(timing["train_s"] + timing["evaluate_s"], 1)
    (OUTPUTS / name / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    return timing


def answer_changes(samples: Path, method: str = "dpa") -> dict[str, Any]:
    """How often the one adapter answers a prompt differently when asked for another direction: the share of
    prompts whose answers at the first and last evaluated angle differ, and whose answers at the first, middle
    and last angle are all different (the issue's measure at t = 0, 45, 90)."""
    answers: dict[str, list[str]] = {}
    for line in samples.read_text().splitlines():
        row = json.loads(line)
        if row["method"] == method:
            answers.setdefault(row["label"], []).append(json.dumps(row["response"]))
    labels = sorted(answers, key=lambda label: float(label[1:].split("-heldout")[0]))
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


def report(main: str, variants: list[str], modpo: str, out: Path, note: str | None) -> dict[str, Any]:
    others = [v for v in variants if v != main]
    compare = [modpo, *(str(OUTPUTS / v) for v in others)]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "modpo_trl.evaluate",
            RECIPE,
            f"run_name={main}",
            *json.loads((OUTPUTS / main / "timing.json").read_text())["overrides"],
            f"eval.compare=[{','.join(compare)}]",
        ],
        check=True,
    )
    results = json.loads((OUTPUTS / main / "eval" / "results.json").read_text())
    pareto = results["pareto"]
    missing = [m for m in ("modpo", *(f"{v}/dpa" for v in others)) if m not in pareto["hypervolume"]]
    if missing:
        raise SystemExit(f"not in the report: {missing}; its notes: {results['notes']}")
    table = []
    for name in [main, *others]:
        method = "dpa" if name == main else f"{name}/dpa"
        timing = json.loads((OUTPUTS / name / "timing.json").read_text())
        tau = {k: v["kendall_tau"] for k, v in pareto["controllability"][method].items()}
        table.append(
            {
                "variant": name,
                "overrides": timing["overrides"],
                "hypervolume": pareto["hypervolume"][method],
                "kendall_tau": tau,
                "spearman": {k: v["spearman"] for k, v in pareto["controllability"][method].items()},
                "target_tau_met": all(t is not None and t >= TARGET_TAU for t in tau.values()),
                "short_of_target": {
                    k: round(max(0.0, TARGET_TAU - (t if t is not None else -1.0)), 4) for k, t in tau.items()
                },
                "answers_change": answer_changes(OUTPUTS / name / "eval" / "samples.jsonl"),
                "wall_s": {k: timing[k] for k in ("train_s", "evaluate_s", "total_s")},
                "means": {
                    r["label"]: {n: s["mean"] for n, s in r["scores"].items()}
                    for r in results["candidates"]
                    if r["method"] == method and r["status"] == "ok"
                },
            }
        )
    document = {
        "what": "DPA on the offline quickstart (relevance vs brevity, SmolLM2-135M, 2 CPU cores): paper SFT vs "
        "directional DPO and the signal options, in one report with the MODPO sweep",
        "label": note,
        "recipe": RECIPE,
        "eval": results["generation"],
        "prompts": results["num_prompts"],
        "notes": results["notes"],
        "reference_point": pareto["reference_point"],
        "modpo": {
            "run": modpo,
            "hypervolume": pareto["hypervolume"].get("modpo"),
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run")
    one.add_argument("name")
    one.add_argument("overrides", nargs="*")
    rep = sub.add_parser("report")
    rep.add_argument("--main", required=True)
    rep.add_argument("--variants", nargs="+", required=True)
    rep.add_argument("--modpo", required=True)
    rep.add_argument("--out", type=Path, default=Path("docs/results/dpa-ablation.json"))
    rep.add_argument("--note")
    args = parser.parse_args(argv)
    if args.command == "run":
        print(json.dumps(run_variant(args.name, args.overrides)))
    else:
        document = report(args.main, args.variants, args.modpo, args.out, args.note)
        for row in document["variants"]:
            print(
                row["variant"], row["hypervolume"], row["kendall_tau"], row["answers_change"], row["wall_s"]
            )


if __name__ == "__main__":
    main()
