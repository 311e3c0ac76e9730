"""The rerun check decides the README's claims from each run's intervals, and a claim survives only when it
holds in every run. Reports are made here by the evaluation's own `pareto_report` on made-up per-prompt scores."""

import json

import numpy as np
from examples.quickstart import rerun_check

from modpo_trl.evaluation.report import pareto_report

NAMES = ["relevance", "brevity"]
WEIGHTS = {"w-0.00-1.00": [0.0, 1.0], "w-0.50-0.50": [0.5, 0.5], "w-1.00-0.00": [1.0, 0.0]}


def write_run(folder, means: dict, seed: int = 0) -> None:
    """results.json of a run whose candidates score `means[(method, label)]` plus a shared prompt difficulty
    and a little noise, on 40 prompts."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0, 0.2, size=(40, 2))
    rows = []
    for (method, label), mean in means.items():
        values = np.asarray(mean) + difficulty + rng.normal(0, 0.005, size=(40, 2))
        rows.append(
            {
                "method": method,
                "label": label,
                "weights": WEIGHTS.get(label),
                "extreme": {"w-0.00-1.00": "brevity", "w-1.00-0.00": "relevance"}.get(label)
                if method == "modpo"
                else None,
                "status": "ok",
                "run": folder.name,
                "scores": {
                    n: {
                        "mean": float(values[:, k].mean()),
                        "ci": 0.05,
                        "n": 40,
                        "values": values[:, k].tolist(),
                    }
                    for k, n in enumerate(NAMES)
                },
            }
        )
    pareto = pareto_report(rows, NAMES, None, resamples=300)
    report = {"run_name": folder.name, "objectives": NAMES, "num_prompts": 40, "generation": {}}
    (folder / "eval").mkdir(parents=True)
    (folder / "eval" / "results.json").write_text(
        json.dumps({**report, "candidates": rows, "pareto": pareto})
    )


GOOD = {
    ("reference", "base"): [0.75, 0.50],
    ("modpo", "w-0.00-1.00"): [0.60, 0.70],
    ("modpo", "w-0.50-0.50"): [0.65, 0.65],
    ("modpo", "w-1.00-0.00"): [0.70, 0.60],
    ("rewarded_soups", "w-0.50-0.50"): [0.65, 0.65],
    ("mod", "w-0.50-0.50"): [0.65, 0.65],
}


def test_claims_that_hold_in_every_run_survive(tmp_path, capsys):
    write_run(tmp_path / "seed0", GOOD, seed=0)
    write_run(tmp_path / "seed1", GOOD, seed=1)
    out = tmp_path / "claims.json"
    assert rerun_check.main([str(tmp_path / "seed0"), str(tmp_path / "seed1"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert all(c["survives"] and c["holds"] == [True, True] for c in result["claims"])
    # the README's old claims are decided too: the soup equals MODPO's middle adapter, so MODPO's front is not
    # larger than the soups'
    before = {c["claim"]: c for c in result["readme_claims_before"]}
    assert before["... and 1.06x Rewarded Soups'"]["holds"] == [False, False]
    table = capsys.readouterr().out
    assert (
        "| claim | seed0 | seed1 | survives |" in table and "| ... and 1.06x Rewarded Soups' | no:" in table
    )
    hv = result["runs"][0]["hypervolume"]["modpo"]
    assert hv["ci"][0] <= hv["estimate"] <= hv["ci"][1]


def test_a_claim_that_fails_in_one_run_does_not_survive(tmp_path):
    # seed 1: the two relevance-heavy adapters swap places in relevance (a resolved inversion); one adapter is
    # no briefer than the untrained model
    swapped = {
        **GOOD,
        ("modpo", "w-0.50-0.50"): [0.72, 0.50],
        ("modpo", "w-1.00-0.00"): [0.70, 0.60],
    }
    write_run(tmp_path / "seed0", GOOD)
    write_run(tmp_path / "seed1", swapped)
    assert rerun_check.main([str(tmp_path / "seed0"), str(tmp_path / "seed1")]) == 1
    runs = [rerun_check.Run(tmp_path / s) for s in ("seed0", "seed1")]
    verdicts = {c["claim"]: c for c in rerun_check.check(runs)}
    assert verdicts["every MODPO adapter is briefer than the untrained model"]["holds"] == [True, False]
    inversion = verdicts["no neighbouring weightings are in the wrong order beyond noise"]
    assert inversion["holds"] == [True, False] and not inversion["survives"]
    assert verdicts["MODPO's front has a larger hypervolume than the untrained model"]["survives"]
    assert verdicts["no candidate dominates the untrained model beyond noise"]["survives"]
