"""Training a (multi-attribute) regression reward model on rated responses.

`train_reward_model` fits `AutoModelForSequenceClassification(num_labels=len(attributes))` with MSE to
rows of (prompt, response, one number per attribute), e.g. samples scored by `modpo_trl.rewards.scorers` or
HelpSteer's ratings. The text is rendered with `rewards.render_pair` and tokenised as `RewardModel` does,
so a model trained here scores the same text at use time: `RewardModel(path, output="<attribute>")`.

With `normalize=True` (default) every attribute is z-scored on the training rows and the model predicts
z-scores; the means and standard deviations are stored in the model's `config.modpo_trl`
(`{"attributes", "mean", "std", "normalize"}`): `value = mean + std * prediction`.

Command line: `python -m modpo_trl.reward_modeling` (see `modpo_trl/reward_modeling.py`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from ..loading import load_rows, load_tokenizer
from ..offline import ensure_offline_model
from .sources import render_pair

CONFIG_KEY = "modpo_trl"
METRICS_FILE = "reward_model_metrics.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def is_trained(output_dir: str | os.PathLike) -> bool:
    """Whether `output_dir` holds a reward model that `train_reward_model` finished writing."""
    folder = Path(output_dir)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return CONFIG_KEY in config and any((folder / name).is_file() for name in WEIGHT_FILES)


def scoring_template(tokenizer) -> str:
    """A chat template for tokenizers without one (encoders such as MiniLM): `[CLS] prompt [SEP] response
    [SEP]`, BERT's own layout for a pair of texts. Saved with the model, so `render_pair` uses it at scoring
    time too. Its special tokens are written into the text because scoring tokenises without adding any."""
    start = tokenizer.cls_token or tokenizer.bos_token or ""
    sep = tokenizer.sep_token or tokenizer.eos_token or "\n"
    return start + "{% for message in messages %}{{ message['content'] }}" + sep + "{% endfor %}"


def _load_rows(data: str | os.PathLike | Dataset) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if not isinstance(data, str | os.PathLike):
        raise TypeError(f"data must be a path or a datasets.Dataset, got {type(data).__name__}")
    if not Path(data).expanduser().exists():
        raise FileNotFoundError(
            f"data={str(data)!r} does not exist (a json/jsonl/csv/parquet file or a Dataset)"
        )
    return load_rows(data)


def _targets(rows: Dataset, attributes: list[str]) -> list[list[float]]:
    """One row of floats per example, checked to be finite."""
    columns = [rows[a] for a in attributes]
    targets = []
    for i, values in enumerate(zip(*columns, strict=True)):
        row = []
        for name, value in zip(attributes, values, strict=True):
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                raise ValueError(
                    f"attribute {name!r} has a non-finite value {value!r} in row {i}; targets must be finite numbers"
                )
            row.append(number)
        targets.append(row)
    return targets


def _check_args(attributes, epochs, learning_rate, batch_size, max_length, eval_fraction) -> list[str]:
    if isinstance(attributes, str) or not attributes or not all(isinstance(a, str) and a for a in attributes):
        raise ValueError(f"attributes={attributes!r} must be a non-empty list of column names")
    if len(set(attributes)) != len(attributes):
        raise ValueError(f"attributes={attributes!r} has duplicates")
    for name, value in (("epochs", epochs), ("learning_rate", learning_rate)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name}={value!r} must be a number > 0")
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction!r} must be in [0, 1)")
    return list(attributes)


def _pearson(predictions, targets) -> float | None:
    if len(targets) < 2 or np.std(predictions) == 0 or np.std(targets) == 0:
        return None  # undefined for constant inputs
    return float(np.corrcoef(predictions, targets)[0, 1])


def train_reward_model(
    base_model: str,
    data: str | os.PathLike | Dataset,
    attributes: list[str],
    output_dir: str | os.PathLike,
    *,
    prompt_column: str = "prompt",
    response_column: str = "response",
    epochs: float = 2.0,
    learning_rate: float = 5e-5,
    batch_size: int = 16,
    max_length: int = 256,
    normalize: bool = True,
    seed: int = 0,
    eval_fraction: float = 0.1,
) -> dict[str, Any]:
    """Trains a regression reward model with one output per attribute and writes it to `output_dir`.

    Args:
        base_model: local folder (or hub id) of the model to fine-tune; a new regression head is added.
        data: json/jsonl/csv/parquet file, `save_to_disk` folder or `datasets.Dataset` with the prompt,
            response and attribute columns (prompts/responses as strings or chat message lists).
        attributes: the numeric columns to predict; they become the model's labels (`config.id2label`).
        output_dir: where the model, its tokenizer and `reward_model_metrics.json` are written. It appears
            only when complete (trained in `.<name>.partial` next to it, then renamed); an earlier reward
            model there is replaced, any other non-empty folder is an error.
        normalize: z-score every attribute (stats stored in `config.modpo_trl`); the model predicts z-scores.
        eval_fraction: held out for the returned eval metrics (none when 0 or too few rows).

    Returns:
        metrics: `train_loss`, `train_mse`, `eval_mse`, `train_pearson` / `eval_pearson` (per attribute),
        `n_train`, `n_eval` (MSE in the units the model predicts: z-scores when `normalize`).
    """
    # Everything that can be wrong with the arguments or the data fails here, before a model is loaded.
    attributes = _check_args(attributes, epochs, learning_rate, batch_size, max_length, eval_fraction)
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not is_trained(output_dir):
        raise FileExistsError(
            f"output_dir={str(output_dir)!r} is a non-empty folder that holds no reward model trained by "
            "modpo_trl; choose another folder or delete it"
        )
    rows = _load_rows(data)
    missing = [c for c in (prompt_column, response_column, *attributes) if c not in rows.column_names]
    if missing:
        raise ValueError(f"column(s) {missing} not in the data; it has {rows.column_names}")
    if len(rows) == 0:
        raise ValueError("the data has no rows")
    targets = np.asarray(_targets(rows, attributes), dtype=np.float64)
    order = np.random.default_rng(seed).permutation(len(rows))
    n_eval = int(len(rows) * eval_fraction)
    train_idx, eval_idx = order[n_eval:], order[:n_eval]
    mean, std = targets[train_idx].mean(0), targets[train_idx].std(0)
    if normalize:
        constant = [a for a, s in zip(attributes, std, strict=True) if s == 0]
        if constant:
            raise ValueError(f"attribute(s) {constant} are constant in the training rows: nothing to learn")
    else:
        mean, std = np.zeros(len(attributes)), np.ones(len(attributes))
    labels = ((targets - mean) / std).astype(np.float32)

    state = PartialState()
    partial = output_dir.parent / f".{output_dir.name}.partial"
    if state.is_main_process and partial.exists():  # left by an interrupted run
        shutil.rmtree(partial)
    state.wait_for_everyone()

    ensure_offline_model(base_model)
    tokenizer = load_tokenizer(base_model)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = scoring_template(tokenizer)
    tokenizer.truncation_side = "left"  # as RewardModel scores: keep the response
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base_model),
            num_labels=len(attributes),
            problem_type="regression",
            id2label=dict(enumerate(attributes)),
            label2id={a: i for i, a in enumerate(attributes)},
            ignore_mismatched_sizes=True,  # a base with another head (e.g. a 1-output reward model)
        )
    except Exception as e:
        raise OSError(f"could not load base_model={str(base_model)!r} as a sequence classifier: {e}") from e
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.update(
        {
            CONFIG_KEY: {
                "attributes": attributes,
                "mean": mean.tolist(),
                "std": std.tolist(),
                "normalize": normalize,
            }
        }
    )

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [
            render_pair(tokenizer, p, r) for p, r in zip(batch["prompt"], batch["response"], strict=True)
        ]
        return tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=False)

    texts = Dataset.from_dict(
        {"prompt": rows[prompt_column], "response": rows[response_column], "labels": labels.tolist()}
    )
    encoded = texts.map(encode, batched=True, remove_columns=["prompt", "response"])
    train_set, eval_set = encoded.select(train_idx), encoded.select(eval_idx) if n_eval else None

    args = TrainingArguments(
        output_dir=str(partial / "trainer"),
        num_train_epochs=float(epochs),
        learning_rate=float(learning_rate),
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        lr_scheduler_type="linear",
        warmup_steps=0.05,
        logging_steps=max(1, math.ceil(len(train_set) / batch_size * epochs / 20)),
        save_strategy="no",
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),  # only helps copies to a GPU; torch warns without one
        seed=seed,
        data_seed=seed,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    output = trainer.train()

    metrics: dict[str, Any] = {"attributes": attributes, "train_loss": output.training_loss}
    for split, dataset in (("train", train_set), ("eval", eval_set)):
        if dataset is None or len(dataset) == 0:
            metrics[f"{split}_mse"], metrics[f"{split}_pearson"] = None, {a: None for a in attributes}
            continue
        predicted = trainer.predict(dataset).predictions.reshape(len(dataset), len(attributes))
        wanted = np.asarray(dataset["labels"], dtype=np.float32).reshape(len(dataset), len(attributes))
        metrics[f"{split}_mse"] = float(((predicted - wanted) ** 2).mean())
        metrics[f"{split}_pearson"] = {
            a: _pearson(predicted[:, j], wanted[:, j]) for j, a in enumerate(attributes)
        }
    metrics.update(n_train=len(train_set), n_eval=n_eval, normalize=normalize, base_model=str(base_model))

    trainer.save_model(str(partial))  # every process: gathers sharded weights, the main one writes
    state.wait_for_everyone()
    if state.is_main_process:
        tokenizer.save_pretrained(str(partial))
        shutil.rmtree(partial / "trainer", ignore_errors=True)
        (partial / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(partial, output_dir)
    state.wait_for_everyone()
    return metrics
