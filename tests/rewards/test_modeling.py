"""train_reward_model on a tiny Llama: it learns a synthetic linear attribute, and what it saves is what
RewardModel scores with."""

import json
import math
import random

import numpy as np
import pytest
from datasets import Dataset

from modpo_trl.reward_modeling import main
from modpo_trl.rewards.modeling import is_trained, scoring_template, train_reward_model
from modpo_trl.rewards.sources import RewardModel, render_pair
from modpo_trl.testing import WORDS, tiny_reward_model, tiny_tokenizer

FILLER = [w for w in WORDS if w != "good"]


def rated_rows(n: int, seed: int = 0) -> list[dict]:
    """Responses of 2-8 words; `good` = how many of them are the word "good", `length` = how many words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 8))]
        for i in rng.sample(range(len(words)), rng.randint(0, min(4, len(words)))):
            words[i] = "good"
        rows.append(
            {
                "prompt": " ".join(rng.choice(FILLER) for _ in range(3)),
                "response": " " + " ".join(words),
                "good": words.count("good"),
                "length": len(words),
            }
        )
    return rows


@pytest.fixture
def base(tmp_path):
    """A tiny 1-output reward model without a chat template: training must swap its head for 2 outputs and
    give the tokenizer a scoring template."""
    tok = tiny_tokenizer(chat_template=False)
    path = tmp_path / "base"
    tiny_reward_model(tok, seed=0, num_labels=1).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_learns_linear_attributes_and_round_trips(base, tmp_path):
    rows = rated_rows(192)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rm"
    metrics = train_reward_model(
        base,
        str(data),
        ["good", "length"],
        str(out),
        epochs=6,
        learning_rate=3e-3,
        batch_size=16,
        eval_fraction=0,
    )
    # z-scored targets have variance 1: predicting their mean scores an MSE of 1.
    assert metrics["train_mse"] < 0.5
    assert metrics["train_pearson"]["good"] > 0.5 and metrics["train_pearson"]["length"] > 0.5
    assert metrics["n_train"] == 192 and metrics["n_eval"] == 0 and metrics["eval_mse"] is None

    assert is_trained(out) and not (tmp_path / ".rm.partial").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "good", "1": "length"} and config["problem_type"] == "regression"
    stats = config["modpo_trl"]
    assert stats["attributes"] == ["good", "length"] and stats["normalize"] is True
    good = np.array([r["good"] for r in rows], dtype=float)
    assert stats["mean"][0] == pytest.approx(good.mean()) and stats["std"][0] == pytest.approx(good.std())

    # Scoring at use time: RewardModel picks the attribute by name and renders text as training did.
    reward = RewardModel(str(out), output="good")
    fresh = rated_rows(64, seed=1)
    scores = reward.score([r["prompt"] for r in fresh], [r["response"] for r in fresh])
    assert np.corrcoef(scores.numpy(), [r["good"] for r in fresh])[0, 1] > 0.5
    assert render_pair(reward.tokenizer, "p", " q") == "<s>p</s> q</s>"


def test_eval_split_and_raw_targets(base, tmp_path):
    rows = Dataset.from_list(
        [{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} for r in rated_rows(40)]
    )
    metrics = train_reward_model(
        base, rows, ["length"], str(tmp_path / "rm"), epochs=1, normalize=False, eval_fraction=0.25
    )
    assert (metrics["n_train"], metrics["n_eval"]) == (30, 10)
    assert math.isfinite(metrics["eval_mse"]) and set(metrics["eval_pearson"]) == {"length"}
    stats = json.loads((tmp_path / "rm" / "config.json").read_text())["modpo_trl"]
    assert stats["mean"] == [0.0] and stats["std"] == [1.0] and stats["normalize"] is False


def test_scoring_template_is_bert_pair_layout():
    tok = tiny_tokenizer(chat_template=False)
    tok.chat_template = scoring_template(tok)
    assert render_pair(tok, "the cat", "sat") == "<s>the cat</s>sat</s>"


@pytest.mark.parametrize(
    "rows, attributes, kwargs, match",
    [
        ([{"prompt": "p", "response": "r", "a": 1.0}], ["b"], {}, r"column\(s\) \['b'\] not in the data"),
        ([{"prompt": "p", "text": "r", "a": 1.0}], ["a"], {}, r"\['response'\] not in the data"),
        (
            [{"prompt": "p", "response": "r", "a": 1.0}, {"prompt": "p", "response": "s", "a": math.nan}],
            ["a"],
            {},
            r"'a' has a non-finite value nan in row 1",
        ),
        (
            [{"prompt": "p", "response": "r", "a": 1.0}, {"prompt": "q", "response": "s", "a": 1.0}],
            ["a"],
            {},
            r"\['a'\] are constant",
        ),
        ([{"prompt": "p", "response": "r", "a": 1.0}], [], {}, "non-empty list"),
        ([{"prompt": "p", "response": "r", "a": 1.0}], "a", {}, "non-empty list"),
        ([{"prompt": "p", "response": "r", "a": 1.0}], ["a", "a"], {}, "duplicates"),
        (
            [{"prompt": "p", "response": "r", "a": 1.0}],
            ["a"],
            {"epochs": 0},
            r"epochs=0 must be a number > 0",
        ),
        ([{"prompt": "p", "response": "r", "a": 1.0}], ["a"], {"batch_size": 0}, "batch_size=0"),
        (
            [{"prompt": "p", "response": "r", "a": 1.0}],
            ["a"],
            {"eval_fraction": 1.0},
            r"eval_fraction=1.0 must be in \[0, 1\)",
        ),
    ],
)
def test_errors_come_before_loading_the_model(tmp_path, rows, attributes, kwargs, match):
    # The base model does not exist: reaching it would raise OSError, not the ValueError expected.
    with pytest.raises(ValueError, match=match):
        train_reward_model(
            "/no/such/model", Dataset.from_list(rows), attributes, str(tmp_path / "rm"), **kwargs
        )


def test_empty_data_and_missing_file(tmp_path):
    empty = Dataset.from_dict({"prompt": [], "response": [], "a": []})
    with pytest.raises(ValueError, match="no rows"):
        train_reward_model("/no/such/model", empty, ["a"], str(tmp_path / "rm"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        train_reward_model("/no/such/model", str(tmp_path / "missing.jsonl"), ["a"], str(tmp_path / "rm"))


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    out = tmp_path / "rm"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rows = Dataset.from_list(rated_rows(8))
    with pytest.raises(FileExistsError, match="holds no reward model"):
        train_reward_model("/no/such/model", rows, ["good"], str(out))
    assert not is_trained(out) and (out / "notes.txt").exists()


def test_cli_reports_errors(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "p", "response": "r", "a": 1}) + "\n")
    status = main(
        [
            "--base",
            "/no/such/model",
            "--data",
            str(data),
            "--attributes",
            "b",
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert status == 2 and "['b'] not in the data" in capsys.readouterr().err
