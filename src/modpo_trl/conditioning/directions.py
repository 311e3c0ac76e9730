"""DPA's user preferences: unit vectors in reward space, and how a prompt states them.

Directional Preference Alignment (Wang et al., 2024, arXiv:2402.18571) describes a preference over `k` reward
attributes as a unit vector `v`; the policy should maximise `v . r(x, y)`. With two attributes `v` is an angle:
`v = (cos t, sin t)`, so `t = 0` is "helpfulness only" and `t < 0` asks for less of the second attribute.

The prompt states `v` the way the released DPA model (Haoxiang-Wang/DPA-v1-Mistral-7B) was trained to read it,
in its system prompt:

    You are a helpful, respectful, and honest assistant who always responds to the user in a harmless way.
    Your response should maximize weighted rating = helpfulness*97 + verbosity*-26

with integer weights `round(100 * v_i)` (t = -15 degrees here), one `name*weight` term per attribute in the
order of the attribute names, joined by `" + "` (a negative weight keeps its sign: `verbosity*-26`). The same
text is used in training, evaluation and inference (`condition_prompt`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, respectful, and honest assistant who always responds to the user in a harmless way."
)
RATING_PREFIX = "Your response should maximize weighted rating = "
_TERM = re.compile(r"([^\s*+=]+)\*(-?\d+)")
_RATING = re.compile(re.escape(RATING_PREFIX) + r"(\S+\*-?\d+(?: \+ \S+\*-?\d+)*)")


def direction(t_degrees: float) -> tuple[float, float]:
    """The 2-attribute preference at angle `t` (degrees): `(cos t, sin t)`."""
    t = _finite(t_degrees, "t_degrees")
    return (math.cos(math.radians(t)), math.sin(math.radians(t)))


def angle_of(v: Sequence[float]) -> float:
    """The angle in degrees of a 2-attribute direction (inverse of `direction`)."""
    x, y = unit_vector(v, 2)
    return math.degrees(math.atan2(y, x))


def unit_vector(v: Sequence[float], k: int | None = None, field: str = "direction") -> tuple[float, ...]:
    """`v / |v|`, after checking that `v` has `k` finite entries and is not zero (errors name `field`)."""
    if isinstance(v, str | bytes) or not hasattr(v, "__len__"):
        raise ValueError(f"{field}={v!r} must be a list of numbers, one per attribute")
    if k is not None and len(v) != k:
        raise ValueError(f"{field}={list(v)!r} has {len(v)} entries; it needs {k}, one per attribute")
    if len(v) == 0:
        raise ValueError(f"{field}=[] is empty; it needs one number per attribute")
    try:
        values = np.asarray([float(x) for x in v], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{field}={list(v)!r} must contain only numbers") from None
    if not np.isfinite(values).all():
        raise ValueError(f"{field}={values.tolist()} contains a non-finite value; every entry must be finite")
    norm = float(np.linalg.norm(values))
    if norm == 0:
        raise ValueError(f"{field}={values.tolist()} is the zero vector, which gives no direction")
    return tuple(float(x) for x in values / norm)


def direction_weights(v: Sequence[float]) -> list[int]:
    """The integer weights a prompt states for the unit vector `v`: `round(100 * v_i)` (DPA's convention)."""
    return [int(round(100 * x)) for x in unit_vector(v)]


def direction_gates(v: Sequence[float]) -> list[float]:
    """The preference on the simplex that gates a preference-conditioned LoRA adapter for the direction `v` (DPA's
    `conditioning="adapter"`): the stated weights `direction_weights(v)` divided by their sum, so the gates say
    what the prompt would. `v` must have no negative component."""
    stated = direction_weights(v)
    if any(w < 0 for w in stated) or sum(stated) == 0:
        raise ValueError(
            f"direction {list(v)} has a negative component: an adapter gated by the preference needs directions "
            "with components >= 0 (angles in [0, 90] for 2 attributes)"
        )
    return [w / sum(stated) for w in stated]


def render_direction(
    v: Sequence[float], attribute_names: Sequence[str], system_prompt: str = DEFAULT_SYSTEM_PROMPT
) -> str:
    """The system prompt stating `v` (see the module docstring); `v` is normalised first."""
    names = _check_names(attribute_names)
    weights = direction_weights(unit_vector(v, len(names)))
    terms = " + ".join(f"{name}*{w}" for name, w in zip(names, weights, strict=True))
    return f"{system_prompt} {RATING_PREFIX}{terms}".lstrip()


def parse_direction(text: str) -> tuple[list[str], tuple[float, ...]]:
    """The attribute names and unit direction stated in `text` by `render_direction` (or the released model's
    system prompt). The vector is the normalised integer weights, within about 0.005 of the rendered one."""
    match = _RATING.search(text)
    if match is None:
        raise ValueError(f"no {RATING_PREFIX!r}name*weight + ... in {text[:200]!r}")
    terms = _TERM.findall(match.group(1))
    names = [name for name, _ in terms]
    return names, unit_vector([int(w) for _, w in terms], field="weights in the text")


def condition_prompt(
    prompt: str | list[dict[str, Any]],
    v: Sequence[float],
    attribute_names: Sequence[str],
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> str | list[dict[str, Any]]:
    """`prompt` with `v` stated: as the system message of a conversation (before any system text it already
    has), or as a first paragraph of a plain-text prompt."""
    rendered = render_direction(v, attribute_names, system_prompt)
    if isinstance(prompt, str):
        return f"{rendered}\n\n{prompt}"
    messages = [dict(m) for m in prompt]
    if messages and messages[0].get("role") == "system":
        messages[0]["content"] = f"{rendered}\n\n{messages[0]['content']}"
        return messages
    return [{"role": "system", "content": rendered}, *messages]


def angle_grid(
    angle_range_degrees: Sequence[float], step_degrees: float, heldout_angles: Sequence[float] = ()
) -> list[float]:
    """Training angles: `lo, lo + step, ..., hi` (both ends included when `step` divides the range) without the
    held-out angles (compared within 1e-6 degrees), which are kept for evaluating unseen preferences."""
    lo, hi = _check_range(angle_range_degrees)
    step = _finite(step_degrees, "angle_step_degrees")
    if step <= 0:
        raise ValueError(f"angle_step_degrees={step_degrees!r} must be > 0")
    count = int(math.floor((hi - lo) / step + 1e-9)) + 1
    grid = [round(lo + i * step, 9) for i in range(count)]
    heldout = [_finite(a, f"heldout_angles[{i}]") for i, a in enumerate(heldout_angles)]
    kept = [a for a in grid if all(abs(a - h) > 1e-6 for h in heldout)]
    if not kept:
        raise ValueError(
            f"angle_range_degrees={list(angle_range_degrees)} with angle_step_degrees={step_degrees} leaves no "
            f"training angle once heldout_angles={list(heldout_angles)} are removed"
        )
    return kept


def sample_directions(
    n: int, pool: Sequence[Sequence[float]], seed: int | Sequence[int], per_item: int = 1
) -> list[list[int]]:
    """For each of `n` items, `per_item` indices into `pool`: the pool (in its order, e.g. by angle) is cut into
    `per_item` contiguous strata of near-equal size and one direction is drawn uniformly from each, so an item's
    directions are distinct and spread over the pool (`per_item = 1`: one uniform draw from the whole pool)."""
    if isinstance(per_item, bool) or not isinstance(per_item, int) or not 1 <= per_item <= len(pool):
        raise ValueError(
            f"directions_per_prompt={per_item!r} must be an integer from 1 to the number of training "
            f"directions ({len(pool)})"
        )
    rng = np.random.default_rng(seed)
    strata = np.array_split(np.arange(len(pool)), per_item)
    picks = np.stack([stratum[rng.integers(len(stratum), size=n)] for stratum in strata], axis=1)
    return picks.tolist()


def _check_range(angle_range_degrees: Sequence[float]) -> tuple[float, float]:
    if isinstance(angle_range_degrees, str) or len(angle_range_degrees) != 2:
        raise ValueError(f"angle_range_degrees={angle_range_degrees!r} must be [lo, hi], e.g. [-45, 45]")
    lo = _finite(angle_range_degrees[0], "angle_range_degrees[0]")
    hi = _finite(angle_range_degrees[1], "angle_range_degrees[1]")
    if lo > hi:
        raise ValueError(f"angle_range_degrees={[lo, hi]} must have lo <= hi")
    return lo, hi


def _check_names(attribute_names: Sequence[str]) -> list[str]:
    names = list(attribute_names)
    bad = [n for n in names if not isinstance(n, str) or not re.fullmatch(r"[^\s*+=]+", n)]
    if not names or bad:
        raise ValueError(
            f"attribute_names={names!r} must be non-empty names without spaces, '*', '+' or '=' "
            "(they are written into the prompt as name*weight)"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"attribute_names={names!r} has duplicates")
    return names


def _finite(value: Any, field: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field}={value!r} must be a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{field}={value!r} must be finite")
    return number
