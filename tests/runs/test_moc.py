"""MOC through the run engine: one adapter and its manifest entry, resume, evaluation candidates, recipe errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from modpo_trl.conditioning.preference import condition_prompt, parse_preference, round_preference
from modpo_trl.evaluation.pipeline import evaluate_sweep
from modpo_trl.generation import SamplingSettings
from modpo_trl.runs.moc import MOC
from modpo_trl.runs.recipe import ObjectiveConfig, RecipeError, RewardConfig, load_recipe
from modpo_trl.serving.generators import TransformersGenerator
from modpo_trl.testing import tiny_causal_lm, toy_preference_dataset
from modpo_trl.trainers.moc_trainer import MOCTrainer

from ..helpers import candidates_of, train_recipe
from ..trainers.test_moc_trainer import COMMON, preference_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tok():
    return preference_tokenizer()


def write_recipe(tmp_path, tok, **training):
    model_dir = tmp_path / "policy"
    tiny_causal_lm(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in toy_preference_dataset(8)))
    recipe = {
        "method": "moc",
        "run_name": "tiny-moc",
        "output_dir": str(tmp_path / "outputs"),
        "model": {"path": str(model_dir), "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "objectives": [
            {"name": "kind", "data": {"path": str(data)}},
            {
                "name": "short",
                "reward": {"type": "function", "function": "modpo_trl.rewards.scorers:brevity"},
            },
        ],
        "sweep": {"weights": "simplex(steps=2)"},
        "training": {
            **COMMON,
            "max_steps": 2,
            "precompute_ref_log_probs": True,
            "logging_steps": 1,
            **training,
        },
    }
    path = tmp_path / "moc.yaml"
    path.write_text(json.dumps(recipe))
    return load_recipe(path)


def tiny_eval_overrides(tmp_path):
    """Two prompts, 3 new tokens, brevity as the first objective's scorer, no baselines."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("tell me a story", "why")))
    return [
        f"eval.prompts={{path: {prompts}}}",
        "objectives.0.scorer={type: function, function: modpo_trl.rewards.scorers:brevity}",
        "eval.max_new_tokens=3",
        "eval.baselines=[]",
    ]


def test_training_writes_one_adapter_and_a_manifest_entry(tok, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tok, moo_solver="linear", heldout_preferences=[[0.25, 0.75]])
    manifest = train_recipe(recipe)
    run_dir = recipe.run_dir
    entry = manifest["runs"]["moc"]
    assert manifest["method"] == "moc" and manifest["objectives"] == ["kind", "short"]
    assert entry["status"] == "done" and entry["weights"] is None and entry["method"] == "moc"
    assert entry["metrics"]["train_loss"] > 0 and entry["fingerprints"]["rewards"].keys() == {"short"}
    assert (run_dir / "moc" / "adapter_config.json").is_file()
    assert (
        sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".moc.") and "lock" not in p.name) == []
    )
    assert json.loads((run_dir / "manifest.json").read_text())["runs"]["moc"]["status"] == "done"

    capsys.readouterr()
    assert train_recipe(recipe)["runs"]["moc"]["finished"] == entry["finished"]  # done: not retrained
    assert "nothing to train" in capsys.readouterr().out
    train_recipe(recipe, dry_run=True)
    plan = capsys.readouterr().out
    assert "skip (done)" in plan and "held out: [[0.25, 0.75]]" in plan

    candidates = candidates_of(recipe)
    assert [(c.method, c.label) for c in candidates] == [
        ("moc", "w-1.00-0.00"),
        ("moc", "w-0.50-0.50"),
        ("moc", "w-0.00-1.00"),  # a conditioned model is evaluated at the vertices too
        ("moc", "w-0.25-0.75-heldout"),
    ]
    assert all(c.adapter == str(run_dir / "moc") and c.preference == c.weights for c in candidates)
    # MOC's default with a LoRA: the preference gates the adapter, one block per objective; the prompt stays
    assert (run_dir / "moc" / "preference_lora.json").is_file() and candidates[3].prompt_fn is None
    assert candidates[3].adapter_preference == [0.25, 0.75]
    AutoModelForCausalLM.from_pretrained(str(run_dir / "moc"))  # a loadable adapter folder

    # the evaluation CLI, in its own process as `make moc` runs it (its module is `__main__` there)
    overrides = tiny_eval_overrides(tmp_path)
    cli = [sys.executable, "-m", "modpo_trl.evaluate", str(run_dir), *overrides]
    done = subprocess.run(cli, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert [c["label"] for c in results["candidates"]] == [c.label for c in candidates]
    assert [c["held_out"] for c in results["candidates"]] == [False, False, False, True]
    assert set(results["pareto"]["generalization"]) == {"moc"}


def test_evaluation_renders_each_preference_exactly_as_training_does(tok, tmp_path):
    """simplex(steps=3) asks for (1/3, 1/3, 1/3): the model was trained on the rounded text, which sums to 1."""
    recipe = write_recipe(tmp_path, tok)
    brevity = RewardConfig(type="function", function="modpo_trl.rewards.scorers:brevity")
    recipe.objectives.append(ObjectiveConfig(name="long", reward=brevity))
    recipe.sweep.weights = "simplex(steps=3)"
    (recipe.run_dir / "moc").mkdir(parents=True)
    candidates = MOC().candidates(recipe, recipe.run_dir, {"moc": {"status": "done", "adapter": "moc"}})
    third = next(c for c in candidates if c.label == "w-0.33-0.33-0.33")
    text = third.prompt_fn("tell me")
    assert text == "Preference weights: kind=0.34, short=0.33, long=0.33.\ntell me"
    assert parse_preference(text, recipe.objective_names) == third.preference == [0.34, 0.33, 0.33]
    for (
        candidate
    ) in candidates:  # each is the text MOCTrainer renders for the rounded preference it trains on
        rounded = round_preference(candidate.weights)
        assert candidate.prompt_fn("tell me") == condition_prompt("tell me", rounded, recipe.objective_names)


def test_an_interrupted_run_resumes_from_its_last_checkpoint(tok, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path, tok, save_strategy="steps", save_steps=1)
    train = MOCTrainer.train

    def killed_after_training(self, *args, **kwargs):
        train(self, *args, **kwargs)
        raise RuntimeError("killed")

    monkeypatch.setattr(MOCTrainer, "train", killed_after_training)
    with pytest.raises(RuntimeError, match="killed"):
        train_recipe(recipe)
    entry = json.loads((recipe.run_dir / "manifest.json").read_text())["runs"]["moc"]
    assert entry["status"] == "failed" and entry["error"] == "RuntimeError: killed"
    assert (recipe.run_dir / ".moc.tmp" / "checkpoint-2").is_dir() and not (recipe.run_dir / "moc").exists()
    monkeypatch.setattr(MOCTrainer, "train", train)
    entry = train_recipe(recipe)["runs"]["moc"]
    assert entry["status"] == "done" and entry["resumed_from"] == "checkpoint-2"
    assert (recipe.run_dir / "moc").is_dir() and not (recipe.run_dir / ".moc.tmp").exists()


def test_recipe_errors(tok, tmp_path):
    recipe = write_recipe(tmp_path, tok)
    with pytest.raises(RecipeError, match=r"no manifest.json in .*tiny-moc: run `python -m modpo_trl.train"):
        candidates_of(recipe)
    recipe.objectives[1].reward = None
    with pytest.raises(RecipeError, match=r"objectives\[1\] \(short\) needs `data` .* or a `reward`"):
        train_recipe(recipe, dry_run=True)
    with pytest.raises(RecipeError, match=r"training.moo_solver='adam' is not valid"):
        train_recipe(write_recipe(tmp_path, tok, moo_solver="adam"), dry_run=True)
    with pytest.raises(
        RecipeError, match=r"training.moo_sovler is not a MOCConfig field.*did you mean 'moo_solver'"
    ):
        write_recipe(tmp_path, tok, moo_sovler="mgda")


def test_an_adapter_conditioned_run_is_evaluated_with_its_gates_set(tok, tmp_path):
    recipe = write_recipe(
        tmp_path, tok, conditioning="adapter", preference_rank=1, moo_solver="weighted_mgda"
    )
    train_recipe(recipe)
    adapter = recipe.run_dir / "moc"
    assert (adapter / "preference_lora.json").is_file()
    candidates = candidates_of(recipe)
    assert [c.adapter_preference for c in candidates] == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    assert all(c.prompt_fn is None for c in candidates)  # the prompt stays as it is

    overrides = tiny_eval_overrides(tmp_path)
    report = evaluate_sweep(recipe.run_dir, overrides)
    assert [c["status"] for c in report["candidates"]] == ["ok"] * 3
    cached = {
        json.loads(p.read_text())["fingerprint"] for p in (recipe.run_dir / "eval" / "candidates").iterdir()
    }
    assert len(cached) == 3  # one adapter, three preferences: three cache keys

    generator = TransformersGenerator(recipe, SamplingSettings(max_new_tokens=2, do_sample=False))
    with pytest.raises(ValueError, match=r"is preference-gated and needs a preference"):
        generator.generate(["why"], adapter=str(adapter))
    assert len(generator.generate(["why"], adapter=str(adapter), preference=[0.3, 0.7])) == 1


def test_adapter_conditioning_needs_lora(tok, tmp_path):
    recipe = write_recipe(tmp_path, tok, conditioning="both")
    recipe.lora.enabled = False
    with pytest.raises(RecipeError, match=r"training.conditioning='both' puts the preference into the LoRA"):
        train_recipe(recipe, dry_run=True)
