"""benchmarks/serving_cost.py: the smoke run's serving part (schema and consistency, no timing assertions)."""

import math

import pytest
import torch
from transformers import GenerationConfig

import serving_cost
from harness import SIZES, Context
from modpo_trl.generation import hf_generate
from modpo_trl.serving.mod import MODDecoder


def test_smoke_serving_part(smoke):
    serve = smoke[1]["results"]["serve"]
    assert serve["new_tokens"] == 4 and serve["batch"] == 2
    assert set(serve["per_token_s"]) == {"one_adapter", "mod_k1", "mod_k2", "mod_k3"}
    assert all(math.isfinite(s) for s in serve["per_token_s"].values())
    assert serve["ratios"]["mod_k2/one_adapter"] == pytest.approx(
        serve["per_token_s"]["mod_k2"] / serve["per_token_s"]["one_adapter"]
    )
    assert serve["soup_construction_s"] > 0
    target = smoke[1]["targets"]["mod_k2_vs_one_adapter_per_token"]
    assert target["value"] == serve["ratios"]["mod_k2/one_adapter"] and isinstance(target["met"], bool)


def test_the_variants_decode_the_same_tokens(tmp_path):
    """One adapter through `generate` and MOD with K = 1 decode the same `new_tokens` tokens (no stop at an
    end-of-sequence token), so the part compares the same work."""
    ctx = Context(SIZES["smoke"], tmp_path)
    model = serving_cost.lora_model(ctx, 2)
    ids = torch.randint(10, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    config = GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    model.set_adapter("a0")
    with torch.inference_mode():
        expected = hf_generate(model, ids, mask, config)
        assert expected.shape == (2, 10)
        assert torch.equal(MODDecoder(["a0"], [1.0])(model, ids, mask, config), expected)
        assert not torch.equal(MODDecoder(["a1"], [1.0])(model, ids, mask, config), expected)


def test_target_without_results_is_unmeasured():
    assert serving_cost.target_values({}) == {"mod_k2_vs_one_adapter_per_token": None}
