"""Do two (or more) runs of the quickstart agree on every claim the README makes?

    make quickstart-rerun          # trains and evaluates the quickstart with seeds 0 and 1, then runs this check
    python -m examples.quickstart.rerun_check outputs/rerun/quickstart-seed0 outputs/rerun/quickstart-seed1 \
        [--json docs/results/quickstart-modpo.json]

Each claim is decided on one run's `eval/results.json` from the paired bootstrap intervals over prompts (see
`modpo_trl.evaluation.bootstrap`): a claim *holds* in a run when the intervals support it, and it *survives*
when it holds in every run. A claim that does not survive must be weakened to what holds in every run.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from modpo_trl.evaluation.bootstrap import PromptBootstrap, resolved
from modpo_trl.storage import write_atomic

TARGET, MARGIN = "brevity", "relevance"


class Run:
    """One run's report, with a bootstrap over its candidates' per-prompt scores for paired differences that
    the report does not list (e.g. between the two extreme adapters)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.report = json.loads((folder / "eval" / "results.json").read_text())
        self.names = self.report["objectives"]
        self.pareto = self.report["pareto"]
        self.rows = [r for r in self.report["candidates"] if r["status"] == "ok"]
        intervals = self.pareto["intervals"]
        values = np.array([[r["scores"][n]["values"] for n in self.names] for r in self.rows])
        self.boot = PromptBootstrap(
            values.transpose(0, 2, 1), intervals["confidence"], intervals["resamples"], intervals["seed"]
        )

    def index(self, method: str, label: str) -> int:
        return next(i for i, r in enumerate(self.rows) if r["method"] == method and r["label"] == label)

    def of(self, method: str) -> list[dict]:
        return [r for r in self.rows if r["method"] == method]

    def difference(self, a: tuple[str, str], b: tuple[str, str], objective: str) -> tuple[float, list[float]]:
        """b's mean minus a's on `objective`, with its interval."""
        k = self.names.index(objective)
        estimate, lo, hi = self.boot.difference(self.index(*a), self.index(*b))
        return float(estimate[k]), [float(lo[k]), float(hi[k])]


def fmt(estimate: float, ci: list[float], spec: str = "+.4f") -> str:
    return f"{estimate:{spec}} [{ci[0]:{spec}}, {ci[1]:{spec}}]"


def every_adapter_briefer(run: Run) -> tuple[bool, str]:
    diffs = [r["scores"][TARGET]["vs_reference"] for r in run.of("modpo")]
    ok = all(d["resolved"] and d["difference"] > 0 for d in diffs)
    low = min(diffs, key=lambda d: d["ci"][0])
    return ok, f"smallest gain {fmt(low['difference'], low['ci'])}"


def weight_buys_relevance(run: Run) -> tuple[bool, str]:
    modpo = run.of("modpo")
    most = max(modpo, key=lambda r: r["weights"][run.names.index(MARGIN)])
    least = min(modpo, key=lambda r: r["weights"][run.names.index(MARGIN)])
    estimate, ci = run.difference(("modpo", least["label"]), ("modpo", most["label"]), MARGIN)
    return bool(resolved(*ci) and estimate > 0), f"{most['label']} - {least['label']}: {fmt(estimate, ci)}"


def controllable(objective: str) -> Callable[[Run], tuple[bool, str]]:
    def claim(run: Run) -> tuple[bool, str]:
        c = run.pareto["controllability"]["modpo"][objective]
        return c["spearman_ci"][0] > 0, (
            f"Spearman {fmt(c['spearman'], c['spearman_ci'], '+.2f')}, "
            f"Kendall {fmt(c['kendall_tau'], c['kendall_tau_ci'], '+.2f')}"
        )

    return claim


def no_resolved_inversion(run: Run) -> tuple[bool, str]:
    pairs = [d for per in run.pareto["neighbours"]["modpo"].values() for d in per]
    inverted = [d for d in pairs if d["resolved"] and not d["as_requested"]]
    good = sum(d["resolved"] and d["as_requested"] for d in pairs)
    return (
        not inverted,
        f"{good} of {len(pairs)} neighbouring orders resolved as requested, {len(inverted)} inverted",
    )


def hypervolume_above(other: str) -> Callable[[Run], tuple[bool, str]]:
    def claim(run: Run) -> tuple[bool, str]:
        d = next(
            d for d in run.pareto["hypervolume_difference"] if (d["first"], d["second"]) == ("modpo", other)
        )
        hv = run.pareto["hypervolume"]
        ratio = hv["modpo"] / hv[other] if hv[other] > 0 else float("inf")
        return d["resolved"] and d[
            "estimate"
        ] > 0, f"difference {fmt(d['estimate'], d['ci'], '+.4g')}, ratio {ratio:.2f}"

    return claim


def no_adapter_more_relevant(run: Run) -> tuple[bool, str]:
    diffs = [r["scores"][MARGIN]["vs_reference"] for r in run.of("modpo")]
    better = [d for d in diffs if d["resolved"] and d["difference"] > 0]
    top = max(diffs, key=lambda d: d["difference"])
    return not better, f"closest: {fmt(top['difference'], top['ci'])}"


def not_dominated(method: str) -> Callable[[Run], tuple[bool, str]]:
    def claim(run: Run) -> tuple[bool, str]:
        (row,) = run.of(method)
        return not row["front"]["dominated_by"], row["front"]["status"]

    return claim


def hypervolume_not_above(other: str) -> Callable[[Run], tuple[bool, str]]:
    """MODPO's front is not larger than `other`'s beyond noise (within noise, or smaller)."""

    def claim(run: Run) -> tuple[bool, str]:
        above, evidence = hypervolume_above(other)(run)
        return not above, evidence

    return claim


def soups_close_to_modpo(run: Run) -> tuple[bool, str]:
    gaps = []
    for soup in run.of("rewarded_soups"):
        for name in run.names:
            estimate, ci = run.difference(("modpo", soup["label"]), ("rewarded_soups", soup["label"]), name)
            gaps.append((resolved(*ci), f"{soup['label']} {name} {fmt(estimate, ci)}"))
    apart = [text for is_resolved, text in gaps if is_resolved]
    return not apart, f"{len(apart)} of {len(gaps)} soup-vs-MODPO differences resolved" + (
        f": {'; '.join(apart)}" if apart else ""
    )


# The README's quickstart claims before the intervals (made on one run of the recipe with sampled answers),
# decided the same way: on the means where they are about the means.


def brevity_range(run: Run) -> tuple[bool, str]:
    values = [r["scores"][TARGET]["mean"] for r in run.of("modpo")]
    (reference,) = run.of("reference")
    text = f"{min(values):.2f}-{max(values):.2f} against {reference['scores'][TARGET]['mean']:.2f}"
    return 0.585 <= min(values) and max(values) < 0.645, text


def relevance_range(run: Run) -> tuple[bool, str]:
    k = run.names.index(MARGIN)
    by_weight = sorted(run.of("modpo"), key=lambda r: r["weights"][k])
    low, high = by_weight[0]["scores"][MARGIN]["mean"], by_weight[-1]["scores"][MARGIN]["mean"]
    return 0.705 <= high < 0.715 and 0.635 <= low < 0.655, f"{high:.2f} down to {low:.2f}"


def spearman_is(values: dict[str, float]) -> Callable[[Run], tuple[bool, str]]:
    def claim(run: Run) -> tuple[bool, str]:
        got = {n: run.pareto["controllability"]["modpo"][n]["spearman"] for n in values}
        return all(round(got[n], 1) == v for n, v in values.items()), ", ".join(
            f"{n} {v:+.2f}" for n, v in got.items()
        )

    return claim


def one_inversion_brevity_end(run: Run) -> tuple[bool, str]:
    inverted = [
        (name, d["lower"], d["higher"])
        for name, pairs in run.pareto["neighbours"]["modpo"].items()
        for d in pairs
        if not d["as_requested"]
    ]
    brevity_end = {"w-0.00-1.00", "w-0.20-0.80"}
    ok = len(inverted) == 1 and set(inverted[0][1:]) == brevity_end
    return ok, f"{len(inverted)} inverted on the means: {inverted}"


def hypervolume_ratio_at_least(other: str, ratio: float) -> Callable[[Run], tuple[bool, str]]:
    def claim(run: Run) -> tuple[bool, str]:
        hv = run.pareto["hypervolume"]
        return hv["modpo"] >= ratio * hv[other], f"{hv['modpo'] / hv[other]:.2f}x"

    return claim


def less_relevant_on_means(run: Run) -> tuple[bool, str]:
    diffs = [r["scores"][MARGIN]["vs_reference"]["difference"] for r in run.of("modpo")]
    return max(diffs) < 0, f"largest difference {max(diffs):+.4f}"


def reference_on_front(run: Run) -> tuple[bool, str]:
    (reference,) = run.of("reference")
    return reference["non_dominated"], reference["front"]["status"]


Decide = Callable[[Run], tuple[bool, str]]
README_CLAIMS: list[tuple[str, Decide]] = [
    ("every adapter is briefer than the untrained model (brevity 0.59-0.64 against 0.52)", brevity_range),
    ("relevance falls from 0.71 at w = (0.8, 0.2) to 0.64-0.65 at the brevity end", relevance_range),
    (
        "controllability (Spearman) is 0.9 for relevance and 1.0 for brevity",
        spearman_is({MARGIN: 0.9, TARGET: 1.0}),
    ),
    ("the one inversion is the two brevity-heavy adapters", one_inversion_brevity_end),
    (
        "MODPO's front has 8x the hypervolume of the untrained model's point",
        hypervolume_ratio_at_least("reference", 7.5),
    ),
    ("... and 1.06x Rewarded Soups'", hypervolume_above("rewarded_soups")),
    ("no adapter is more relevant than the untrained model", less_relevant_on_means),
    ("the untrained model stays on the joint front", reference_on_front),
    ("the interior soups are close to MODPO's points", soups_close_to_modpo),
]

# What the README can claim: every claim is decided on the intervals and holds in both seeds' runs.
CLAIMS: list[tuple[str, Decide]] = [
    ("every MODPO adapter is briefer than the untrained model", every_adapter_briefer),
    ("the most relevance-weighted adapter is more relevant than the brevity-only one", weight_buys_relevance),
    ("controllability: brevity rises with its weight (Spearman > 0)", controllable(TARGET)),
    ("controllability: relevance rises with its weight (Spearman > 0)", controllable(MARGIN)),
    ("no neighbouring weightings are in the wrong order beyond noise", no_resolved_inversion),
    ("MODPO's front has a larger hypervolume than the untrained model", hypervolume_above("reference")),
    (
        "MODPO's front is not larger than Rewarded Soups' beyond noise",
        hypervolume_not_above("rewarded_soups"),
    ),
    ("MODPO's front is not larger than MOD's beyond noise", hypervolume_not_above("mod")),
    ("no adapter is more relevant than the untrained model beyond noise", no_adapter_more_relevant),
    ("no candidate dominates the untrained model beyond noise", not_dominated("reference")),
    # Dropped: "the interior soups are within noise of MODPO's adapters at their weightings" held with seeds 0
    # and 1 and failed in a third run (3 of 6 differences resolved): the soups sit elsewhere on the same front.
    # Weakened: "MODPO's and Rewarded Soups' hypervolumes are within noise of each other" held with seeds 0 and 1
    # of the five-weighting sweep and with seed 0 of the four-weighting one; with seed 1 the soups' front is
    # larger (-0.0082 [-0.0143, -0.0026]).
]


def check(runs: list[Run], claims: list[tuple[str, Decide]] = CLAIMS) -> list[dict[str, Any]]:
    out = []
    for claim, decide in claims:
        verdicts = [decide(run) for run in runs]
        out.append(
            {
                "claim": claim,
                "holds": [bool(ok) for ok, _ in verdicts],
                "evidence": [evidence for _, evidence in verdicts],
                "survives": all(ok for ok, _ in verdicts),
            }
        )
    return out


def headline(run: Run) -> dict[str, Any]:
    """A run's figures with their intervals, for docs/results."""
    p = run.pareto
    return {
        "run": run.report["run_name"],
        "num_prompts": run.report["num_prompts"],
        "generation": run.report["generation"],
        "intervals": p["intervals"],
        "reference_point": p["reference_point"],
        "candidates": [
            {
                "method": r["method"],
                "label": r["label"],
                "front": r["front"]["status"],
                **{
                    n: {
                        "mean": r["scores"][n]["mean"],
                        "ci": r["scores"][n]["ci"],
                        "vs_reference": r["scores"][n].get("vs_reference"),
                    }
                    for n in run.names
                },
            }
            for r in run.rows
        ],
        "hypervolume": {
            m: {"estimate": v, "ci": p["hypervolume_ci"][m]} for m, v in p["hypervolume"].items()
        },
        "hypervolume_difference": p["hypervolume_difference"],
        "controllability": p["controllability"],
        "neighbours": p["neighbours"],
    }


def markdown(runs: list[Run], claims: list[dict[str, Any]]) -> str:
    names = [run.report["run_name"] for run in runs]
    lines = [f"| claim | {' | '.join(names)} | survives |", "|---" * (len(names) + 2) + "|"]
    for c in claims:
        cells = [f"{'yes' if ok else 'no'}: {e}" for ok, e in zip(c["holds"], c["evidence"], strict=True)]
        lines.append(f"| {c['claim']} | {' | '.join(cells)} | {'yes' if c['survives'] else '**no**'} |")
    return "\n".join(lines)


def figures_markdown(runs: list[Run]) -> str:
    """The headline figures of every run, with their intervals: one column per run."""
    rows: dict[str, list[str]] = {}
    for run in runs:
        p = run.pareto
        for method, value in p["hypervolume"].items():
            rows.setdefault(f"hypervolume {method}", []).append(
                fmt(value, p["hypervolume_ci"][method], ".4f")
            )
        for d in p["hypervolume_difference"]:
            rows.setdefault(f"hypervolume {d['first']} - {d['second']}", []).append(
                fmt(d["estimate"], d["ci"], "+.4f")
            )
        for name, c in p["controllability"]["modpo"].items():
            for metric, title in (("spearman", "Spearman"), ("kendall_tau", "Kendall")):
                rows.setdefault(f"{title} {name} (modpo)", []).append(
                    fmt(c[metric], c[f"{metric}_ci"], "+.2f")
                )
        for name, pairs in p["neighbours"]["modpo"].items():
            good = sum(d["resolved"] and d["as_requested"] for d in pairs)
            inverted = sum(d["resolved"] and not d["as_requested"] for d in pairs)
            rows.setdefault(f"neighbouring orders resolved, {name} (modpo)", []).append(
                f"{good} of {len(pairs)} as requested, {inverted} inverted"
            )
    names = [run.report["run_name"] for run in runs]
    level = f"{runs[0].pareto['intervals']['confidence']:.0%}"
    lines = [f"| figure ({level} interval) | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {figure} | {' | '.join(cells)} |" for figure, cells in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.quickstart.rerun_check", description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="evaluated quickstart run folders")
    parser.add_argument("--json", type=Path, help="also write the claims and every run's figures here")
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.runs if not (f / "eval" / "results.json").is_file()]
    if missing:
        parser.error(
            f"no eval/results.json in {missing}: evaluate them first (python -m modpo_trl.evaluate ...)"
        )
    runs = [Run(f) for f in args.runs]
    claims, before = check(runs), check(runs, README_CLAIMS)
    print(figures_markdown(runs))
    print("\nThe README's claims before the intervals:\n")
    print(markdown(runs, before))
    print("\nWhat it can claim:\n")
    print(markdown(runs, claims))
    if args.json:
        result = {
            "what": "the quickstart run once per seed; which claims hold in every run (rerun_check.py)",
            "command": " ".join(["python -m examples.quickstart.rerun_check", *map(str, args.runs)]),
            "date": time.strftime("%Y-%m-%d"),
            "source": "the runs' eval/results.json: "
            + ", ".join(str(f / "eval" / "results.json") for f in args.runs),
            "claims": claims,
            "readme_claims_before": before,
            "runs": [headline(run) for run in runs],
        }
        write_atomic(args.json, json.dumps(result, indent=1) + "\n")
    return 0 if all(c["survives"] for c in claims) else 1


if __name__ == "__main__":
    raise SystemExit(main())
