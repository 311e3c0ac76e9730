"""DPA directions: unit vectors, the released DPA model's system-prompt convention, angle grids and sampling."""

import math

import pytest

from modpo_trl.conditioning.directions import (
    DEFAULT_SYSTEM_PROMPT,
    angle_grid,
    angle_of,
    condition_prompt,
    direction,
    direction_weights,
    parse_direction,
    render_direction,
    sample_directions,
    unit_vector,
)

NAMES = ["helpfulness", "verbosity"]


def test_direction_is_cos_sin_of_degrees():
    assert direction(0) == (1.0, 0.0)
    x, y = direction(-30)
    assert x == pytest.approx(math.sqrt(3) / 2) and y == pytest.approx(-0.5)
    assert angle_of(direction(37.5)) == pytest.approx(37.5)
    assert angle_of([3, 4]) == pytest.approx(math.degrees(math.atan2(4, 3)))


def test_render_matches_the_released_dpa_model_card():
    # The model card's example: degree = -15 -> helpfulness*97 + verbosity*-26 (round(100 cos t), round(100 sin t)).
    assert direction_weights(direction(-15)) == [97, -26]
    assert render_direction(direction(-15), NAMES) == (
        "You are a helpful, respectful, and honest assistant who always responds to the user in a harmless way. "
        "Your response should maximize weighted rating = helpfulness*97 + verbosity*-26"
    )
    # Not-unit vectors are normalised first: (1, 1) is 45 degrees.
    assert render_direction([1, 1], ["a", "b"], system_prompt="") == (
        "Your response should maximize weighted rating = a*71 + b*71"
    )


@pytest.mark.parametrize("t", [-45, -32.5, -15, 0, 7, 20, 45])
def test_render_parse_round_trip(t):
    names, v = parse_direction(render_direction(direction(t), NAMES))
    assert names == NAMES
    assert v == pytest.approx(
        direction(t), abs=0.006
    )  # integer weights: within half a hundredth, renormalised
    assert angle_of(v) == pytest.approx(t, abs=0.5)


def test_parse_three_attributes_inside_a_longer_prompt():
    v = unit_vector([2, -1, 2])
    text = "Intro.\n" + render_direction(v, ["help", "short", "safe"]) + "\n\nWrite a poem."
    names, parsed = parse_direction(text)
    assert names == ["help", "short", "safe"]
    assert parsed == pytest.approx((2 / 3, -1 / 3, 2 / 3), abs=0.006)
    with pytest.raises(ValueError, match="no 'Your response should maximize weighted rating = '"):
        parse_direction("Write a poem.")


def test_condition_prompt_standard_and_conversational():
    rendered = render_direction(direction(10), NAMES)
    assert condition_prompt("Tell me a story.", direction(10), NAMES) == f"{rendered}\n\nTell me a story."
    user = [{"role": "user", "content": "hi"}]
    assert condition_prompt(user, direction(10), NAMES) == [{"role": "system", "content": rendered}, *user]
    assert user == [{"role": "user", "content": "hi"}]  # not modified in place
    with_system = [{"role": "system", "content": "Be brief."}, *user]
    got = condition_prompt(with_system, direction(10), NAMES)
    assert got[0] == {"role": "system", "content": f"{rendered}\n\nBe brief."} and got[1:] == user
    assert with_system[0]["content"] == "Be brief."
    assert DEFAULT_SYSTEM_PROMPT in rendered


@pytest.mark.parametrize(
    ("v", "k", "match"),
    [
        ([0.0, 0.0], 2, r"direction=\[0.0, 0.0\] is the zero vector"),
        ([1.0, 0.0, 0.0], 2, r"direction=\[1.0, 0.0, 0.0\] has 3 entries; it needs 2"),
        ([1.0, float("nan")], 2, "contains a non-finite value"),
        ([1.0, float("inf")], None, "contains a non-finite value"),
        (["a", 1], 2, "must contain only numbers"),
        ("1,0", 2, "must be a list of numbers"),
        ([], None, "is empty"),
    ],
)
def test_unit_vector_errors_name_the_field(v, k, match):
    with pytest.raises(ValueError, match=match):
        unit_vector(v, k)


def test_render_errors():
    with pytest.raises(ValueError, match=r"direction=\[0.0, 0.0\] is the zero vector"):
        render_direction([0, 0], NAMES)
    with pytest.raises(ValueError, match="has 3 entries; it needs 2"):
        render_direction([1, 0, 0], NAMES)
    with pytest.raises(ValueError, match="attribute_names=.*without spaces"):
        render_direction([1, 0], ["help fulness", "verbosity"])
    with pytest.raises(ValueError, match="has duplicates"):
        render_direction([1, 0], ["a", "a"])
    with pytest.raises(ValueError, match="t_degrees=nan must be finite"):
        direction(float("nan"))


def test_angle_grid_range_step_and_heldout():
    assert angle_grid([-45, 45], 15) == [-45, -30, -15, 0, 15, 30, 45]
    assert angle_grid([-45, 45], 15, heldout_angles=[-30, 10, 45]) == [-45, -15, 0, 15, 30]
    assert angle_grid([0, 10], 4) == [0, 4, 8]  # the end is included only when the step reaches it
    assert angle_grid([5, 5], 1) == [5]
    with pytest.raises(ValueError, match=r"angle_range_degrees=\[10.0, -10.0\] must have lo <= hi"):
        angle_grid([10, -10], 5)
    with pytest.raises(ValueError, match=r"angle_range_degrees=\[0\] must be \[lo, hi\]"):
        angle_grid([0], 5)
    with pytest.raises(ValueError, match="angle_step_degrees=0 must be > 0"):
        angle_grid([-45, 45], 0)
    with pytest.raises(ValueError, match=r"heldout_angles\[1\]=inf must be finite"):
        angle_grid([-45, 45], 5, [0, float("inf")])
    with pytest.raises(ValueError, match="leaves no training angle"):
        angle_grid([0, 10], 10, heldout_angles=[0, 10])


def test_sampled_angles_stay_in_range_and_avoid_heldout():
    pool = [direction(t) for t in angle_grid([-45, 45], 5, heldout_angles=[-20, 10])]
    picks = sample_directions(2000, pool, seed=[0, 1])
    assert all(len(p) == 1 for p in picks)
    angles = {round(angle_of(pool[p[0]]), 6) for p in picks}
    assert angles == {float(t) for t in range(-45, 50, 5)} - {
        -20.0,
        10.0,
    }  # every grid angle, no held-out one
    assert sample_directions(50, pool, seed=[0, 1]) == picks[:50]  # seeded
    assert sample_directions(50, pool, seed=[0, 2]) != picks[:50]  # another iteration, other draws


def test_several_directions_per_item_come_one_from_each_stratum():
    pool = [direction(t) for t in (0, 15, 45, 75, 90)]  # strata of 3 + 2 directions: {0, 15, 45}, {75, 90}
    picks = sample_directions(600, pool, seed=0, per_item=2)
    assert {p[0] for p in picks} == {0, 1, 2} and {p[1] for p in picks} == {3, 4}
    assert all(len(set(p)) == 2 for p in picks)
    assert sorted(sample_directions(3, pool, seed=0, per_item=5)[0]) == [0, 1, 2, 3, 4]  # all of them
    for bad in (0, 6, 1.5, True):
        with pytest.raises(
            ValueError, match=rf"directions_per_prompt={bad!r} must be an integer from 1 to .* \(5\)"
        ):
            sample_directions(3, pool, seed=0, per_item=bad)
