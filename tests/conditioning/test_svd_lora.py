"""Preference-gated LoRA (Panacea-style SVD-LoRA): the gate against a hand-built plain LoRA, per-row preferences,
vertices, save / load / fixed-preference export, and clear errors."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from modpo_trl.conditioning.svd_lora import (
    LAYOUT_FILE,
    PreferenceLoRA,
    apply_preference,
    attach,
    fixed_preference_adapter,
    gated_adapters,
    load_preference_adapter,
    preference,
)
from modpo_trl.testing import tiny_causal_lm, tiny_tokenizer

NAMES = ("kind", "safe", "short")
LAYOUT = PreferenceLoRA(NAMES, shared_rank=2, preference_rank=2)  # rank 8: units 0-1 shared, 2-3 kind, ...


@pytest.fixture
def tok():
    return tiny_tokenizer()


def gated_model(tok, seed=0):
    """A tiny LoRA model of LAYOUT's rank with random (non-zero) B, gated by the preference."""
    model = get_peft_model(
        tiny_causal_lm(tok), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    attach(model, LAYOUT)
    return model.eval()


def plain_copy(tok, gated, gates):
    """The same LoRA without hooks, each column of every B multiplied by `gates` by hand."""
    model = get_peft_model(
        tiny_causal_lm(tok), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    state = {k: v * gates if "lora_B" in k else v for k, v in gated.state_dict().items()}
    model.load_state_dict(state)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15, 16]])


def test_gates_scale_each_objectives_units_by_its_weight(tok):
    w = [0.6, 0.3, 0.1]
    expected_gates = torch.tensor([1, 1, 0.6, 0.6, 0.3, 0.3, 0.1, 0.1])
    assert torch.allclose(LAYOUT.gates(torch.tensor(w)), expected_gates)
    model = gated_model(tok)
    with preference(model, w):
        got = logits(model, IDS)
    torch.testing.assert_close(got, logits(plain_copy(tok, model, expected_gates), IDS))
    # a vertex keeps only the shared units and that objective's
    with preference(model, [0, 1, 0]):
        vertex = logits(model, IDS)
    only_safe = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0.0])
    torch.testing.assert_close(vertex, logits(plain_copy(tok, model, only_safe), IDS))
    assert not torch.allclose(got, vertex)


def test_every_row_runs_at_its_own_preference(tok):
    model = gated_model(tok)
    rows = [[0.9, 0.1, 0.0], [0.0, 0.2, 0.8]]
    with preference(model, torch.tensor(rows)):
        batched = logits(model, IDS)
    for i, w in enumerate(rows):
        with preference(model, w):
            torch.testing.assert_close(batched[i], logits(model, IDS[i : i + 1])[0])


def test_a_gated_adapter_refuses_to_run_without_a_valid_preference(tok):
    model = gated_model(tok)
    with pytest.raises(RuntimeError, match=r"conditioned on a preference over \['kind', 'safe', 'short'\]"):
        logits(model, IDS)
    with pytest.raises(ValueError, match=r"the preference has 3 rows but the batch has 2"):
        with preference(model, torch.full((3, 3), 1 / 3)):
            logits(model, IDS)
    with pytest.raises(ValueError, match=r"sums to 1.5"):
        apply_preference(model, [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"must be a list of 3 numbers"):
        apply_preference(model, [0.5, 0.5])
    with pytest.raises(ValueError, match=r"shape \(3,\) or \(batch, 3\)"):
        apply_preference(model, torch.full((1, 1, 3), 1 / 3))
    # the context restores what was there before it: here, nothing
    with preference(model, [1, 0, 0]):
        pass
    with pytest.raises(RuntimeError):
        logits(model, IDS)
    # without the adapter (the reference model), no preference is needed
    with model.disable_adapter():
        logits(model, IDS)


def test_save_load_and_fixed_preference_export(tok, tmp_path):
    model = gated_model(tok)
    model.save_pretrained(tmp_path / "adapter")
    LAYOUT.save(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / LAYOUT_FILE).read_text())["preference_rank"] == 2
    loaded = load_preference_adapter(tiny_causal_lm(tok), tmp_path / "adapter").eval()
    assert gated_adapters(loaded) == {"default": LAYOUT}
    w = [0.2, 0.5, 0.3]
    with preference(model, w):
        expected = logits(model, IDS)
    apply_preference(loaded, w)
    torch.testing.assert_close(logits(loaded, IDS), expected)
    # the plain adapter at w: an ordinary peft folder, no hooks, the same model
    fixed = fixed_preference_adapter(tmp_path / "adapter", w, tmp_path / "fixed")
    assert not (fixed / LAYOUT_FILE).exists()
    plain = PeftModel.from_pretrained(tiny_causal_lm(tok), str(fixed)).eval()
    torch.testing.assert_close(logits(plain, IDS), expected)
    # a second gated adapter on the same model: each is set on its own, by name
    load_preference_adapter(loaded, tmp_path / "adapter", adapter_name="other")
    assert set(gated_adapters(loaded)) == {"default", "other"}
    apply_preference(loaded, [1, 0, 0], adapter_name="other")
    loaded.set_adapter("other")
    torch.testing.assert_close(
        logits(loaded, IDS), logits(plain_copy(tok, model, LAYOUT.gates(torch.tensor([1.0, 0, 0]))), IDS)
    )


def test_layout_errors_name_the_problem(tok, tmp_path):
    assert PreferenceLoRA.for_rank(["a", "b"], 8, 2) == PreferenceLoRA(("a", "b"), 4, 2)
    with pytest.raises(ValueError, match=r"rank r=4 cannot give 3 objectives preference_rank=2 units each"):
        PreferenceLoRA.for_rank(NAMES, 4, 2)
    with pytest.raises(ValueError, match=r"preference_rank=0 must be an integer >= 1"):
        PreferenceLoRA(NAMES, 2, 0)
    with pytest.raises(ValueError, match=r"at least 2 objectives"):
        PreferenceLoRA(("a",), 2, 1)
    model = get_peft_model(tiny_causal_lm(tok), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"has rank 4, but the preference layout needs 8"):
        attach(model, LAYOUT)
    with pytest.raises(ValueError, match=r"no LoRA layers of an adapter named 'missing'"):
        attach(model, PreferenceLoRA(("a", "b"), 2, 1), "missing")
    with pytest.raises(ValueError, match=r"no preference-conditioned adapter"):
        apply_preference(model, [0.5, 0.5])
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(
        ValueError, match=r"has no preference_lora.json: it is not a preference-conditioned adapter"
    ):
        load_preference_adapter(tiny_causal_lm(tok), tmp_path / "plain")
