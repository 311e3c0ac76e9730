"""`evaluate()` on a dataset passed to it: each trainer's own reference model, and only model inputs reach the model."""

import copy

import pytest
from trl import DPOConfig, DPOTrainer

from modpo_trl import MODPOConfig, MODPOTrainer
from modpo_trl.testing import tiny_causal_lm, toy_preference_dataset

from .test_modpo_trainer import COMMON, n_words


@pytest.mark.parametrize("use_score_cache", [True, False])
def test_evaluate_on_a_new_dataset_uses_this_trainers_reference_model(tokenizer, tmp_path, use_score_cache):
    """Two trainers with different reference models (TRL's default, no precomputed reference log-probs) must each
    evaluate against their own: a reference log-prob cache keyed without the model would hand the second the
    first one's values."""
    policy = tiny_causal_lm(tokenizer, seed=0)
    eval_data = toy_preference_dataset(
        8, seed=3
    )  # one object, as a user evaluating several trainers passes it
    losses = {}
    for ref_seed in (1, 2):
        ref = tiny_causal_lm(tokenizer, seed=ref_seed)
        common = {**COMMON, "output_dir": str(tmp_path / "out")}
        modpo = MODPOTrainer(
            model=copy.deepcopy(policy),
            ref_model=copy.deepcopy(ref),
            args=MODPOConfig(weights=[1.0], use_score_cache=use_score_cache, **common),
            train_dataset=toy_preference_dataset(4),
            processing_class=tokenizer,
        )
        dpo = DPOTrainer(
            model=copy.deepcopy(policy),
            ref_model=copy.deepcopy(ref),
            args=DPOConfig(**common),
            train_dataset=toy_preference_dataset(4),
            processing_class=tokenizer,
        )
        losses[ref_seed] = (modpo.evaluate(eval_data)["eval_loss"], dpo.evaluate(eval_data)["eval_loss"])
    assert losses[1][1] != pytest.approx(losses[2][1], abs=1e-3)  # the reference models do differ
    for ours, trl in losses.values():
        assert ours == pytest.approx(trl, abs=1e-6)


def strict_backbone(model):
    """Makes `model`'s backbone reject keyword arguments a plain transformer does not take (as a model without
    `**kwargs` in its forward would)."""
    inner = model.model.forward
    allowed = {"input_ids", "attention_mask", "position_ids", "use_cache", "past_key_values", "inputs_embeds"}

    def forward(*args, **kwargs):
        unexpected = sorted(set(kwargs) - allowed)
        if unexpected:
            raise TypeError(f"forward() got unexpected keyword arguments {unexpected}")
        return inner(*args, **kwargs)

    model.model.forward = forward
    return model


@pytest.mark.parametrize("precompute", [False, True])
def test_evaluate_passes_no_margin_columns_to_the_model(tokenizer, tmp_path, precompute):
    model = strict_backbone(tiny_causal_lm(tokenizer))
    trainer = MODPOTrainer(
        model=model,
        ref_model=None if precompute else strict_backbone(tiny_causal_lm(tokenizer)),
        args=MODPOConfig(
            weights=[0.6, 0.4],
            precompute_ref_log_probs=precompute,
            **{**COMMON, "output_dir": str(tmp_path / "out")},
        ),
        train_dataset=toy_preference_dataset(4),
        processing_class=tokenizer,
        margin_rewards=[n_words],
    )
    metrics = trainer.evaluate(toy_preference_dataset(4, seed=5))
    assert "eval_margin/n_words" in metrics
