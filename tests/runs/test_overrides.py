"""Recipe overrides and trainer configs as Hugging Face users expect them: values parsed as OmegaConf parses a
dotlist (and the recipe file), any dotted key settable, TRL's `ModelConfig` names accepted, and every value the
trainer would reject named by its `training` key before any model or data is loaded."""

import dataclasses
import warnings
from pathlib import Path

import pytest
import transformers
import trl
from omegaconf import OmegaConf

from modpo_trl.runs import data as data_module
from modpo_trl.runs import publish
from modpo_trl.runs.engine import make_plan
from modpo_trl.runs.methods import method_of
from modpo_trl.runs.recipe import TRL_NAMES, LoraSettings, ModelConfig, RecipeError, load_recipe
from modpo_trl.train import main

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "tiny_modpo.yaml"
PAIRS = REPO / "tests" / "data" / "tiny_pairs.jsonl"
TINY_PATHS = ["model.path=org/tiny-policy", "objectives.1.reward.path=org/tiny-rm"]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


def load(*overrides: str):
    return load_recipe(TINY, [*TINY_PATHS, *overrides])


# ------------------------------------------------------------------------------------------ override values
NUMBERS = [  # (text on the command line, value the recipe holds)
    ("1e-4", 1e-4),
    ("5E-5", 5e-5),
    ("-1e3", -1000.0),
    ("+1e3", 1000.0),
    (".5", 0.5),
    ("1.", 1.0),
    ("3", 3),
    ("1_000", 1000),
    (".inf", float("inf")),
    ("'1e-4'", "1e-4"),  # quoted: a string
    ("inf", "inf"),  # YAML's infinity is .inf; plain inf is text (as in a recipe file)
    ("-.5", "-.5"),  # OmegaConf's rule (and the recipe file's): a signed number needs a digit before the dot
]


@pytest.mark.parametrize("text,value", NUMBERS, ids=[n[0] for n in NUMBERS])
def test_override_values_are_parsed_as_omegaconf_parses_the_recipe_file(text, value, tmp_path):
    # a free-form value (learning_rate itself must be a number >= 0)
    recipe = load(f"training.lr_scheduler_kwargs.x={text}")
    got = recipe.training["lr_scheduler_kwargs"]["x"]
    assert got == value and type(got) is type(value)
    # the same text in the recipe file reads the same
    written = tmp_path / "r.yaml"
    written.write_text(
        TINY.read_text().replace(
            "learning_rate: 1.0e-3", f"learning_rate: 1.0e-3\n  lr_scheduler_kwargs:\n    x: {text}"
        )
    )
    assert load_recipe(written, TINY_PATHS).training["lr_scheduler_kwargs"]["x"] == value


def test_a_learning_rate_override_is_a_number():
    assert load("training.learning_rate=1e-4").training["learning_rate"] == 1e-4


def test_structured_override_values():
    recipe = load(
        "sweep.weights=[[1.0, 0.0], [0.5, 0.5]]",
        "training.lr_scheduler_kwargs={min_lr: 1e-6}",
        "eval.do_sample=false",
        "objectives.0.data.max_samples=null",
    )
    assert recipe.weightings() == [[1.0, 0.0], [0.5, 0.5]]
    assert recipe.training["lr_scheduler_kwargs"] == {"min_lr": 1e-6}
    assert recipe.eval.do_sample is False and recipe.objectives[0].data.max_samples is None


def test_interpolations_in_overrides_resolve_later():
    recipe = load(
        "eval.prompts={path: tests/data/tiny_pairs.jsonl}", "eval.prompts.prompt_column=${run_name}"
    )
    assert recipe.eval.prompts.prompt_column == "tiny"


def test_a_field_of_an_empty_optional_section_can_be_set():
    assert load().eval.prompts is None
    recipe = load(f"eval.prompts.path={PAIRS}", "eval.prompts.prompt_column=prompt")
    assert recipe.eval.prompts.path == str(PAIRS) and recipe.eval.prompts.format == "pairs"  # schema defaults
    recipe = load("objectives.0.scorer.type=function", "objectives.0.scorer.function=my_module:score")
    assert recipe.objectives[0].scorer.function == "my_module:score"


BAD_OVERRIDES = [
    (
        ["eval.prompts.bogus=1"],
        r"override 'eval.prompts.bogus=1': unknown key 'eval.prompts.bogus'; valid keys",
    ),
    (["training.beta=[1,"], r"override 'training.beta=\[1,': the value is not valid YAML"),
    (["=3"], r"override '=3' is not of the form key=value"),
    (["lora.r=8", "model.lora_r=4"], r"overrides 'lora.r=8' and 'model.lora_r=4' both set lora.r; keep one"),
]


@pytest.mark.parametrize("overrides,message", BAD_OVERRIDES, ids=[b[0][-1] for b in BAD_OVERRIDES])
def test_bad_overrides_name_themselves(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load(*overrides)


# ------------------------------------------------------------------------------------------ TRL's names
def test_trl_model_config_names_are_aliases_of_the_recipe_keys(tmp_path):
    written = tmp_path / "trl.yaml"
    text = TINY.read_text().replace(
        "model:\n  path: ???\n  dtype: float32\n",
        "model:\n  model_name_or_path: org/tiny-policy\n  model_revision: v2\n  torch_dtype: bfloat16\n"
        "  use_peft: true\n  lora_r: 8\n  lora_alpha: 16\n  lora_target_modules: [q_proj]\n  use_dora: true\n"
        "  use_rslora: true\n  lora_modules_to_save: [lm_head]\n  use_bnb_nested_quant: false\n",
    )
    written.write_text(
        text.replace("lora:\n  r: 4\n  alpha: 8\n  dropout: 0.0\n  target_modules: [q_proj, v_proj]\n", "")
    )
    recipe = load_recipe(written, ["objectives.1.reward.path=org/tiny-rm", "lora.lora_dropout=0.1"])
    model, lora = recipe.model, recipe.lora
    assert (model.path, model.revision, model.dtype, model.bnb_4bit_use_double_quant) == (
        "org/tiny-policy",
        "v2",
        "bfloat16",
        False,
    )
    assert (lora.enabled, lora.r, lora.alpha, lora.dropout, lora.target_modules) == (
        True,
        8,
        16,
        0.1,
        ["q_proj"],
    )
    assert lora.use_dora and lora.use_rslora and lora.modules_to_save == ["lm_head"]
    # the resolved recipe shows the recipe's names only
    assert "lora_r" not in OmegaConf.to_yaml(OmegaConf.structured(recipe))


def test_every_trl_name_maps_onto_a_recipe_field():
    sections = {"model": ModelConfig, "lora": LoraSettings}
    trl_fields = {f.name for f in dataclasses.fields(trl.ModelConfig)}
    ours = {f"model.{f.name}" for f in dataclasses.fields(ModelConfig)}
    for name in trl_fields:  # every TRL field has a recipe key: an alias, or the same name in `model:`
        target = TRL_NAMES.get(name, f"model.{name}")
        section, field = target.split(".")
        assert field in {f.name for f in dataclasses.fields(sections[section])}, name
    assert {f"model.{n}" for n in trl_fields if n not in TRL_NAMES} <= ours


def test_a_setting_given_under_both_names_with_different_values_is_rejected(tmp_path):
    written = tmp_path / "both.yaml"
    written.write_text(TINY.read_text().replace("  dtype: float32\n", "  dtype: float32\n  lora_r: 8\n"))
    with pytest.raises(RecipeError, match=r"model.lora_r=8 and lora.r=4 both set lora.r; keep one"):
        load_recipe(written, TINY_PATHS)
    written.write_text(TINY.read_text().replace("  dtype: float32\n", "  dtype: float32\n  lora_r: 4\n"))
    assert load_recipe(written, TINY_PATHS).lora.r == 4  # the same value twice is fine


BAD_MODEL = [
    (["model.load_in_4bit=true", "model.load_in_8bit=true"], r"load_in_4bit and model.load_in_8bit are both"),
    (
        ["model.bnb_4bit_quant_type=int4"],
        r"model.bnb_4bit_quant_type='int4' is not valid; valid: \['nf4', 'fp4'\]",
    ),
    (["model.dtype=bf16"], r"model.dtype='bf16' is not valid; valid: \['auto', 'float32'"),
    (["lora.task_type=SEQ_CLS"], r"lora.task_type='SEQ_CLS' is not valid; valid: \['CAUSAL_LM'\]"),
    (["lora.target_modules=[]"], r"lora.target_modules=\[\] is not valid; valid: a list of module names"),
    ([f"model.path={REPO}", "model.revision=v2"], r"model.revision='v2' applies to hub ids, but model.path="),
]


@pytest.mark.parametrize("overrides,message", BAD_MODEL, ids=[b[0][-1] for b in BAD_MODEL])
def test_bad_model_and_lora_settings(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load(*overrides)


# ------------------------------------------------------------------------------------------ trainer configs
BAD_TRAINING = [  # (method, overrides, message): each rejected by the dry run, naming the key
    (
        "modpo",
        ["training.lr_scheduler_type=bogus"],
        r"training.lr_scheduler_type='bogus': bogus is not a valid",
    ),
    ("modpo", ["training.optim=adam_bogus"], r"training.optim='adam_bogus': adam_bogus is not a valid"),
    ("modpo", ["training.eval_strategy=sometimes"], r"training.eval_strategy='sometimes': sometimes is not"),
    (
        "modpo",
        ["training.f_divergence_type=js_divergence"],
        r"training.f_divergence_type='js_divergence' cannot be used with margin rewards",
    ),
    ("moc", ["training.loss_type=aot"], r"training.loss_type=\['aot'\] is not supported by MOC"),
    (
        "modpo",
        ["training.report_to=tensorbored"],
        r"training.report_to='tensorbored' is not valid; valid: \[",
    ),
    ("modpo", ["training.report_to=wandb"], r"training.report_to='wandb': its package is not installed here"),
    ("modpo", ["training.report_to=[tensorboard, swanlab]"], r"training.report_to='swanlab': its package is"),
    (
        "modpo",
        ["training.hub_strategy=checkpoint", "training.push_to_hub=true"],
        r"hub_strategy='checkpoint'",
    ),
]


@pytest.mark.parametrize("method,overrides,message", BAD_TRAINING, ids=[b[1][0] for b in BAD_TRAINING])
def test_the_dry_run_rejects_what_the_trainer_would(method, overrides, message, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

    def no_loading(*args, **kwargs):
        raise AssertionError("a model or data set was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    monkeypatch.setattr(data_module, "load_raw", no_loading)
    extra = ["method=moc", "objectives.1.data={path: tests/data/tiny_pairs.jsonl}"] if method == "moc" else []
    recipe = load(*extra, *overrides)
    with pytest.raises(RecipeError, match=message):
        make_plan(recipe, method_of(recipe), dry_run=True)
    assert main([str(TINY), *TINY_PATHS, *extra, *overrides, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modpo_trl.train: error: training.") and "Traceback" not in err


def test_installed_report_to_integrations_pass(monkeypatch):
    monkeypatch.setattr(publish, "get_available_reporting_integrations", lambda: ["wandb"])
    recipe = load("training.report_to=wandb")
    assert make_plan(recipe, method_of(recipe), dry_run=True).runs[0].args.report_to == ["wandb"]


def test_the_trainer_config_never_pushes_and_pins_memory_only_for_a_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    recipe = load("training.push_to_hub=true", "training.hub_model_id=me/tiny")
    args = make_plan(recipe, method_of(recipe), dry_run=True).runs[0].args
    assert args.push_to_hub is False and args.hub_model_id == "me/tiny"  # the engine pushes (runs.publish)
    assert args.dataloader_pin_memory is False  # no GPU here (and use_cpu)
    recipe = load("training.use_cpu=false")  # as the quickstart recipes: a GPU when there is one
    args = make_plan(recipe, method_of(recipe)).runs[0].args
    assert args.dataloader_pin_memory is False  # TrainingArguments' True would make torch warn on CPU
    assert args.activation_checkpointing is False  # the recipe's own setting
    written = tmp_path / "default_checkpointing.yaml"
    written.write_text(TINY.read_text().replace("  activation_checkpointing: false\n", ""))
    recipe = load_recipe(written, TINY_PATHS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # TRL's default under transformers' deprecated name
        args = make_plan(recipe, method_of(recipe), dry_run=True).runs[0].args
    assert args.activation_checkpointing is True  # TRL's default, under its current name


def test_report_to_is_checked_for_training_not_for_reading_a_run(monkeypatch):
    """Evaluating a run (its method's `runs`, e.g. DPA's candidates) on a machine without its logger works."""
    recipe = load("training.report_to=wandb")
    assert method_of(recipe).runs(recipe, dry_run=True)[0].args.report_to == ["wandb"]
    with pytest.raises(RecipeError, match="training.report_to='wandb'"):
        make_plan(recipe, method_of(recipe), dry_run=True)
