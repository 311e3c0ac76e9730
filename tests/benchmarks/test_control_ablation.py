"""benchmarks/control_ablation.py: a variant's hypervolume in the report its own evaluation would make."""

import numpy as np
import pytest

import control_ablation
from modpo_trl.evaluation.pareto import default_reference_point, hypervolume
from modpo_trl.evaluation.report import pareto_report

NAMES = ["relevance", "brevity"]


def row(method: str, label: str, weights, values: np.ndarray) -> dict:
    return {
        "method": method,
        "label": label,
        "weights": weights,
        "status": "ok",
        "scores": {n: {"values": values[:, k].tolist()} for k, n in enumerate(NAMES)},
    }


def test_own_report_keeps_the_variant_the_sweep_and_the_reference_only():
    rng = np.random.default_rng(0)

    def scores(mean):  # 16 prompts around a mean point
        return np.asarray(mean) + rng.normal(0, 0.02, (16, 2))

    rows = [row("reference", "base", None, scores([0.5, 0.5]))]
    rows += [row("modpo", f"w{w}", [w, 1 - w], scores([0.5 + 0.2 * w, 0.7 - 0.2 * w])) for w in (0.0, 1.0)]
    rows += [row("moc", f"w{w}", [w, 1 - w], scores([0.5 + 0.3 * w, 0.8 - 0.3 * w])) for w in (0.0, 1.0)]
    # a variant that collapses far along brevity: it stretches the joint report's reference point for all
    rows += [row("v2/moc", f"w{w}", [w, 1 - w], scores([0.1 + 0.6 * w, 0.95 - 0.4 * w])) for w in (0.0, 1.0)]
    results = {
        "objectives": NAMES,
        "candidates": rows,
        "pareto": pareto_report([dict(r) for r in rows], NAMES, None, resamples=200),
    }

    alone = control_ablation.own_report(results, "v2/moc", "moc")
    means = {
        r["label"] + r["method"]: np.array([np.mean(r["scores"][n]["values"]) for n in NAMES]) for r in rows
    }
    kept = [means[k] for k in ("basereference", "w0.0modpo", "w1.0modpo", "w0.0v2/moc", "w1.0v2/moc")]
    ref = default_reference_point(np.array(kept))
    assert alone["reference_point"] == pytest.approx(ref.tolist())  # the main variant's moc rows left out
    assert alone["hypervolume"] == pytest.approx(hypervolume(np.array(kept[3:]), ref))
    assert alone["modpo_hypervolume"] == pytest.approx(hypervolume(np.array(kept[1:3]), ref))
    assert alone["hypervolume_ratio_to_modpo"] == pytest.approx(
        alone["hypervolume"] / alone["modpo_hypervolume"]
    )
    assert alone["difference_from_modpo"]["estimate"] == pytest.approx(
        alone["hypervolume"] - alone["modpo_hypervolume"]
    )
    # the joint report's reference point differs: the main variant's rows widen the ranges it is taken from
    assert results["pareto"]["reference_point"] != pytest.approx(alone["reference_point"])
    assert results["candidates"][3]["method"] == "moc"  # the results are not changed
