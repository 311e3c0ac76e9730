import copy
import os
import re
import socket
import subprocess
import sys

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
    assert cache.load("k", "x", ["a"], 3) is None
    cache.save("k", "x", {"a": np.arange(3)})
    np.testing.assert_array_equal(cache.load("k", "x", ["a"], 3)["a"], np.arange(3))
    assert [p.name for p in (tmp_path / "k").iterdir()] == ["x.npz"]  # no temp file left behind


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the first array's data: its CRC-32 no longer matches
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "unreadable"),
    "garbage": (lambda p: p.write_bytes(b"not a zip file at all" * 10), "unreadable"),
    "empty": (lambda p: p.write_bytes(b""), "unreadable"),
    "flipped byte": (_flip_a_byte, "unreadable"),
    "wrong length": (lambda p: np.savez(p, a=np.zeros(5), b=np.zeros(4)), "of the wrong length"),
    "missing array": (lambda p: np.savez(p, a=np.zeros(4)), "missing the array 'b'"),
    "NaN": (lambda p: np.savez(p, a=np.array([0, np.nan, 0, 0]), b=np.zeros(4)), "holding non-finite"),
    "text": (lambda p: np.savez(p, a=np.array(list("abcd")), b=np.zeros(4)), "not numeric"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_bad_cache_entry_is_removed_with_a_warning_naming_it(tmp_path, corruption):
    damage, problem = CORRUPTIONS[corruption]
    cache = ScoreCache(tmp_path)
    path = cache.save("k", "x", {"a": np.arange(4.0) * 1e6, "b": np.ones(4)})
    damage(path)
    with pytest.warns(
        UserWarning, match=f"score cache entry {re.escape(str(path))} is {problem}.*computed again"
    ):
        assert cache.load("k", "x", ["a", "b"], 4) is None
    assert not path.exists()
    cache.save("k", "x", {"a": np.zeros(4), "b": np.ones(4)})  # recomputed
    assert cache.load("k", "x", ["a", "b"], 4)["b"].tolist() == [1, 1, 1, 1]


def test_nan_is_read_where_it_means_not_applicable_but_infinity_never(tmp_path):
    cache = ScoreCache(tmp_path)
    cache.save("margins", "x", {"chosen": np.array([1.0, np.nan]), "rejected": np.zeros(2)})
    assert np.isnan(cache.load("margins", "x", ["chosen", "rejected"], 2, allow_nan=True)["chosen"][1])
    cache.save("margins", "x", {"chosen": np.array([1.0, np.inf]), "rejected": np.zeros(2)})
    with pytest.warns(UserWarning, match="non-finite"):
        assert cache.load("margins", "x", ["chosen", "rejected"], 2, allow_nan=True) is None


def test_temporaries_of_dead_processes_are_removed(tmp_path):
    """What a killed write leaves (`.<key>.npz.<pid>@<host>.<hex>.tmp`) goes at the next save; a live process's
    temporary and another machine's recent one stay."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = socket.gethostname()
    folder = tmp_path / "k"
    folder.mkdir()
    names = {
        "dead": f".a.npz.{int(dead.stdout)}@{host}.0123abcd.tmp",
        "dead, old name": f".manifest.json.{int(dead.stdout)}.89abcdef.tmp",
        "alive": f".b.npz.{os.getpid()}@{host}.0123abcd.tmp",
        "other machine": f".c.npz.{int(dead.stdout)}@elsewhere.0123abcd.tmp",
    }
    for name in names.values():
        (folder / name).write_bytes(b"half")
    ScoreCache(tmp_path).save("k", "x", {"a": np.zeros(1)})
    left = {p.name for p in folder.iterdir()}
    assert left == {"x.npz", names["alive"], names["other machine"]}


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
