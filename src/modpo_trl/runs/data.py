"""Loading preference data (hub ids or local files) into TRL's `prompt`/`chosen`/`rejected` format."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Any

from datasets import Dataset
from trl.data_utils import extract_prompt

from ..loading import load_rows
from .recipe import DataConfig, RecipeError


def load_raw(cfg: DataConfig, split: str | None = None) -> Dataset:
    """The rows of `cfg.path` (a hub data set's split, a local json/jsonl/csv/parquet file, a `save_to_disk`
    folder); a failure is a recipe error naming the path."""
    try:
        return load_rows(cfg.path, split or cfg.split, cfg.name, cfg.data_dir)
    except (ValueError, OSError) as e:
        raise RecipeError(str(e)) from e


def to_preference_pairs(raw: Dataset, cfg: DataConfig, key: str = "data") -> Dataset:
    """Maps a raw data set to `prompt`/`chosen`/`rejected` according to `cfg.format`."""
    needed = {
        "pairs": [cfg.prompt_column, cfg.chosen_column, cfg.rejected_column],
        "labelled_pairs": [cfg.prompt_column, *cfg.response_columns, cfg.label_column],
        "ratings": [cfg.prompt_column, cfg.response_column, cfg.rating_column],
        "implicit_prompt": [cfg.chosen_column, cfg.rejected_column],
    }[cfg.format]
    missing = [c for c in needed if c not in raw.column_names]
    if missing:
        raise RecipeError(
            f"{key}: column(s) {missing} not in {cfg.path!r} (format={cfg.format}); it has {raw.column_names}. "
            f"Map them with {key}.prompt_column / chosen_column / rejected_column / response_columns / "
            "label_column / response_column / rating_column"
        )
    _check_values(
        raw, cfg, key, text_columns=[c for c in needed if c not in (cfg.label_column, cfg.rating_column)]
    )
    if cfg.format == "pairs":
        # Other columns are kept: a `columns` reward reads its precomputed scores from them.
        rows = [
            {
                **r,
                "prompt": r[cfg.prompt_column],
                "chosen": r[cfg.chosen_column],
                "rejected": r[cfg.rejected_column],
            }
            for r in raw
        ]
    elif cfg.format == "implicit_prompt":
        rows = [_split_prompt(r[cfg.chosen_column], r[cfg.rejected_column], cfg, key) for r in raw]
    elif cfg.format == "labelled_pairs":
        if len(cfg.response_columns) != 2:
            raise RecipeError(f"{key}.response_columns={cfg.response_columns} must name exactly 2 columns")
        rows = []
        for r in raw:
            label = int(r[cfg.label_column])
            responses = [r[c] for c in cfg.response_columns]
            rows.append(
                {"prompt": r[cfg.prompt_column], "chosen": responses[label], "rejected": responses[1 - label]}
            )
    else:
        rows = _pairs_from_ratings(raw, cfg)
    if not rows:
        raise RecipeError(f"{key}: {cfg.path!r} yields no preference pairs (format={cfg.format})")
    rows = [_format_row(r, cfg) for r in rows]
    pairs = Dataset.from_list(rows)
    if cfg.max_samples is not None:
        pairs = pairs.shuffle(seed=cfg.seed).select(range(min(cfg.max_samples, len(pairs))))
    return pairs


def _is_text(value: Any) -> bool:
    """A string, or a conversation: a list of chat messages."""
    if isinstance(value, str):
        return True
    return isinstance(value, list) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value
    )


def _check_values(raw: Dataset, cfg: DataConfig, key: str, text_columns: list[str]) -> None:
    """Every prompt and response is text, every rating a finite number, every label 0 or 1: found here with the
    row, not as a traceback once the models are loaded (nor, for a NaN rating, as pairs silently built from it)."""
    numbers = {
        c for c in (cfg.rating_column, cfg.label_column) if c and cfg.format in ("ratings", "labelled_pairs")
    }
    batches = raw.select_columns([*text_columns, *sorted(numbers)]).iter(batch_size=1000)
    for b, batch in enumerate(batches):
        for column, values in batch.items():
            for i, value in enumerate(values, start=1000 * b):
                if column not in numbers:
                    ok, valid = _is_text(value), "a string, or a list of chat messages"
                elif column == cfg.label_column:
                    ok, valid = (
                        not isinstance(value, str) and value in (0, 1),
                        "0 or 1 (the preferred response)",
                    )
                else:
                    ok = (
                        isinstance(value, int | float)
                        and not isinstance(value, bool)
                        and math.isfinite(value)
                    )
                    valid = "a finite number"
                if not ok:
                    raise RecipeError(
                        f"{key}: {cfg.path!r}, row {i}: column {column!r} is {value!r}; valid: {valid}"
                    )


def _split_prompt(chosen, rejected, cfg: DataConfig, key: str) -> dict:
    """The shared beginning of two conversations is the prompt (`trl.extract_prompt`); with `prompt_delimiter`,
    text prompts are cut back to the end of its last occurrence, so a first word both responses share stays in
    the responses."""
    row = extract_prompt({"chosen": chosen, "rejected": rejected})
    delimiter = cfg.prompt_delimiter
    if delimiter and isinstance(chosen, str):
        cut = row["prompt"].rfind(delimiter)
        if cut < 0:
            raise RecipeError(
                f"{key}.prompt_delimiter={delimiter!r} does not occur in the shared beginning {row['prompt']!r} "
                f"of a chosen/rejected pair in {cfg.path!r}"
            )
        cut += len(delimiter)
        row = {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}
    return row


def _pairs_from_ratings(raw: Dataset, cfg: DataConfig) -> list[dict]:
    by_prompt: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for r in raw:
        by_prompt[r[cfg.prompt_column]].append((float(r[cfg.rating_column]), r[cfg.response_column]))
    rows = []
    for prompt, rated in by_prompt.items():
        rated.sort(key=lambda x: x[0], reverse=True)
        # best vs worst, then second-best vs second-worst, ...: the clearest preferences first
        for k in range(min(cfg.max_pairs_per_prompt, len(rated) // 2)):
            (hi, chosen), (lo, rejected) = rated[k], rated[-1 - k]
            if hi > lo:
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def _format_row(row: dict, cfg: DataConfig) -> dict:
    prompt = cfg.prompt_template.format(prompt=row["prompt"]) if cfg.prompt_template else row["prompt"]
    if cfg.conversational:
        return {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        }
    return {**row, "prompt": prompt}


def load_preference_data(cfg: DataConfig, key: str = "data") -> tuple[Dataset, Dataset | None]:
    """(train pairs, eval pairs or None) for a `DataConfig`."""
    train = to_preference_pairs(load_raw(cfg), cfg, key)
    if cfg.eval_split:
        return train, to_preference_pairs(load_raw(cfg, cfg.eval_split), cfg, key)
    if cfg.eval_fraction > 0:
        split = train.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
        return split["train"], split["test"]
    return train, None


def load_prompts(cfg: DataConfig, limit: int | None = None) -> list:
    """Held-out prompts for generation: `prompt_column` of the data set, de-duplicated, in order."""
    raw = load_raw(cfg)
    if cfg.format == "implicit_prompt":  # HH-style conversations: the prompt is the shared beginning
        prompts = to_preference_pairs(raw, cfg, "eval.prompts")["prompt"]
        unique = {json.dumps(p, sort_keys=True): p for p in prompts}  # message lists are unhashable
        return list(unique.values())[:limit]
    if cfg.prompt_column not in raw.column_names:
        raise RecipeError(
            f"eval.prompts: column {cfg.prompt_column!r} not in {cfg.path!r}; it has {raw.column_names}"
        )
    texts = list(dict.fromkeys(raw[cfg.prompt_column]))[:limit]
    texts = [cfg.prompt_template.format(prompt=p) if cfg.prompt_template else p for p in texts]
    return [[{"role": "user", "content": p}] for p in texts] if cfg.conversational else texts
