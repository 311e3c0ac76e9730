"""Where and when margins are scored: ahead (cached) or per batch inside the step, streams, implicit prompts,
rewards that do not apply to a pair, and TRL's keyword reward-function convention."""

from __future__ import annotations

import math

import pytest
import torch

from modpo_trl import ColumnReward, MODPOConfig, MODPOTrainer
from modpo_trl.rewards.scorers import text_of
from modpo_trl.testing import tiny_causal_lm, toy_preference_dataset
from modpo_trl.trainers.margins import CHOSEN_MARGINS, MARGIN_INPUTS, REJECTED_MARGINS

from .test_moc_trainer import make_moc, preference_tokenizer
from .test_moc_trainer import n_words as moc_n_words
from .test_modpo_dropin import build as build_trainer
from .test_modpo_dropin import first_step, margin_data, preference_data

WEIGHTS = [0.6, 0.4]


def words(prompts, responses):
    return [
        float(len(r.split())) if isinstance(r, str) else float(len(r[-1]["content"].split()))
        for r in responses
    ]


def build(tokenizer, tmp_path, data, margins=(words,), weights=WEIGHTS, **fields):
    model = tiny_causal_lm(tokenizer, seed=1)
    margins = list(margins)
    return build_trainer(
        MODPOTrainer,
        MODPOConfig,
        model,
        tokenizer,
        tmp_path,
        data,
        weights=weights,
        margin_rewards=margins,
        **fields,
    )


def step(trainer):
    """Loss and gradients of the first batch (the first rows: sequential sampling, as a stream gives them)."""
    _, loss, grads = first_step(trainer)
    return loss, grads


def assert_same_step(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "bco_pair"])
def test_reference_computed_in_the_step_or_precomputed_give_the_same_step(
    tokenizer, tmp_path, loss_type, lora
):
    """The margin shift applies to reference log-probs TRL precomputed and to those computed in the step."""
    data = toy_preference_dataset(8)
    steps = [
        step(build(tokenizer, tmp_path / str(p), data, lora=lora, precompute=p, loss_type=loss_type))
        for p in (True, False)
    ]
    assert_same_step(*steps)
    without_margin = step(build(tokenizer, tmp_path / "w", data, weights=[1.0], margins=(), lora=lora))
    assert not torch.allclose(steps[0][0], without_margin[0])  # the margin does change the loss


def test_per_batch_scoring_and_streams_give_the_precomputed_step(tokenizer, tmp_path):
    data = toy_preference_dataset(8)
    ahead = build(tokenizer, tmp_path / "a", data)
    per_batch = build(tokenizer, tmp_path / "b", data, margin_scoring="per_batch")
    stream = build(tokenizer, tmp_path / "c", data.to_iterable_dataset())
    assert CHOSEN_MARGINS in ahead.train_dataset.column_names
    assert MARGIN_INPUTS in per_batch.train_dataset.column_names
    assert CHOSEN_MARGINS not in per_batch.train_dataset.column_names
    reference = step(ahead)
    assert_same_step(step(per_batch), reference)
    assert_same_step(step(stream), reference)


def test_per_batch_scores_each_time_a_pair_is_seen_and_caches_nothing(tokenizer, tmp_path):
    calls = []

    def noisy(prompts, responses):
        calls.append(len(responses))
        return [float(len(r)) for r in responses]

    trainer = build(
        tokenizer, tmp_path, toy_preference_dataset(8), margins=(noisy,), margin_scoring="per_batch"
    )
    assert calls == []  # nothing scored ahead
    step(trainer)
    step(trainer)
    assert sum(calls) == 2 * 2 * 4  # chosen and rejected of a batch of 4, in each step
    cache = tmp_path / "score_cache"
    assert not (cache / "margins").exists()


def test_streaming_training_and_evaluation(tokenizer, tmp_path):
    """A stream as train and eval set (also handed to `evaluate`): margins are scored in the steps."""
    trainer = build(
        tokenizer,
        tmp_path,
        toy_preference_dataset(8).to_iterable_dataset(),
        max_steps=2,
        logging_steps=1,
    )
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert any("margin/words" in entry for entry in trainer.state.log_history)
    metrics = trainer.evaluate(toy_preference_dataset(4, seed=2).to_iterable_dataset())
    assert math.isfinite(metrics["eval_loss"]) and "eval_margin/words" in metrics
    metrics = trainer.evaluate({"stream": toy_preference_dataset(4, seed=3).to_iterable_dataset()})
    assert math.isfinite(metrics["eval_stream_loss"])


def test_zscore_needs_the_training_set_scored_ahead(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="margin_normalization='zscore' needs each reward's spread"):
        build(
            tokenizer,
            tmp_path,
            toy_preference_dataset(4).to_iterable_dataset(),
            margin_normalization="zscore",
        )


def test_implicit_prompts_are_extracted_before_margins_are_scored(tokenizer, tmp_path):
    seen = []

    def reply_words(prompts, responses):
        seen.extend(prompts)
        return words(prompts, responses)

    explicit = build(tokenizer, tmp_path / "e", preference_data("conversational"), margins=(reply_words,))
    n = len(seen)
    implicit = build(tokenizer, tmp_path / "i", preference_data("implicit"), margins=(reply_words,))
    assert seen[n:] == seen[:n]  # the same extracted prompts, not whole conversations
    for column in (CHOSEN_MARGINS, REJECTED_MARGINS):
        assert implicit.train_dataset[column] == explicit.train_dataset[column]
    assert_same_step(step(implicit), step(explicit))


def test_a_reward_that_does_not_apply_leaves_the_pair_without_margin(tokenizer, tmp_path):
    """`None` (TRL's "not applicable") for a response: that pair has no margin for that objective, exactly as a
    reward equal on both responses; the logged margin averages the pairs it applies to."""
    data = margin_data().map(lambda r, i: {"applies": i % 2 == 0}, with_indices=True)

    def on_even_rows(prompts, completions, a_c, applies, **kwargs):  # TRL's keyword convention
        return [None if not ok else float(len(c.split())) for c, ok in zip(completions, applies, strict=True)]

    zeroed = data.map(
        lambda r: {
            "z_c": float(len(r["chosen"].split())) if r["applies"] else 0.0,
            "z_r": float(len(r["rejected"].split())) if r["applies"] else 0.0,
        }
    )
    partial = build(tokenizer, tmp_path / "p", zeroed, margins=(on_even_rows,))
    equal = build(tokenizer, tmp_path / "e", zeroed, margins=(ColumnReward("z_c", "z_r"),))
    assert math.isnan(partial.train_dataset[1][CHOSEN_MARGINS][0])
    assert_same_step(step(partial), step(equal))
    logged = partial._metrics["train"]["margin/on_even_rows"][-1]
    applicable = [
        (len(r["chosen"].split()) - len(r["rejected"].split())) for r in data.select(range(0, 4, 2))
    ]
    assert logged == pytest.approx(sum(applicable) / len(applicable))


def grpo_words(prompts, completions, bonus=None, **kwargs):
    """A reward function in TRL's GRPO convention, reading a dataset column."""
    extra = bonus if bonus is not None else [0.0] * len(completions)
    return [float(len(text_of(c).split())) + b for c, b in zip(completions, extra, strict=True)]


def test_trl_reward_functions_as_modpo_margins_with_columns_in_the_cache_key(tokenizer, tmp_path):
    data = toy_preference_dataset(8).map(lambda r, i: {"bonus": float(i)}, with_indices=True)
    trainer = build(tokenizer, tmp_path / "a", data, margins=(grpo_words,))
    expected = [len(c.split()) + i for i, c in enumerate(data["chosen"])]
    assert [m[0] for m in trainer.train_dataset[CHOSEN_MARGINS]] == pytest.approx(expected)
    # Same pairs, another column value: scored again, not read from the cache under the pairs' key.
    other = data.map(lambda r: {"bonus": r["bonus"] + 1.0})
    again = build(tokenizer, tmp_path / "b", other, margins=(grpo_words,))
    assert [m[0] for m in again.train_dataset[CHOSEN_MARGINS]] == pytest.approx([e + 1 for e in expected])


def test_trl_reward_functions_as_moc_margins(tmp_path):
    tok = preference_tokenizer()
    keyword = make_moc(tok, tmp_path / "k", margins={"short": grpo_words}, peft=True)
    positional = make_moc(tok, tmp_path / "p", margins={"short": moc_n_words}, peft=True)
    for column in (CHOSEN_MARGINS, REJECTED_MARGINS):
        assert keyword.train_dataset[column] == positional.train_dataset[column]
