"""The quickstart pipeline at CI size: the shipped recipe and data, a tiny policy and reward-model base built in
code, a rule-based stand-in for the MiniLM relevance scorer, 2 weightings of 2 steps. Train (the relevance reward
model first), evaluate, and the report and figure that `make quickstart` ends with."""

import json
from pathlib import Path

import pytest

from modpo_trl.evaluate import main as evaluate_main
from modpo_trl.testing import tiny_causal_lm, tiny_tokenizer
from modpo_trl.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "quickstart" / "modpo.yaml"
SAMPLES = REPO / "examples" / "quickstart" / "data" / "samples.jsonl"


def shared_words(prompts, responses):
    """Stand-in for `modpo_trl.rewards.scorers:relevance`: the share of the answer's words that the instruction has."""
    scores = []
    for prompt, response in zip(prompts, responses, strict=True):
        asked = set(prompt[-1]["content"].lower().split())
        said = response[-1]["content"].lower().split()
        scores.append(sum(w in asked for w in said) / max(len(said), 1))
    return scores


@pytest.fixture
def overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe's data paths are relative to the repository root, as with `make`
    tokenizer = tiny_tokenizer()
    tiny_causal_lm(tokenizer).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    rows = SAMPLES.read_text().splitlines()[:64]  # the reward model's training rows: 16 prompts x 4 answers
    (tmp_path / "rm_rows.jsonl").write_text("\n".join(rows) + "\n")
    return [
        f"output_dir={tmp_path / 'outputs'}",
        f"model.path={tmp_path / 'policy'}",
        "objectives.1.data.max_samples=12",
        "objectives.0.scorer.function=tests.test_quickstart:shared_words",
        f"objectives.0.reward.path={tmp_path / 'outputs' / 'rm_relevance'}",
        f"objectives.0.reward.train.base_model={tmp_path / 'policy'}",
        f"objectives.0.reward.train.data={tmp_path / 'rm_rows.jsonl'}",
        "objectives.0.reward.train.epochs=1",
        "sweep.weights=[[0.0, 1.0], [0.6, 0.4]]",
        "training.max_steps=2",
        "training.per_device_train_batch_size=4",
        "training.save_steps=1",
        "training.use_cpu=true",
        "eval.num_prompts=4",
        "eval.max_new_tokens=6",
        "eval.batch_size=4",
    ]


def test_quickstart_trains_a_reward_model_two_adapters_and_reports_the_front(overrides, tmp_path, capsys):
    assert train_main([str(RECIPE), *overrides]) == 0
    run_dir = tmp_path / "outputs" / "quickstart"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {tag: run["status"] for tag, run in manifest["runs"].items()} == {
        "w-0.00-1.00": "done",
        "w-0.60-0.40": "done",
    }
    rm = json.loads((tmp_path / "outputs" / "rm_relevance" / "config.json").read_text())
    assert list(rm["id2label"].values()) == ["relevance"]  # the margin's reward model, trained first

    assert evaluate_main([str(RECIPE), *overrides]) == 0
    out = capsys.readouterr().out
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert [(c["method"], c["status"]) for c in results["candidates"]] == [
        ("reference", "ok"),
        ("modpo", "ok"),
        ("modpo", "ok"),
    ]
    assert set(results["pareto"]["hypervolume"]) == {"reference", "modpo"}
    assert "rewarded_soups: needs 3+ finished weightings" in " ".join(results["notes"])
    png = (run_dir / "eval" / "pareto.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "hypervolume" in out and str(run_dir / "eval" / "pareto.png") in out
