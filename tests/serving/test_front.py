"""ParetoSet: a run answering at any preference (nearest, soup, mod, conditioned), and its refusals.

The MODPO run is the evaluation tests' faked sweep: a tiny base model and adapters at w-1.00-0.00, w-0.50-0.50
and w-0.20-0.80 (the extremes of `length` and `positive` are the first and the last).
"""

import json
import shutil

import pytest
import torch

from modpo_trl.conditioning.directions import direction, render_direction
from modpo_trl.conditioning.preference import condition_prompt
from modpo_trl.runs.recipe import RecipeError, load_recipe
from modpo_trl.serving.front import ParetoSet
from modpo_trl.serving.generators import TransformersGenerator

PROMPTS = [[{"role": "user", "content": "tell me a story"}], [{"role": "user", "content": "why"}]]
GREEDY = {"do_sample": False, "max_new_tokens": 6}
X = torch.tensor([[1, 10, 20, 30, 40, 11]])


def adapter_logits(front: ParetoSet, adapter: str) -> torch.Tensor:
    with front.generator._activated(adapter, None) as model, torch.no_grad():
        return model(X).logits


def soup_logits(front: ParetoSet, soup) -> torch.Tensor:
    with front.generator._activated(None, soup) as model, torch.no_grad():
        return model(X).logits


@pytest.fixture
def no_model(monkeypatch):
    """Fails a test that loads the base model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(TransformersGenerator, "__init__", refuse)


def test_nearest_picks_the_closest_trained_weighting(sweep, no_model):
    front = ParetoSet(sweep)
    assert front.strategies == ["nearest", "soup", "mod"]
    for w, tag in [
        ([0.6, 0.4], "w-0.50-0.50"),
        ([0.9, 0.1], "w-1.00-0.00"),
        ([0.0, 1.0], "w-0.20-0.80"),
        ([0.3, 0.7], "w-0.20-0.80"),  # 0.1 from (0.2, 0.8) per entry, 0.2 from (0.5, 0.5)
    ]:
        candidate = front.candidate(w)  # nearest is a MODPO run's default
        assert (candidate.method, candidate.label, candidate.adapter) == ("modpo", tag, str(sweep / tag))


def test_nearest_answers_as_its_adapter(sweep):
    front = ParetoSet(sweep)
    answers = front.generate(PROMPTS, [0.6, 0.4], **GREEDY)
    generator = TransformersGenerator(load_recipe(sweep / "recipe.yaml"), front.sampling(**GREEDY), "cpu")
    assert answers == generator.generate(PROMPTS, adapter=str(sweep / "w-0.50-0.50"))
    assert answers != generator.generate(PROMPTS, adapter=str(sweep / "w-1.00-0.00"))


def test_soup_at_a_vertex_is_the_adapter_and_has_no_dropout(sweep):
    """With LoRA dropout 0.05 in the adapters' configs, the soup (new LoRA layers) must still run in eval mode."""
    for tag in ("w-1.00-0.00", "w-0.50-0.50", "w-0.20-0.80"):
        path = sweep / tag / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "lora_dropout": 0.05}))
    front = ParetoSet(sweep)
    vertex = front.candidate([1.0, 0.0], "soup")
    assert vertex.soup == [(str(sweep / "w-1.00-0.00"), pytest.approx(1.0))]
    expected = adapter_logits(front, str(sweep / "w-1.00-0.00"))
    first = soup_logits(front, vertex.soup)
    assert torch.allclose(first, expected, atol=1e-5)
    assert torch.equal(first, soup_logits(front, vertex.soup))  # deterministic: no dropout

    mixed = front.candidate([0.6, 0.4], "soup")
    # (0.6, 0.4) = 0.5 * (1, 0) + 0.5 * (0.2, 0.8)
    assert mixed.soup == [(str(sweep / "w-1.00-0.00"), pytest.approx(0.5)), (str(sweep / "w-0.20-0.80"), 0.5)]
    a, b = soup_logits(front, mixed.soup), soup_logits(front, mixed.soup)
    assert torch.equal(a, b) and not torch.allclose(a, expected, atol=1e-3)


def test_a_soup_is_built_once_per_weighting(sweep):
    front = ParetoSet(sweep)

    def soups():
        return {name for name in front.generator.model.peft_config if name.startswith("soup_")}

    first = front.generate(PROMPTS, [0.6, 0.4], "soup", **GREEDY)
    built = soups()
    assert len(built) == 1
    assert front.generate(PROMPTS, [0.6, 0.4], "soup", **GREEDY) == first and soups() == built
    front.generate(PROMPTS, [0.8, 0.2], "soup", **GREEDY)
    assert len(soups()) == 2 and built < soups()
    front.generator.release(str(sweep / "w-1.00-0.00"))  # soups built from a released adapter go with it
    assert soups() == set()


def test_mod_at_a_vertex_is_the_adapters_greedy_output(sweep):
    front = ParetoSet(sweep)
    vertex = front.candidate([1.0, 0.0], "mod")
    assert vertex.mixture == [(str(sweep / "w-1.00-0.00"), pytest.approx(1.0))] and vertex.soup is None
    assert front.generate(PROMPTS, [1.0, 0.0], "mod", **GREEDY) == front.generate(
        PROMPTS, [1.0, 0.0], "nearest", **GREEDY
    )
    mixed = front.candidate([0.6, 0.4], "mod")
    assert [w for _, w in mixed.mixture] == pytest.approx([0.5, 0.5])
    assert mixed.adapters() == [str(sweep / "w-1.00-0.00"), str(sweep / "w-0.20-0.80")]
    assert len(front.generate(PROMPTS, [0.6, 0.4], "mod", **GREEDY)) == len(PROMPTS)


def test_requests_are_checked_before_the_model_loads(sweep, no_model):
    front = ParetoSet(sweep)
    with pytest.raises(ValueError, match=r"weights=\[0.5\] must be a list of 2 numbers, one per objective"):
        front.generate(PROMPTS, [0.5])
    with pytest.raises(ValueError, match=r"weights=\[0.5, 0.6\] sums to 1.1, not 1"):
        front.generate(PROMPTS, [0.5, 0.6])
    with pytest.raises(ValueError, match="contains a negative value"):
        front.generate(PROMPTS, [1.5, -0.5])
    with pytest.raises(ValueError, match=r"strategy='best' is not valid; valid: \['nearest', 'soup', 'mod'"):
        front.generate(PROMPTS, [0.5, 0.5], "best")
    with pytest.raises(
        ValueError, match=r"strategy='conditioned' cannot serve the modpo run .*one adapter per"
    ):
        front.generate(PROMPTS, [0.5, 0.5], "conditioned")
    with pytest.raises(
        ValueError, match=r"weights=\[0.1, 0.9\] lie outside .*w-1.00-0.00, w-0.20-0.80.*nearest"
    ):
        front.generate(PROMPTS, [0.1, 0.9], "mod")
    with pytest.raises(ValueError, match=r"unknown sampling settings \['top_k'\]"):
        front.generate(PROMPTS, [0.5, 0.5], top_k=3)
    with pytest.raises(ValueError, match="temperature=0.0 must be > 0"):
        front.generate(PROMPTS, [0.5, 0.5], temperature=0.0)
    with pytest.raises(ValueError, match="prompts must be a list of prompts"):
        front.generate("why", [0.5, 0.5])
    with pytest.raises(ValueError, match="prompts must be a list of prompts"):
        front.generate([{"role": "user", "content": "why"}], [0.5, 0.5])  # one conversation, not in a list
    with pytest.raises(RecipeError, match="does not exist"):
        ParetoSet(sweep / "missing")


def test_one_adapter_serves_nearest_only(sweep, no_model):
    manifest = json.loads((sweep / "manifest.json").read_text())
    for tag in ("w-1.00-0.00", "w-0.20-0.80"):
        manifest["runs"][tag]["status"] = "failed"
    (sweep / "manifest.json").write_text(json.dumps(manifest))
    front = ParetoSet(sweep)
    assert front.strategies == ["nearest"] and front.candidate([1.0, 0.0]).label == "w-0.50-0.50"
    with pytest.raises(ValueError, match=r"strategy='soup' cannot serve .*needs one finished weighting per"):
        front.candidate([0.5, 0.5], "soup")


def conditioned_run(sweep, method: str, recipe_changes: dict):
    """The sweep turned into a finished conditioned run whose one adapter is w-0.50-0.50's."""
    shutil.copytree(sweep / "w-0.50-0.50", sweep / method)
    recipe = load_recipe(
        sweep / "recipe.yaml", [f"method={method}", *(f"{k}={v}" for k, v in recipe_changes.items())]
    )
    manifest = json.loads((sweep / "manifest.json").read_text())
    manifest["method"] = method
    manifest["runs"] = {method: {**manifest["runs"]["w-0.50-0.50"], "tag": method, "adapter": method}}
    (sweep / "manifest.json").write_text(json.dumps(manifest))
    return recipe


def test_moc_is_served_conditioned_on_any_w(sweep, monkeypatch):
    recipe = conditioned_run(sweep, "moc", {})
    front = ParetoSet(recipe)
    assert front.strategies == ["conditioned"]
    candidate = front.candidate([0.3, 0.7])
    assert candidate.adapter == str(sweep / "moc") and candidate.preference == [0.3, 0.7]
    assert candidate.prompt_fn(PROMPTS[0]) == condition_prompt(PROMPTS[0], [0.3, 0.7], ["length", "positive"])
    seen = []
    original = TransformersGenerator.generate

    def spy(self, prompts, **kwargs):
        seen.append((prompts, kwargs["adapter"]))
        return original(self, prompts, **kwargs)

    monkeypatch.setattr(TransformersGenerator, "generate", spy)
    answers = front.generate(PROMPTS, [0.3, 0.7], **GREEDY)
    conditioned = [condition_prompt(p, [0.3, 0.7], ["length", "positive"]) for p in PROMPTS]
    assert seen == [(conditioned, str(sweep / "moc"))]  # the preference is stated as in training
    assert answers == original(
        front.generator, conditioned, adapter=str(sweep / "moc"), settings=front.sampling(**GREEDY)
    )
    with pytest.raises(
        ValueError, match=r"strategy='mod' cannot serve the moc run .*conditions one model on w"
    ):
        front.candidate([0.3, 0.7], "mod")


def test_dpa_takes_a_direction(sweep, no_model):
    recipe = conditioned_run(
        sweep,
        "dpa",
        {"objectives.0.reward": "{type: function, function: 'tests.evaluation.test_pipeline:n_words'}"},
    )
    front = ParetoSet(recipe)
    candidate = front.candidate([3.0, -1.0])  # any non-zero vector: normalised, negative entries allowed
    v = [3 / 10**0.5, -1 / 10**0.5]
    assert candidate.preference == pytest.approx(v)
    assert candidate.prompt_fn(PROMPTS[0])[0]["content"] == render_direction(v, ["length", "positive"])
    assert front.candidate(list(direction(-15))).label == "t-15"
    with pytest.raises(ValueError, match="the zero vector"):
        front.candidate([0.0, 0.0])
