"""Every bad input fails before any model work, with a message naming the field, the value and what is valid."""

import pytest
from datasets import Dataset
from trl import DPOConfig

from modpo_trl import MODPOConfig, MODPOTrainer, RewardModel
from modpo_trl.testing import tiny_causal_lm, tiny_reward_model, toy_preference_dataset

from .test_modpo_trainer import COMMON, n_words


@pytest.mark.parametrize(
    "weights,match",
    [
        (None, "weights is required"),
        ([], "must be a non-empty list"),
        (["a", 1], "must contain only numbers"),
        ([float("nan"), 1.0], "non-finite"),
        ([1.5, -0.5], "negative value"),
        ([0.0, 1.0], r"weights\[0\]=0.0 must be > 0"),
        ([1.0, 1.0], r"sums to 2, not 1; did you mean \[0.5, 0.5\]"),
    ],
)
def test_invalid_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        MODPOConfig(output_dir="x", weights=weights, use_cpu=True)


def test_other_config_errors():
    with pytest.raises(ValueError, match="objective_names has 1 entries"):
        MODPOConfig(output_dir="x", weights=[0.5, 0.5], objective_names=["a"], use_cpu=True)
    with pytest.raises(
        ValueError, match=r"margin_normalization='l2' is not valid; valid: \['none', 'zscore'\]"
    ):
        MODPOConfig(output_dir="x", weights=[1.0], margin_normalization="l2", use_cpu=True)
    with pytest.raises(
        ValueError, match=r"margin_scoring='lazy' is not valid; valid: \['precompute', 'per_batch'\]"
    ):
        MODPOConfig(output_dir="x", margin_scoring="lazy", use_cpu=True)
    with pytest.raises(ValueError, match="margin_normalization='zscore' needs each reward's spread"):
        MODPOConfig(output_dir="x", margin_scoring="per_batch", margin_normalization="zscore", use_cpu=True)


@pytest.mark.parametrize("f_divergence_type", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergences_without_margins_are_dpo_and_with_margins_fail_with_why(f_divergence_type):
    MODPOConfig(output_dir="x", weights=[1.0], f_divergence_type=f_divergence_type, use_cpu=True)
    MODPOConfig(output_dir="x", weights=[1.0, 0.0], f_divergence_type=f_divergence_type, use_cpu=True)
    with pytest.raises(
        ValueError, match=rf"f_divergence_type='{f_divergence_type}' cannot be used with margin"
    ):
        MODPOConfig(output_dir="x", weights=[0.5, 0.5], f_divergence_type=f_divergence_type, use_cpu=True)


def test_sft_alone_fails_only_with_margins():
    MODPOConfig(output_dir="x", weights=[1.0], loss_type="sft", use_cpu=True)
    MODPOConfig(output_dir="x", weights=[0.5, 0.5], loss_type=["sigmoid", "sft"], use_cpu=True)
    with pytest.raises(ValueError, match=r"loss_type=\['sft'\] does not use the implicit rewards"):
        MODPOConfig(output_dir="x", weights=[0.5, 0.5], loss_type="sft", use_cpu=True)


class Exploding:
    """A model stand-in: any use of it would mean the error came too late."""

    def __getattr__(self, name):
        raise AssertionError(f"model touched ({name}) before input validation")


def trainer(tokenizer, weights=(0.5, 0.5), margins=(n_words,), dataset="default", model=None, **kwargs):
    return MODPOTrainer(
        model=model or Exploding(),
        args=MODPOConfig(weights=list(weights), **{**COMMON, **kwargs}),
        train_dataset=toy_preference_dataset(4) if isinstance(dataset, str) else dataset,
        processing_class=tokenizer,
        margin_rewards=list(margins),
    )


def test_weight_length_must_match_margin_rewards(tokenizer):
    with pytest.raises(
        ValueError, match=r"weights=\[0.5, 0.5\] has 2 entries but there are 2 margin_rewards"
    ):
        trainer(tokenizer, margins=(n_words, n_words))


def test_unknown_margin_source_type(tokenizer):
    with pytest.raises(TypeError, match=r"margin_rewards\[0\] has unsupported type str; valid: a callable"):
        trainer(tokenizer, margins=("length",))
    with pytest.raises(TypeError, match=r"margin_rewards\[0\] is a bare LlamaForSequenceClassification"):
        trainer(tokenizer, margins=(tiny_reward_model(tokenizer),))


def test_reward_model_with_several_outputs(tokenizer):
    with pytest.raises(ValueError, match="has 2 outputs"):
        trainer(tokenizer, margins=(RewardModel(tiny_reward_model(tokenizer, num_labels=2), tokenizer),))


def test_non_finite_rewards_name_the_source_and_row(tokenizer):
    """Found while the data is prepared, before training (scoring needs the loaded trainer)."""

    def nan_on_third(prompts, responses):
        return [float("nan") if i == 2 else 0.0 for i in range(len(responses))]

    with pytest.raises(
        ValueError, match=r"'nan_on_third' returned a non-finite score \(nan\) at row 2 \(chosen\)"
    ):
        trainer(tokenizer, margins=(nan_on_third,), model=tiny_causal_lm(tokenizer))


def test_missing_columns_and_empty_dataset(tokenizer):
    no_chosen = toy_preference_dataset(4).remove_columns("chosen")
    with pytest.raises(ValueError, match=r"train_dataset is missing column\(s\) \['chosen'\]"):
        trainer(tokenizer, dataset=no_chosen)
    empty = Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    with pytest.raises(ValueError, match="train_dataset is empty"):
        trainer(tokenizer, dataset=empty)
    with pytest.raises(ValueError, match=r"eval_dataset\['b'\] is empty"):
        MODPOTrainer(
            model=Exploding(),
            args=MODPOConfig(weights=[0.5, 0.5], **COMMON),
            train_dataset=toy_preference_dataset(4),
            eval_dataset={"a": toy_preference_dataset(2), "b": empty},
            processing_class=tokenizer,
            margin_rewards=[n_words],
        )


def test_trl_checks_keep_trl_messages(tokenizer):
    """A missing or wrongly typed train_dataset fails as in DPOTrainer, before the model is touched."""
    with pytest.raises(ValueError, match="^`train_dataset` is required$"):
        trainer(tokenizer, dataset=None)
    with pytest.raises(
        TypeError, match="^`train_dataset` must be a `Dataset` or `IterableDataset`, got `list`.$"
    ):
        trainer(tokenizer, dataset=[{"prompt": "a", "chosen": "b", "rejected": "c"}])


def test_args_must_be_modpo_config(tokenizer):
    with pytest.raises(
        TypeError, match=r"args must be a MODPOConfig \(a DPOConfig with `weights`\), got DPOConfig"
    ):
        MODPOTrainer(
            model=tiny_causal_lm(tokenizer),
            args=DPOConfig(**COMMON),
            train_dataset=toy_preference_dataset(2),
            processing_class=tokenizer,
        )
