"""The Pareto report of conditioned methods: generalisation over the preference's own parameter (DPA's angle),
not over a weight that folds two preferences together; controllability against each objective's requested weight,
so a model that follows its direction scores positive tau on every objective."""

import math

import pytest

from modpo_trl.evaluation.report import pareto_report

NAMES = ["helpful", "verbose"]


def dpa_row(t: float, held_out: bool) -> dict:
    """A DPA candidate at angle t (degrees) whose scores are exactly linear in t."""
    v = [math.cos(math.radians(t)), math.sin(math.radians(t))]
    scores = {"helpful": 1.0 - 0.01 * t, "verbose": 0.02 * t}
    return {
        "method": "dpa",
        "label": f"t{t:+g}",
        "status": "ok",
        "weights": v,
        "preference": v,
        "parameter": {"angle": t},
        "held_out": held_out,
        "extreme": None,
        # the same score on each of 8 prompts: the report's paired bootstrap resamples per-prompt values
        "scores": {n: {"mean": s, "ci": 0.0, "n": 8, "values": [s] * 8} for n, s in scores.items()},
    }


def test_dpa_generalisation_is_over_the_angle():
    """recipes/helpsteer/dpa.yaml holds out -20, 10 and 35 degrees: +10 and -10 share cos t, not t."""
    rows = [dpa_row(t, t in (-20, 10, 35)) for t in (-45, -30, -20, -10, 0, 10, 20, 35, 45)]
    report = pareto_report(rows, NAMES, reference_point=None)
    result = report["generalization"]["dpa"]
    assert result["mean_abs_error"] == pytest.approx({"helpful": 0.0, "verbose": 0.0}, abs=1e-12)
    assert result["interpolated_over"] == "angle"
    assert [e["label"] for e in result["per_preference"]] == ["t-20", "t+10", "t+35"]
    assert result["per_preference"][1]["parameter"] == {"angle": 10}


def dpa_following(t: float) -> dict:
    """A DPA candidate that delivers exactly the direction it is asked for: scores = v."""
    row = dpa_row(t, False)
    for name, value in zip(NAMES, row["weights"], strict=True):
        row["scores"][name] = {"mean": value, "ci": 0.0, "n": 8, "values": [value] * 8}
    return row


@pytest.mark.parametrize("angles", [(0, 15, 30, 45, 60, 75, 90), (-45, -30, -15, 0, 15, 30, 45)])
def test_a_dpa_model_that_follows_its_direction_is_controllable_on_every_objective(angles):
    """Against the angle, the first objective (weight cos t) would read -1 on [0, 90] and about 0 on [-45, 45]
    (helpsteer's range, where cos t peaks in the middle); against its requested weight it reads +1 on both."""
    report = pareto_report([dpa_following(t) for t in angles], NAMES, reference_point=None)
    control = report["controllability"]["dpa"]
    assert {n: control[n]["kendall_tau"] for n in NAMES} == pytest.approx({"helpful": 1.0, "verbose": 1.0})
    assert all(p["as_requested"] for pairs in report["neighbours"]["dpa"].values() for p in pairs)


def test_a_dpa_model_that_ignores_its_direction_is_not():
    rows = [dpa_following(t) for t in (0, 30, 60, 90)]
    for row, t in zip(rows, (90, 60, 30, 0), strict=True):  # delivers the mirror of what was asked
        row["scores"] = dpa_following(t)["scores"]
    control = pareto_report(rows, NAMES, reference_point=None)["controllability"]["dpa"]
    assert {n: control[n]["kendall_tau"] for n in NAMES} == pytest.approx({"helpful": -1.0, "verbose": -1.0})


def test_simplex_preferences_are_still_interpolated_over_their_weights():
    rows = [dpa_row(t, False) for t in (0, 45, 90)]
    for row, w in zip(rows, ([1.0, 0.0], [0.5, 0.5], [0.0, 1.0]), strict=True):
        row.update(method="moc", parameter=None, weights=w, held_out=w == [0.5, 0.5])
    report = pareto_report(rows, NAMES, reference_point=None)
    assert report["generalization"]["moc"]["interpolated_over"] == "weights"
    (entry,) = report["generalization"]["moc"]["per_preference"]
    assert entry["interpolated"] == pytest.approx([0.55, 0.9])  # halfway between t=0 and t=90's scores
