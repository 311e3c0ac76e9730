"""Recipes: every shipped recipe passes --dry-run, bad recipes fail with their message and exit status 2,
the accelerate configs load, and the data formats the hub recipes need (implicit prompts, data_dir)."""

import subprocess
import sys
import types
from dataclasses import fields
from pathlib import Path

import pytest

from modpo_trl import loading
from modpo_trl.runs import data as data_module
from modpo_trl.runs.engine import Manifest, make_plan, work_dir
from modpo_trl.runs.method import Method, Prepared, Run, Trained
from modpo_trl.runs.methods import METHODS, method_of
from modpo_trl.runs.recipe import METHOD_CONFIGS, DataConfig, RecipeError, load_recipe, weight_tag
from modpo_trl.testing import tiny_causal_lm, tiny_tokenizer
from modpo_trl.train import main

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "tiny_modpo.yaml"
HH_TINY = REPO / "tests" / "data" / "hh_tiny.jsonl"
# Other helpers add recipes too: every one of them must pass --dry-run.
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)
ACCELERATE = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))
# The tiny recipe's required paths (checked for existence only when they look local).
TINY_PATHS = ["model.path=org/tiny-policy", "objectives.1.reward.path=org/tiny-rm"]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # recipe paths are relative to the repository root, as with `make`


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_passes_dry_run(path, capsys, monkeypatch):
    import transformers

    def no_model(*args, **kwargs):
        raise AssertionError("--dry-run loaded a model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    monkeypatch.setattr(data_module, "load_raw", no_model)
    assert main([str(path), "--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    recipe = load_recipe(path)
    assert f"run_name: {recipe.run_name}" in out
    if recipe.method == "modpo":
        for weighting in recipe.weightings():
            assert weight_tag(weighting) in out


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_plans_runs_with_their_trainer_configs(path):
    """Field names are checked at load; values (e.g. a float warmup_steps) when the plan builds the configs,
    without the hardware checks: a GPU recipe plans on a CPU machine."""
    recipe = load_recipe(path)
    plan = make_plan(recipe, method_of(recipe), dry_run=True)
    assert all(type(run.args) is METHOD_CONFIGS[recipe.method] for run in plan.runs)
    assert all(run.work_dir == recipe.run_dir / f".{run.tag}.tmp" for run in plan.runs)
    if recipe.method == "modpo":
        assert [run.weights for run in plan.runs] == recipe.weightings()
        last = plan.runs[-1].args
        assert last.weights == recipe.trainer_weights(recipe.weightings()[-1])
        assert last.objective_names[0] == recipe.objective_names[recipe.target_index]
    else:
        assert [run.tag for run in plan.runs] == [recipe.method]


def test_safety_recipes_follow_the_reference_and_chain_their_stages():
    dpo = load_recipe(REPO / "recipes/safety/dpo_safer.yaml")
    modpo = load_recipe(REPO / "recipes/safety/modpo.yaml")
    assert dpo.weightings() == [[1.0]] and dpo.objectives[0].data.label_column == "safer_response_id"
    assert modpo.objectives[modpo.target_index].data.label_column == "better_response_id"
    # stage 2 reads stage 1's adapter, with the beta it was trained with
    margin = modpo.objectives[1].reward
    assert margin.type == "implicit"
    assert Path(margin.path) == dpo.run_dir / weight_tag([1.0])
    assert margin.beta == dpo.training["beta"] == modpo.training["beta"]
    # the reference's settings (DESIGN.md section 7), on one GPU with QLoRA
    for recipe in (dpo, modpo):
        assert recipe.model.path == "PKU-Alignment/alpaca-7b-reproduced" and recipe.model.load_in_4bit
        assert (recipe.lora.r, recipe.lora.alpha) == (64, 1)
        assert recipe.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
        assert recipe.training["learning_rate"] == 5e-4 and recipe.training["max_length"] == 512
    assert modpo.objectives[0].data.prompt_template == "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
    # simplex(steps=10) without the points whose target weight is 0
    assert modpo.weightings() == [[round(1 - k / 10, 10), round(k / 10, 10)] for k in range(10)]


def test_hh_recipes_chain_their_stages():
    dpo = load_recipe(REPO / "recipes/hh/dpo_harmless.yaml")
    modpo = load_recipe(REPO / "recipes/hh/modpo.yaml")
    assert Path(modpo.objectives[1].reward.path) == dpo.run_dir / weight_tag([1.0])
    assert (dpo.objectives[0].data.data_dir, modpo.objectives[0].data.data_dir) == (
        "harmless-base",
        "helpful-base",
    )


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(path))  # rejects unknown keys and bad values
    assert isinstance(config, ClusterConfig)
    expected = {
        "cpu.yaml": ("NO", 1, True),
        "multi_cpu.yaml": ("MULTI_GPU", 2, True),
        "single_gpu.yaml": ("NO", 1, False),
        "multi_gpu.yaml": ("MULTI_GPU", 8, False),
        "deepspeed_zero2.yaml": ("DEEPSPEED", 8, False),
        "deepspeed_zero3.yaml": ("DEEPSPEED", 8, False),
        "fsdp.yaml": ("FSDP", 8, False),
    }[path.name]
    assert (str(config.distributed_type.value), config.num_processes, config.use_cpu) == expected
    if path.name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(path.stem[-1])


# ----------------------------------------------------------------------------------------------- bad recipes
TARGET_SECOND = [  # the tiny recipe with its second objective as the target
    "target=harmless",
    "objectives.1.data={path: tests/data/tiny_pairs.jsonl}",
    "objectives.0.reward={type: columns, chosen_column: a, rejected_column: b}",
]
BAD = [
    (["modle.path=x"], r"unknown key 'modle' \(did you mean 'model'\?\)"),
    (
        ["lora.r=abc"],
        r"invalid value for 'lora.r': Value 'abc' of type 'str' could not be converted to Integer",
    ),
    (
        ["objectives.0.data.path=tests/data/missing.jsonl"],
        r"data.path='tests/data/missing.jsonl' does not exist",
    ),
    (["sweep.weights=[[0.5,0.3,0.2]]"], r"sweep.weights\[0\]=\[0.5, 0.3, 0.2\] must have 2 entries"),
    (["sweep.weights=[[0.5,0.6]]"], r"sums to 1.1, not 1; did you mean \[0.454545, 0.545455\]"),
    (["sweep.weights=[[0.0,1.0]]"], r"sweep.weights\[0\]\[0\]=0.0 must be > 0: it is the target objective's"),
    ([*TARGET_SECOND, "sweep.weights=[[1.0,0.0]]"], r"weights\[0\] \(target first\)\[0\]=0.0 must be > 0"),
    (
        ["training.betta=0.2"],
        r"training.betta is not a MODPOConfig field \(did you mean 'beta'\?\)",
    ),
    (["training.output_dir=x"], r"training.output_dir is set by the sweep"),
    (["sweep.index=7"], r"sweep.index=7 is out of range; valid: 0..2"),
    (["objectives.0.data.format=csv"], r"format='csv' is not valid; valid: \['pairs', 'labelled_pairs'"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0][-1] for b in BAD])
def test_bad_recipe_messages_and_exit_status(overrides, message, capsys):
    with pytest.raises(RecipeError, match=message):
        load_recipe(TINY, TINY_PATHS + overrides)
    assert main([str(TINY), *TINY_PATHS, *overrides, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modpo_trl.train: error: ") and err.count("\n") == 1  # one paragraph
    assert "Traceback" not in err


def test_missing_recipe_file_and_missing_value(capsys):
    assert main(["recipes/nope.yaml"]) == 2
    assert "recipe file 'recipes/nope.yaml' does not exist" in capsys.readouterr().err
    assert main([str(TINY), "--dry-run"]) == 2  # model.path: ??? in the tiny recipe
    assert "invalid value for 'model.path'" in capsys.readouterr().err


def test_cli_exit_status_in_a_real_process():
    result = subprocess.run(
        [sys.executable, "-m", "modpo_trl.train", str(TINY), *TINY_PATHS, "training.betta=0.2"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2
    assert "training.betta is not a MODPOConfig field" in result.stderr
    assert "Traceback" not in result.stderr


def test_weights_are_checked_with_the_target_first():
    """With the target second, (0, 1) is its vertex (DPO on its pairs) and valid."""
    recipe = load_recipe(TINY, [*TINY_PATHS, *TARGET_SECOND, "sweep.weights=[[0.0,1.0],[0.25,0.75]]"])
    assert recipe.weightings() == [[0.0, 1.0], [0.25, 0.75]]
    assert recipe.trainer_weights([0.25, 0.75]) == [0.75, 0.25]


def test_one_objective_is_dpo_for_modpo_only(tmp_path):
    one = tmp_path / "dpo.yaml"
    one.write_text(
        "run_name: dpo\nmodel: {path: org/m}\nobjectives:\n"
        f"  - name: safer\n    data: {{path: {REPO / 'tests/data/tiny_pairs.jsonl'}}}\n"
        "sweep: {weights: simplex(steps=4)}\n"
    )
    assert load_recipe(one).weightings() == [[1.0]]
    with pytest.raises(RecipeError, match="objectives has 1 entries; method=moc needs at least 2"):
        load_recipe(one, ["method=moc"])


def test_a_method_plugs_into_the_engine_through_its_interface(tmp_path, monkeypatch, capsys):
    """The engine runs any `Method`: here one whose single run trains nothing and saves a marker file."""
    calls = []

    class Fake(Method):
        name = "moc"

        def runs(self, recipe, dry_run=False):
            calls.append(("runs", dry_run))
            args = types.SimpleNamespace(output_dir=str(work_dir(recipe.run_dir, "fake")))
            return [Run("fake", 0, args)]

        def prepare(self, recipe):
            calls.append("prepare")
            return Prepared({"data": "fp"})

        def train(self, recipe, run, prepared, resume):
            calls.append(("train", resume))
            return Trained(
                lambda folder: (folder.mkdir(), (folder / "adapter.txt").write_text("x")), {"loss": 1.0}
            )

        def candidates(self, recipe, run_dir, entries):
            return []

    monkeypatch.setitem(METHODS, "moc", Fake())
    # The tiny recipe's `training:` holds DPO fields; validate them as such whatever the method.
    monkeypatch.setitem(METHOD_CONFIGS, "moc", METHOD_CONFIGS["modpo"])
    tokenizer = tiny_tokenizer()  # the engine checks the policy's tokenizer and config before anything else
    tiny_causal_lm(tokenizer).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    overrides = [*TINY_PATHS, f"model.path={tmp_path / 'policy'}", "method=moc", f"output_dir={tmp_path}"]
    assert main([str(TINY), *overrides, "--dry-run"]) == 0
    assert "0      fake  all (conditioned)  pending  train" in capsys.readouterr().out
    assert main([str(TINY), *overrides]) == 0
    assert main([str(TINY), *overrides]) == 0  # done: nothing trained again
    assert calls == [("runs", True), ("runs", False), "prepare", ("train", None), ("runs", False)]
    manifest = Manifest(tmp_path / "tiny").read()
    entry = manifest["runs"]["fake"]
    assert (
        entry["status"] == "done"
        and entry["metrics"] == {"loss": 1.0}
        and entry["fingerprints"]["data"] == "fp"
    )
    assert (tmp_path / "tiny" / "fake" / "adapter.txt").is_file()


# ------------------------------------------------------------------------------------------------- data
def hh(**kwargs) -> DataConfig:
    return DataConfig(path=str(HH_TINY), format="implicit_prompt", **kwargs)


def test_implicit_prompt_splits_at_the_last_assistant_turn():
    pairs = data_module.to_preference_pairs(data_module.load_raw(hh()), hh(prompt_delimiter="\n\nAssistant:"))
    h, a = "\n\nHuman: ", "\n\nAssistant:"
    assert pairs.to_list() == [
        {
            "prompt": h + "How do I bake bread?" + a,
            "chosen": " Mix flour, water and yeast.",
            "rejected": " Buy it.",
        },
        {
            "prompt": h + "Can you help me?" + a,
            "chosen": " I can, what do you need?",
            "rejected": " I won't.",
        },
        {
            "prompt": h + "Hi" + a + " Hello!" + h + "Tell me a joke" + a,
            "chosen": " Sure: why did the cat sit on the mat?",
            "rejected": " Sure, no.",
        },
    ]
    # trl.extract_prompt alone cuts where the texts differ: a shared first word moves into the prompt
    plain = data_module.to_preference_pairs(data_module.load_raw(hh()), hh())
    assert plain[1]["prompt"].endswith("Assistant: I") and plain[1]["chosen"] == " can, what do you need?"
    assert plain[0] == pairs[0]


def test_implicit_prompt_errors_and_eval_prompts():
    with pytest.raises(RecipeError, match=r"data.prompt_delimiter='\\n\\nBot:' does not occur in the shared"):
        data_module.to_preference_pairs(data_module.load_raw(hh()), hh(prompt_delimiter="\n\nBot:"))
    prompts = data_module.load_prompts(hh(prompt_delimiter="\n\nAssistant:"), limit=2)
    assert prompts == [
        "\n\nHuman: How do I bake bread?\n\nAssistant:",
        "\n\nHuman: Can you help me?\n\nAssistant:",
    ]


def test_hub_data_dir_reaches_load_dataset(monkeypatch):
    seen = {}

    def fake_load_dataset(path, name=None, **kwargs):
        seen.update(path=path, name=name, **kwargs)
        return "raw"

    monkeypatch.setattr(loading, "load_dataset", fake_load_dataset)
    cfg = DataConfig(path="Anthropic/hh-rlhf", data_dir="helpful-base", split="test")
    assert data_module.load_raw(cfg) == "raw"
    assert seen == {"path": "Anthropic/hh-rlhf", "name": None, "data_dir": "helpful-base", "split": "test"}


def test_pairs_keep_other_columns_for_column_rewards(tmp_path):
    path = tmp_path / "scored.jsonl"
    path.write_text('{"q": "hi", "a": " yes", "b": " no", "len_a": 1.0, "len_b": 2.0}\n')
    cfg = DataConfig(path=str(path), prompt_column="q", chosen_column="a", rejected_column="b")
    pairs = data_module.to_preference_pairs(data_module.load_raw(cfg), cfg)
    assert pairs[0]["prompt"] == "hi" and (pairs[0]["len_a"], pairs[0]["len_b"]) == (1.0, 2.0)


def test_data_config_documents_every_format():
    assert {f.name for f in fields(DataConfig)} >= {"data_dir", "prompt_delimiter"}
    for fmt in ("pairs", "labelled_pairs", "ratings", "implicit_prompt"):
        assert f"`{fmt}`" in DataConfig.__doc__


def test_the_quickstart_turns_off_trls_default_activation_checkpointing(tmp_path):
    """TRL's configs checkpoint activations by default; the 135M quickstart needs no memory saving."""
    recipe = load_recipe(REPO / "recipes/quickstart/modpo.yaml")
    args = make_plan(recipe, method_of(recipe), dry_run=True).runs[0].args
    assert args.activation_checkpointing is False and args.gradient_checkpointing is False
