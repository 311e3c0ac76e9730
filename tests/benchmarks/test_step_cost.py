"""benchmarks/step_cost.py: every variant measured at the smoke size, and the on-the-fly variant's decoding."""

import math

import torch

import step_cost
from harness import SIZES


def finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def test_smoke_step_cost_has_every_variant_and_finite_ratios(smoke):
    step = smoke[1]["results"]["step"]
    assert (
        set(step["variants"])
        == set(step_cost.VARIANTS)
        == {"dpo", "modpo", "modpo_on_the_fly", "moc_linear", "moc_mgda"}
    )
    spec = SIZES["smoke"]
    for result in step["variants"].values():
        # One measured step per repetition: the first step of each repetition is the warm-up.
        assert result["measured_steps"] == spec.reps * (spec.steps_per_rep - 1)
        assert result["median_interval_s"] > 0 and result["tokens_per_s"] > 0
        assert result["memory"]["peak_bytes"] >= result["memory"]["before_training_bytes"] > 0
    for name in ("modpo/dpo", "on_the_fly/modpo", "moc_mgda/moc_linear"):
        for key in ("interval_time", "step_time", "peak_memory"):
            assert finite(step["ratios"][name][key]), (name, key)
    modpo, dpo = step["variants"]["modpo"], step["variants"]["dpo"]
    assert (
        step["ratios"]["modpo/dpo"]["interval_time"] == modpo["median_interval_s"] / dpo["median_interval_s"]
    )


def test_decode_pairs_splits_prompt_and_response(tokenizer):
    prompt = tokenizer("the cat sat", add_special_tokens=False)["input_ids"]
    response = tokenizer("on the mat </s>", add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id
    ids = torch.tensor([prompt + response, prompt + response[:1] + [pad] * 3])
    inputs = {
        "input_ids": ids,
        "attention_mask": (ids != pad).long(),
        "completion_mask": torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0, 0]]),
    }
    prompts, responses = step_cost.decode_pairs(tokenizer, inputs)
    assert prompts == ["the cat sat", "the cat sat"]
    assert responses == ["on the mat", "on"]
