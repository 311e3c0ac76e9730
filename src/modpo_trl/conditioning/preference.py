"""The preference `w` as text: how preference-conditioned models (MOC, DPA) are told what to trade off.

One fixed template, identical in training, evaluation and inference:

    Preference weights: relevance=0.70, brevity=0.30.

`w` is on the simplex (one weight per objective, `>= 0`, sum 1) and is written with `PREFERENCE_DECIMALS` (2)
decimals. Training preferences are rounded to that precision first (`round_preference`: whole hundredths that
add up to 100), so `parse_preference(render_preference(w))` gives back the `w` that was trained. Conversational prompts
(message lists) carry the line in their system message; string prompts start with it, on a line of its own.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np

PREFERENCE_DECIMALS = 2
PREFERENCE_PREFIX = "Preference weights: "
_UNITS = 10**PREFERENCE_DECIMALS  # a rounded preference is a vector of integer hundredths summing to 100

Prompt = str | list[dict[str, Any]]


def check_preference(w: Any, n: int, field_name: str = "preference") -> list[float]:
    """Validates a preference of `n` objectives (finite, `>= 0`, sums to 1 within 1e-6) and returns it as floats.

    Unlike `modpo_config.check_weights`, no entry has to be positive: a conditioned model is also asked for the
    vertices of the simplex.
    """
    if isinstance(w, str | bytes) or not hasattr(w, "__len__") or len(w) != n:
        raise ValueError(f"{field_name}={w!r} must be a list of {n} numbers, one per objective")
    try:
        values = [float(x) for x in w]
    except (TypeError, ValueError):
        raise ValueError(f"{field_name}={list(w)!r} must contain only numbers") from None
    if not all(math.isfinite(x) for x in values):
        raise ValueError(f"{field_name}={values} contains a non-finite value; every weight must be finite")
    if any(x < 0 for x in values):
        raise ValueError(f"{field_name}={values} contains a negative value; weights must be >= 0")
    total = sum(values)
    if abs(total - 1.0) > 1e-6:
        hint = (
            f"; did you mean {[round(x / total, 6) for x in values]}?"
            if total > 0
            else " (weights are on the simplex)"
        )
        raise ValueError(f"{field_name}={values} sums to {total:g}, not 1{hint}")
    return values


def round_preference(w: Sequence[float]) -> list[float]:
    """`w` rounded to `PREFERENCE_DECIMALS` decimals: whole hundredths adding up to 100 (largest remainder first)."""
    scaled = np.asarray(w, dtype=np.float64) * _UNITS
    units = np.floor(scaled).astype(int)
    short = _UNITS - int(units.sum())
    units[np.argsort(-(scaled - units), kind="stable")[:short]] += 1  # the largest remainders get the rest
    return [int(u) / _UNITS for u in units]


def _check_names(objective_names: Sequence[str]) -> None:
    if not objective_names or any(not isinstance(n, str) or not n.strip() for n in objective_names):
        raise ValueError(f"objective_names={list(objective_names)!r} must be non-empty strings")


def render_preference(w: Sequence[float], objective_names: Sequence[str]) -> str:
    """`[0.7, 0.3], ["relevance", "brevity"]` -> `"Preference weights: relevance=0.70, brevity=0.30."`.

    `w` is rounded first (`round_preference`), as training preferences are: `[1/3, 1/3, 1/3]` is rendered
    `0.34, 0.33, 0.33`, the text a model trained on it saw, never `0.33, 0.33, 0.33` (which sums to 0.99)."""
    _check_names(objective_names)
    values = round_preference(check_preference(w, len(objective_names)))
    parts = ", ".join(
        f"{name}={x:.{PREFERENCE_DECIMALS}f}" for name, x in zip(objective_names, values, strict=True)
    )
    return f"{PREFERENCE_PREFIX}{parts}."


def parse_preference(text: str, objective_names: Sequence[str]) -> list[float]:
    """The preference rendered somewhere in `text` (a prompt, a system message), in `objective_names` order."""
    _check_names(objective_names)
    number = r"(\d+(?:\.\d+)?)"
    pattern = (
        re.escape(PREFERENCE_PREFIX) + ", ".join(f"{re.escape(n)}={number}" for n in objective_names) + r"\."
    )
    match = re.search(pattern, text)
    if match is None:
        example = render_preference([1.0] + [0.0] * (len(objective_names) - 1), objective_names)
        raise ValueError(
            f"no preference for objectives {list(objective_names)} in {text!r}; expected e.g. {example!r}"
        )
    return check_preference([float(g) for g in match.groups()], len(objective_names), "parsed preference")


def condition_prompt(prompt: Prompt, w: Sequence[float], objective_names: Sequence[str]) -> Prompt:
    """`prompt` with the rendered preference: in the system message of a conversational prompt (a new one first
    when there is none; an existing one keeps its text after the preference line), or as the first line of a
    string prompt. The input is not modified."""
    line = render_preference(w, objective_names)
    if isinstance(prompt, str):
        return f"{line}\n{prompt}"
    if not isinstance(prompt, list) or not all(isinstance(m, dict) and "role" in m for m in prompt):
        raise TypeError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    messages = [dict(m) for m in prompt]
    if messages and messages[0]["role"] == "system":
        content = messages[0].get("content")
        if not isinstance(content, str):
            raise ValueError(
                f"the system message's content must be a string to add the preference to, got {content!r}"
            )
        messages[0]["content"] = f"{line}\n{content}" if content else line
        return messages
    return [{"role": "system", "content": line}, *messages]


def simplex_grid(n: int, steps: int) -> list[list[float]]:
    """Every vector of `n` entries in {0, 1/steps, ..., 1} that sums to 1 (exact fractions, then floats)."""
    points = [c for c in itertools.product(range(steps + 1), repeat=n) if sum(c) == steps]
    return [[float(Fraction(k, steps)) for k in c] for c in sorted(points, reverse=True)]


def sample_preferences(
    num: int,
    n: int,
    *,
    method: str = "dirichlet",
    dirichlet_alpha: float = 1.0,
    grid_steps: int = 10,
    heldout: Sequence[Sequence[float]] = (),
    heldout_radius: float = 0.05,
    seed: int = 0,
    max_tries: int = 1000,
    group_size: int = 1,
) -> np.ndarray:
    """`num` rounded preferences over `n` objectives, shape `(num, n)`, reproducible from `seed`.

    - `"dirichlet"`: `Dirichlet(dirichlet_alpha)` draws (1: uniform on the simplex; < 1: towards the vertices),
      rounded; a draw within L1 distance `heldout_radius` of a held-out preference is drawn again.
    - `"grid"`: uniform over the rounded points of `simplex_grid(n, grid_steps)`, held-out points excluded (exactly,
      after rounding both). Each run of `group_size` consecutive rows (the copies of one example) gets distinct
      points, drawn without replacement.
    """
    rng = np.random.default_rng(seed)
    heldout = np.asarray([round_preference(h) for h in heldout], dtype=np.float64).reshape(-1, n)
    if method == "grid":
        points = np.asarray([round_preference(p) for p in simplex_grid(n, grid_steps)])
        keep = ~np.any(np.all(np.isclose(points[:, None], heldout[None]), axis=-1), axis=1)
        if not keep.any():
            raise ValueError(
                f"heldout_preferences exclude every point of the grid with grid_steps={grid_steps}"
            )
        points = points[keep]
        if group_size > len(points):
            raise ValueError(
                f"preference_augmentation={group_size} copies need as many distinct grid points, but the grid with "
                f"grid_steps={grid_steps} has {len(points)} (held-out points excluded)"
            )
        if group_size == 1:
            return points[rng.integers(len(points), size=num)]
        groups = -(-num // group_size)
        picks = [rng.permutation(len(points))[:group_size] for _ in range(groups)]
        return points[np.concatenate(picks)[:num]]
    if method != "dirichlet":
        raise ValueError(f"preference_sampling={method!r} is not valid; valid: ['dirichlet', 'grid']")
    out = np.empty((num, n))
    for i in range(num):
        for _ in range(max_tries):
            w = np.asarray(round_preference(rng.dirichlet([dirichlet_alpha] * n)))
            if not len(heldout) or np.abs(heldout - w).sum(axis=1).min() > heldout_radius:
                break
        else:
            raise ValueError(
                f"{max_tries} Dirichlet draws in a row fell within heldout_radius={heldout_radius} of "
                "heldout_preferences; lower heldout_radius or hold out fewer preferences"
            )
        out[i] = w
    return out
