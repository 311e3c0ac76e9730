"""DPA through the run engine: the adapter and its manifest entry, evaluation candidates, recipe errors, the
shipped recipes."""

import json
from pathlib import Path

import pytest

from modpo_trl.conditioning.directions import angle_of, direction, direction_gates, render_direction
from modpo_trl.conditioning.svd_lora import saved_conditioning
from modpo_trl.runs.engine import Manifest
from modpo_trl.runs.recipe import (
    DataConfig,
    LoraSettings,
    ModelConfig,
    ObjectiveConfig,
    Recipe,
    RecipeError,
    RewardConfig,
    load_recipe,
)
from modpo_trl.testing import tiny_causal_lm, tiny_reward_model
from modpo_trl.trainers.dpa_config import DPAConfig

from ..helpers import candidates_of, train_recipe
from ..trainers.test_dpa_trainer import TRAINING, prompts

REPO = Path(__file__).resolve().parents[2]


def tiny_recipe(tmp_path, tokenizer, **training) -> Recipe:
    model_dir = tmp_path / "policy"
    tiny_causal_lm(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p[0]["content"]}) + "\n" for p in prompts(3)))
    return Recipe(
        method="dpa",
        run_name="tiny-dpa",
        output_dir=str(tmp_path / "outputs"),
        model=ModelConfig(path=str(model_dir)),
        lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
        objectives=[
            ObjectiveConfig(
                name="brevity",
                data=DataConfig(path=str(data), conversational=True),
                reward=RewardConfig(type="function", function="modpo_trl.rewards.scorers:brevity"),
            ),
            ObjectiveConfig(
                name="cats",
                reward=RewardConfig(type="function", function="tests.trainers.test_dpa_trainer:cat_count"),
            ),
        ],
        training={
            **TRAINING,
            "num_samples": 2,
            "iterations": 1,
            "max_new_tokens": 3,
            "angle_step_degrees": 45,
            "heldout_angles": [0],
            **training,
        },
    )


def test_training_records_the_adapter_and_gives_eval_candidates(tmp_path, tokenizer, capsys):
    recipe = tiny_recipe(tmp_path, tokenizer)
    train_recipe(recipe, dry_run=True)
    plan = capsys.readouterr().out
    assert "training directions (2): [-45.0, 45.0]" in plan and "held-out angles: [0]" in plan
    assert "update: dpo; 1 direction(s) per prompt x N = 2 samples; v . r on the minmax scale" in plan
    assert "iter-1  pending" in plan and not recipe.run_dir.exists()

    train_recipe(recipe)
    manifest = Manifest(recipe.run_dir)
    manifest.update_run("dpa", status="failed")
    with pytest.raises(
        RecipeError, match=r"no finished dpa run to evaluate \(dpa dpa: not evaluated \(failed\)\)"
    ):
        candidates_of(recipe)
    manifest.update_run("dpa", status="done")
    manifest = json.loads((recipe.run_dir / "manifest.json").read_text())
    entry = manifest["runs"]["dpa"]
    assert manifest["method"] == "dpa" and manifest["objectives"] == ["brevity", "cats"]
    assert manifest["target"] is None
    assert entry["status"] == "done" and entry["adapter"] == "dpa"
    assert (recipe.run_dir / "dpa" / "adapter_config.json").is_file()
    assert (recipe.run_dir / "dpa" / "iterations" / "iter-1.jsonl").is_file()
    assert not (recipe.run_dir / "dpa" / "ref").exists()  # DPO's reference copy is not part of the adapter
    assert entry["metrics"]["iter-1"]["update"] == "dpo"
    assert not (recipe.run_dir / ".dpa.tmp").exists()
    assert entry["metrics"]["iter-1"]["prompts"] == 3

    candidates = candidates_of(recipe)
    # default eval angles: 7 over [-45, 45] and the held-out 0 (already among them)
    assert [c.label for c in candidates] == ["t-45", "t-30", "t-15", "t+0-heldout", "t+15", "t+30", "t+45"]
    c = candidates[2]
    assert c.method == "dpa" and c.adapter == str(recipe.run_dir / "dpa")
    assert c.weights == c.preference == pytest.approx(list(direction(-15)))
    assert c.parameter == {"angle": pytest.approx(-15)}  # what evaluation interpolates over
    user = [{"role": "user", "content": "hi"}]
    assert c.prompt_fn(user) == [
        {"role": "system", "content": render_direction(direction(-15), recipe.objective_names)},
        *user,
    ]
    train_recipe(recipe, dry_run=True)
    assert "skip (done)" in capsys.readouterr().out


def test_recipe_reward_layout_errors(tmp_path, tokenizer):
    recipe = tiny_recipe(tmp_path, tokenizer)
    recipe.objectives[1].reward = None
    with pytest.raises(RecipeError, match=r"missing: \['objectives\[1\] \(cats\)'\]"):
        train_recipe(recipe, dry_run=True)
    recipe.objectives[1].reward = RewardConfig(type="columns", chosen_column="a", rejected_column="b")
    with pytest.raises(RecipeError, match=r"objectives\[1\] \(cats\).reward.type=columns cannot score"):
        train_recipe(recipe, dry_run=True)
    with pytest.raises(RecipeError, match="training.num_samples=0 must be an integer >= 1"):
        train_recipe(tiny_recipe(tmp_path, tokenizer, num_samples=0), dry_run=True)
    with pytest.raises(RecipeError, match=r"training.update='rsf' is not valid; valid: \['sft', 'dpo'\]"):
        train_recipe(tiny_recipe(tmp_path, tokenizer, update="rsf"), dry_run=True)
    bad_rm = tiny_recipe(tmp_path, tokenizer)
    rm_dir = tmp_path / "rm3"
    rm = tiny_reward_model(tokenizer, num_labels=2)
    rm.config.id2label = {0: "brevity", 1: "length"}
    rm.save_pretrained(rm_dir)
    bad_rm.objectives[0].reward = RewardConfig(type="reward_model", path=str(rm_dir))
    bad_rm.objectives[1].reward = None
    with pytest.raises(RecipeError, match=r"objectives\[0\] \(brevity\).reward: .*no output\(s\) \['cats'\]"):
        train_recipe(bad_rm, dry_run=True)  # labels are checked from config.json, even in a dry run


@pytest.mark.parametrize("name", ["quickstart", "helpsteer"])
def test_shipped_recipes_build_a_dpa_config(name, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = load_recipe(
        REPO / "recipes" / name / "dpa.yaml", ["training.use_cpu=true", "training.bf16=false"]
    )
    assert recipe.method == "dpa" and len(recipe.objectives) == 2
    args = DPAConfig(**recipe.training, attribute_names=recipe.objective_names, output_dir=str(tmp_path))
    assert args.num_samples >= 2 and args.iterations >= 1
    lo, hi = args.angle_range_degrees
    assert all(lo <= angle_of(v) <= hi for v in args.training_directions())
    if name == "helpsteer":  # the paper's range: the helpfulness weight stays >= 0.71
        assert (lo, hi) == (-45, 45)
    heldout = {round(a, 6) for a in args.heldout_angles}
    assert heldout and not heldout & {round(angle_of(v), 6) for v in args.training_directions()}


def test_an_adapter_conditioned_run_gives_gated_candidates(tmp_path, tokenizer):
    recipe = tiny_recipe(
        tmp_path,
        tokenizer,
        conditioning="adapter",
        angle_range_degrees=[0, 90],
        heldout_angles=[],
        num_samples=3,
        directions_per_prompt=2,
        share_candidates=True,
    )
    train_recipe(recipe)
    assert saved_conditioning(recipe.run_dir / "dpa") == "adapter"
    candidates = candidates_of(recipe)
    assert [c.label for c in candidates][0] == "t+0" and len(candidates) == 7
    for c in candidates:  # the direction reaches the adapter's gates, not the prompt
        assert c.prompt_fn is None
        assert c.adapter_preference == pytest.approx(direction_gates(c.weights))
