"""The rendered preference: template, exact round trip at 2 decimals, prompt conditioning, validation, sampling."""

import numpy as np
import pytest

from modpo_trl.conditioning.preference import (
    check_preference,
    condition_prompt,
    parse_preference,
    render_preference,
    round_preference,
    sample_preferences,
)

NAMES = ["relevance", "brevity"]


def test_render_uses_the_documented_template():
    assert render_preference([0.7, 0.3], NAMES) == "Preference weights: relevance=0.70, brevity=0.30."
    assert render_preference([1, 0, 0], ["a", "b", "c"]) == "Preference weights: a=1.00, b=0.00, c=0.00."


@pytest.mark.parametrize("n", [2, 3, 5])
def test_parse_inverts_render_exactly_at_two_decimals(n):
    rng = np.random.default_rng(n)
    names = [f"objective_{i}" for i in range(n)]
    for raw in [*np.eye(n), *rng.dirichlet([0.3] * n, size=50), *rng.dirichlet([3.0] * n, size=50)]:
        w = round_preference(raw)
        assert all(abs(a - b) <= 0.01 for a, b in zip(w, raw, strict=True))
        assert all(x == round(x * 100) / 100 for x in w) and sum(round(x * 100) for x in w) == 100
        text = f"some system text\n{render_preference(w, names)}\nthe user asks"
        assert parse_preference(text, names) == w


def test_round_preference_keeps_the_sum_at_one_by_largest_remainder():
    assert round_preference([1 / 3, 1 / 3, 1 / 3]) == [0.34, 0.33, 0.33]
    assert round_preference([0.004, 0.996]) == [0.0, 1.0]
    assert round_preference([0.125, 0.875]) == [0.13, 0.87]  # ties go to the first


def test_condition_prompt_string_and_conversational():
    w = [0.25, 0.75]
    line = "Preference weights: relevance=0.25, brevity=0.75."
    assert condition_prompt("Tell me a story.", w, NAMES) == f"{line}\nTell me a story."
    user = [{"role": "user", "content": "hi"}]
    assert condition_prompt(user, w, NAMES) == [{"role": "system", "content": line}, *user]
    with_system = [{"role": "system", "content": "Be kind."}, *user]
    conditioned = condition_prompt(with_system, w, NAMES)
    assert conditioned[0] == {"role": "system", "content": f"{line}\nBe kind."}
    assert with_system[0]["content"] == "Be kind."  # the input is not modified
    assert parse_preference(conditioned[0]["content"], NAMES) == w
    with pytest.raises(TypeError, match="prompt must be a string or a list of chat messages"):
        condition_prompt(42, w, NAMES)


@pytest.mark.parametrize(
    "w,message",
    [
        ([0.5, 0.3, 0.2], r"heldout\[0\]=\[0.5, 0.3, 0.2\] must be a list of 2 numbers"),
        ([0.5, 0.6], r"heldout\[0\]=\[0.5, 0.6\] sums to 1.1, not 1"),
        ([1.5, -0.5], r"heldout\[0\]=\[1.5, -0.5\] contains a negative value"),
        ([float("nan"), 1.0], r"heldout\[0\]=.*non-finite"),
        (["x", 1.0], r"heldout\[0\]=\['x', 1.0\] must contain only numbers"),
        ("0.5,0.5", r"heldout\[0\]='0.5,0.5' must be a list of 2 numbers"),
    ],
)
def test_check_preference_names_the_field(w, message):
    with pytest.raises(ValueError, match=message):
        check_preference(w, 2, "heldout[0]")
    assert check_preference([0, 1], 2) == [0.0, 1.0]  # vertices are valid preferences


def test_parse_and_render_errors():
    with pytest.raises(ValueError, match="no preference for objectives"):
        parse_preference("Preference weights: relevance=0.70.", NAMES)
    with pytest.raises(ValueError, match="must be a list of 2 numbers"):
        render_preference([1.0], NAMES)
    with pytest.raises(ValueError, match="objective_names=.*non-empty strings"):
        render_preference([0.5, 0.5], ["a", ""])


def test_dirichlet_sampling_never_comes_near_heldout_preferences():
    heldout = [[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]
    w = sample_preferences(3000, 3, method="dirichlet", heldout=heldout, heldout_radius=0.1, seed=0)
    distances = np.abs(w[:, None, :] - np.asarray(heldout)[None]).sum(-1)
    assert distances.min() > 0.1
    assert np.allclose(w.sum(1), 1.0) and np.allclose(w * 100, np.round(w * 100))
    unconstrained = sample_preferences(3000, 3, method="dirichlet", seed=0)
    assert (
        np.abs(unconstrained[:, None] - np.asarray(heldout)[None]).sum(-1) <= 0.1
    ).any()  # the test can fail
    assert np.array_equal(
        w, sample_preferences(3000, 3, method="dirichlet", heldout=heldout, heldout_radius=0.1)
    )


def test_grid_sampling_excludes_heldout_points_exactly():
    heldout = [[0.5, 0.5], [0.0, 1.0]]
    w = sample_preferences(500, 2, method="grid", grid_steps=4, heldout=heldout, seed=1)
    assert sorted({tuple(x) for x in w.tolist()}) == [(0.25, 0.75), (0.75, 0.25), (1.0, 0.0)]
    thirds = sample_preferences(200, 3, method="grid", grid_steps=3, seed=0)
    assert {tuple(x) for x in thirds.tolist()} >= {(0.34, 0.33, 0.33), (1.0, 0.0, 0.0)}  # rounded grid points
    with pytest.raises(ValueError, match="exclude every point of the grid with grid_steps=1"):
        sample_preferences(5, 2, method="grid", grid_steps=1, heldout=[[1, 0], [0, 1]])


def test_sampling_errors():
    with pytest.raises(
        ValueError, match=r"preference_sampling='uniform' is not valid; valid: \['dirichlet', 'grid'\]"
    ):
        sample_preferences(5, 2, method="uniform")
    with pytest.raises(ValueError, match="fell within heldout_radius=2.0 of heldout_preferences"):
        sample_preferences(5, 2, heldout=[[0.5, 0.5]], heldout_radius=2.0, max_tries=20)
