"""`model:` / `lora:` mapped onto TRL's `ModelConfig` and built by TRL's `get_peft_config` /
`get_quantization_config`: DoRA, rsLoRA, modules_to_save, target parameters, revision, 4- and 8-bit."""

from pathlib import Path

import pytest
import torch
import transformers
from peft import get_peft_model
from trl import get_peft_config, get_quantization_config

from modpo_trl import loading
from modpo_trl.runs import models
from modpo_trl.runs.recipe import RecipeError, load_recipe
from modpo_trl.testing import tiny_causal_lm, tiny_tokenizer

from ..helpers import fake_quantised_loading

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "tiny_modpo.yaml"


def load(*overrides):
    return load_recipe(TINY, ["model.path=org/tiny-policy", "objectives.1.reward.path=org/rm", *overrides])


def test_lora_is_trls_peft_config_with_dora_rslora_and_modules_to_save():
    recipe = load(
        "lora.use_dora=true",
        "lora.use_rslora=true",
        "lora.modules_to_save=[lm_head]",
        "lora.target_modules=[q_proj]",
        "model.revision=v2",
    )
    config = models.lora_config(recipe)
    trl_config = models.trl_model_config(recipe)
    trl_config.lora_target_modules = ["q_proj"]
    expected = get_peft_config(trl_config)  # what a TRL script builds from the same settings
    expected.target_modules = {"q_proj"}  # (TRL's __post_init__ would make a one-name list a regex string)
    expected.revision = "v2"
    assert config.to_dict() == expected.to_dict()
    assert config.use_dora and config.use_rslora and config.modules_to_save == ["lm_head"]
    assert (config.r, config.lora_alpha, config.revision) == (4, 8, "v2")
    # peft builds it on a real model: one adapted module per layer, DoRA's magnitude, the saved lm_head
    model = get_peft_model(tiny_causal_lm(tiny_tokenizer()), config)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum("lora_A" in n for n in names) == 2 and sum("lora_magnitude_vector" in n for n in names) == 2
    assert any("lm_head.modules_to_save" in n for n in names)
    assert models.lora_config(load("lora.enabled=false")) is None


def test_one_target_module_names_a_module_not_a_regex():
    model = get_peft_model(
        tiny_causal_lm(tiny_tokenizer()), models.lora_config(load("lora.target_modules=[q_proj]"))
    )
    assert sum("q_proj.lora_A" in n for n, _ in model.named_parameters()) == 2
    config = models.lora_config(load("lora.target_modules=all-linear"))
    assert config.target_modules == "all-linear"


QUANTISED = [
    (["model.load_in_4bit=true"], {"load_in_4bit": True, "bnb_4bit_use_double_quant": True}),
    (
        ["model.load_in_4bit=true", "model.bnb_4bit_quant_type=fp4", "model.use_bnb_nested_quant=false"],
        {
            "bnb_4bit_quant_type": "fp4",
            "bnb_4bit_use_double_quant": False,
        },
    ),
    (["model.load_in_8bit=true"], {"load_in_8bit": True, "load_in_4bit": False}),
]


@pytest.mark.parametrize("overrides,expected", QUANTISED, ids=["4-bit", "fp4", "8-bit"])
def test_quantisation_is_trls(overrides, expected):
    recipe = load(*overrides)
    config = models.quantization_config(recipe)
    trl_config = models.trl_model_config(recipe)
    trl_config.dtype = "bfloat16"  # the recipe's bnb_4bit_compute_dtype (TRL reads it from dtype)
    assert config.to_dict() == get_quantization_config(trl_config).to_dict()
    assert {k: getattr(config, k) for k in expected} == expected
    assert models.quantization_config(load()) is None


def test_8_bit_and_revision_loading_arguments(monkeypatch):
    seen = fake_quantised_loading(monkeypatch)
    monkeypatch.setattr(
        models, "load_tokenizer", lambda path, revision=None: seen.update(tok=(path, revision))
    )
    monkeypatch.setattr(models, "check_loadable", lambda path, key: None)  # a hub id, never downloaded here
    models.load_policy(load("model.load_in_8bit=true", "model.revision=v2"))
    assert seen.pop("quantization_config").load_in_8bit
    assert seen == {
        "path": "org/tiny-policy",
        "dtype": torch.float32,
        "trust_remote_code": False,
        "revision": "v2",
        "device_map": {"": 0},
        "prepared": {"use_gradient_checkpointing": False},
        "tok": ("org/tiny-policy", "v2"),  # the policy's own tokenizer from the same revision
    }


def test_8_bit_without_cuda_fails_before_loading(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RecipeError, match=r"model.load_in_8bit=true needs a CUDA GPU \(bitsandbytes 8-bit"):
        models.check_policy(load("model.load_in_8bit=true"))


def test_the_tokenizer_revision_reaches_transformers(monkeypatch):
    seen = {}
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda path, **kw: seen.update(kw) or tiny_tokenizer()
    )
    loading.load_tokenizer("org/x", revision="v2")
    assert seen == {"revision": "v2"}
