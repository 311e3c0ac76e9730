import copy

import numpy as np
import pytest
from trl import DPOTrainer

from modpo_trl import FunctionReward, MODPOConfig, MODPOTrainer, RewardModel
from modpo_trl.rewards.cache import ScoreCache, content_fingerprint, default_cache_dir
from modpo_trl.rewards.sources import tokenizer_fingerprint
from modpo_trl.testing import tiny_causal_lm, tiny_reward_model, toy_preference_dataset

from ..trainers.test_modpo_trainer import COMMON


def n_chars(prompts, responses):
    return [float(len(r)) for r in responses]


class Counting(FunctionReward):
    """A rule-based reward that counts how many responses it scored."""

    def __init__(self, fn=n_chars, name="len"):
        super().__init__(fn, name)
        self.calls = 0

    def score(self, prompts, responses):
        self.calls += len(responses)
        return super().score(prompts, responses)


def build(tokenizer, tmp_path, margin, dataset, model=None, **kwargs):
    model = model or tiny_causal_lm(tokenizer)
    return MODPOTrainer(
        model=model,
        ref_model=None if kwargs.get("precompute_ref_log_probs") else copy.deepcopy(model),
        args=MODPOConfig(weights=[0.5, 0.5], **{**COMMON, "output_dir": str(tmp_path / "o")}, **kwargs),
        train_dataset=dataset,
        processing_class=tokenizer,
        margin_rewards=[margin],
    )


def test_cached_and_uncached_margins_agree_and_second_run_scores_nothing(tokenizer, tmp_path):
    data = toy_preference_dataset(12)
    source = fn = Counting()
    first = build(tokenizer, tmp_path, source, data)
    assert fn.calls == 24  # chosen + rejected of 12 rows
    second = build(tokenizer, tmp_path, source, data)
    assert fn.calls == 24  # read from the cache
    uncached = build(tokenizer, tmp_path, source, data, use_score_cache=False)
    assert fn.calls == 48
    for trainer in (second, uncached):
        for column in ("chosen_margin_rewards", "rejected_margin_rewards"):
            np.testing.assert_allclose(trainer.train_dataset[column], first.train_dataset[column])


def test_changed_data_or_reward_source_invalidates_the_cache(tokenizer, tmp_path):
    source = fn = Counting()
    build(tokenizer, tmp_path, source, toy_preference_dataset(12))
    build(tokenizer, tmp_path, source, toy_preference_dataset(12, seed=1))  # other data
    assert fn.calls == 48

    # Another function body (same name) is another reward.
    other = Counting(lambda p, r: [0.0] * len(r))
    assert other.fingerprint() != source.fingerprint()
    trainer = build(tokenizer, tmp_path, other, toy_preference_dataset(12))
    assert trainer.train_dataset["chosen_margin_rewards"][0] == [0.0]


def test_reward_model_fingerprint_follows_weights_and_max_length(tokenizer):
    rm = tiny_reward_model(tokenizer)
    a = RewardModel(rm, tokenizer).fingerprint()
    assert a == RewardModel(copy.deepcopy(rm), tokenizer).fingerprint()
    assert a != RewardModel(rm, tokenizer, max_length=16).fingerprint()
    changed = copy.deepcopy(rm)
    changed.score.weight.data += 1.0
    assert a != RewardModel(changed, tokenizer).fingerprint()


def test_tokenizer_fingerprint_ignores_truncation_state_but_not_the_vocabulary(tokenizer):
    """A tokenizer shared with the policy's trainer must not change its key by being used in between."""
    before = tokenizer_fingerprint(tokenizer)
    tokenizer(["a b c d e f"], truncation=True, max_length=3, padding="max_length")
    assert tokenizer_fingerprint(tokenizer) == before
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["brand_new_token"])
    assert tokenizer_fingerprint(other) != before


def test_reference_logps_are_cached_across_trainers(tokenizer, tmp_path, monkeypatch):
    calls = []
    original = DPOTrainer._precompute_ref_logps

    def counting(self, dataset, name, batch_size):
        calls.append(name)
        return original(self, dataset, name, batch_size)

    monkeypatch.setattr(DPOTrainer, "_precompute_ref_logps", counting)
    data = toy_preference_dataset(12)
    first = build(tokenizer, tmp_path, Counting(), data, precompute_ref_log_probs=True)
    second = build(tokenizer, tmp_path, Counting(), data, precompute_ref_log_probs=True)
    assert calls == ["train"]
    np.testing.assert_allclose(
        second.train_dataset["ref_chosen_logps"], first.train_dataset["ref_chosen_logps"]
    )
    build(tokenizer, tmp_path, Counting(), toy_preference_dataset(12, seed=3), precompute_ref_log_probs=True)
    assert calls == ["train", "train"]


def test_content_fingerprint_ignores_how_the_dataset_was_built():
    a = toy_preference_dataset(5)
    b = toy_preference_dataset(5).map(lambda ex: ex)  # same values, other datasets fingerprint
    assert content_fingerprint(a, ["prompt", "chosen"]) == content_fingerprint(b, ["prompt", "chosen"])
    assert content_fingerprint(a, ["prompt"]) != content_fingerprint(
        toy_preference_dataset(5, seed=9), ["prompt"]
    )


def test_score_cache_writes_atomically(tmp_path):
    cache = ScoreCache(tmp_path)
    assert cache.load("k", "x") is None
    cache.save("k", "x", {"a": np.arange(3)})
    np.testing.assert_array_equal(cache.load("k", "x")["a"], np.arange(3))
    assert [p.name for p in (tmp_path / "k").iterdir()] == ["x.npz"]  # no temp file left behind


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MODPO_TRL_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_cached_scores_never_written(tokenizer, tmp_path, bad):
    def broken(prompts, responses):
        return [bad] * len(responses)

    with pytest.raises(ValueError, match="reward source 'broken' returned a non-finite score"):
        build(tokenizer, tmp_path, broken, toy_preference_dataset(4))
    assert not list((tmp_path / "score_cache").rglob("*.npz"))


def test_column_rewards_are_read_fresh_not_from_the_cache(tokenizer, tmp_path):
    """Same texts, other precomputed scores: the margins must follow the columns."""
    from modpo_trl import ColumnReward

    data = toy_preference_dataset(4)
    first = build(tokenizer, tmp_path, ColumnReward("c", "r"), data.map(lambda ex: {"c": 1.0, "r": 0.0}))
    second = build(tokenizer, tmp_path, ColumnReward("c", "r"), data.map(lambda ex: {"c": 5.0, "r": 0.0}))
    assert first.train_dataset["chosen_margin_rewards"][0] == [1.0]
    assert second.train_dataset["chosen_margin_rewards"][0] == [5.0]
