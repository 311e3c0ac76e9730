"""benchmarks/sweep_cost.py: the smoke sweep's runs, totals and cache, and its weightings."""

import math

import pytest

import sweep_cost
from modpo_trl.trainers.modpo_config import check_weights


def test_smoke_sweep_runs_and_totals(smoke):
    sweep = smoke[1]["results"]["sweep"]
    assert sweep["k"] == 2 and len(sweep["runs"]) == 4
    assert [r["cached"] for r in sweep["runs"]] == [True, False, False, True]  # alternating order
    assert all(r["steps"] == 2 for r in sweep["runs"])  # one epoch of 4 pairs at batch 2
    assert math.isfinite(sweep["ratio_cached_uncached"]) and 0 < sweep["scoring_share_of_uncached_run"] < 1
    for mode in ("cached", "uncached"):
        totals = sweep["totals"][mode]
        assert totals["total_s"] == pytest.approx(
            totals["model_s"] + totals["construction_s"] + totals["training_s"]
        )


def test_smoke_sweep_scores_the_data_once(smoke):
    """One cache entry per margin source and one for the reference log-probs, although the reward model's
    tokenizer is also used by the policy's trainers in between (its truncation state must not be in the key)."""
    sweep = smoke[1]["results"]["sweep"]
    assert sweep["expected_cache_entries"] == {"margins": 2, "ref_logps": 1}
    assert sweep["cache_entries"] == sweep["expected_cache_entries"]
    assert sweep["scored_once"] is True


def test_sweep_weightings_are_valid_and_end_at_pure_target():
    weightings = sweep_cost.sweep_weightings(5)
    assert [w[0] for w in weightings] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert weightings[0][1:] == pytest.approx([0.4, 0.4])
    for w in weightings:
        check_weights(w)


def test_the_sweep_target_counts_only_at_k_5():
    assert sweep_cost.target_values({"k": 5, "ratio_cached_uncached": 0.7}) == {
        "sweep_cached_vs_uncached": 0.7
    }
    assert sweep_cost.target_values({"k": 2, "ratio_cached_uncached": 0.7}) == {
        "sweep_cached_vs_uncached": None
    }
