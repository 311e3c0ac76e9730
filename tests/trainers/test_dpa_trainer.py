"""DPATrainer: best and worst under v . r on the stated scale, the SFT and DPO data it builds, the iterated loop
(SFT and directional DPO) and its resumption, reward vectors (rule-based and a trained multi-output regressor),
bad input."""

import json
import math
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import TrainerCallback

from modpo_trl.conditioning.directions import angle_of, direction, direction_weights, render_direction
from modpo_trl.rewards.sources import RewardModel
from modpo_trl.rewards.vector import MultiObjectiveReward, StackedReward
from modpo_trl.storage import read_jsonl
from modpo_trl.testing import WORDS, tiny_causal_lm, tiny_reward_model, tiny_tokenizer
from modpo_trl.trainers.dpa_config import DPAConfig
from modpo_trl.trainers.dpa_trainer import (
    DPATrainer,
    dpo_dataset,
    on_stated_scale,
    select_pairs,
    sft_dataset,
    stated_scale,
)

REPO = Path(__file__).resolve().parents[2]
NAMES = ["brevity", "cats"]
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
TRAINING = dict(
    report_to="none",
    use_cpu=True,
    bf16=False,
    gradient_checkpointing=False,
    save_strategy="no",
    logging_steps=1,
    learning_rate=1e-2,
    per_device_train_batch_size=4,
    num_train_epochs=1,
)


def word_count(prompts, responses) -> list[float]:
    return [float(len(_text(r).split())) for r in responses]


def cat_count(prompts, responses) -> list[float]:
    """Rule-based 'cats' attribute (importable by recipes as tests.trainers.test_dpa_trainer:cat_count)."""
    return [float(_text(r).split().count("cat")) for r in responses]


def _text(response) -> str:
    return response if isinstance(response, str) else response[-1]["content"]


class Counted:
    """A rule-based scorer that counts the responses it scored."""

    def __init__(self, fn):
        self.fn, self.scored = fn, 0
        self.__name__ = fn.__name__

    def __call__(self, prompts, responses):
        self.scored += len(responses)
        return self.fn(prompts, responses)


def prompts(n: int = 4, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [[{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(4))}] for _ in range(n)]


def config(tmp_path, **kwargs) -> DPAConfig:
    values = dict(
        output_dir=str(tmp_path / "dpa"),
        num_samples=2,
        iterations=2,
        max_new_tokens=4,
        temperature=1.0,
        generation_batch_size=2,
        angle_step_degrees=15,
        heldout_angles=[-30],
        seed=0,
        **TRAINING,
    )
    return DPAConfig(**{**values, **kwargs})


def make_trainer(tmp_path, tokenizer, reward, callbacks=None, **kwargs) -> DPATrainer:
    return DPATrainer(
        tiny_causal_lm(tokenizer, seed=0),
        config(tmp_path, **kwargs),
        prompts(),
        tokenizer,
        reward=reward,
        peft_config=LoraConfig(**LORA),
        callbacks=callbacks,
    )


class Logs(TrainerCallback):
    """Every log line of every iteration's trainer, in order."""

    def __init__(self):
        self.lines = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.lines.append(dict(logs or {}))


def stated_weights(row) -> list[int]:
    """The integer weights the row's system prompt states, read back from its text."""
    system = row["conditioned_prompt"][0]["content"]
    return [int(w) for w in re.findall(r"\*(-?\d+)", system.split("weighted rating =")[1])]


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


# ------------------------------------------------------------------------------------------------ selection
def test_select_pairs_best_and_worst_of_w_dot_r_first_on_ties():
    # 2 rows x 3 candidates x 2 attributes.
    scores = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 1.0], [0.8, 0.8]],
            [[1.0, 0.0], [0.0, 1.0], [0.8, 0.8]],
        ]
    )
    weighted, best, worst = select_pairs(scores, torch.tensor([[1.0, 0.0], [0.6, -0.8]]))
    # row 0, w = (1, 0): 1.0, 0.0, 0.8 -> best 0, worst 1.
    # row 1, w = (0.6, -0.8): 0.6, -0.8, 0.48 - 0.64 = -0.16 -> best 0, worst 1.
    assert torch.allclose(weighted, torch.tensor([[1.0, 0.0, 0.8], [0.6, -0.8, -0.16]], dtype=torch.float64))
    assert best.tolist() == [0, 0] and worst.tolist() == [1, 1]
    # w = (0, 1): 0, 1, 0.8 -> best 1, worst 0; w = (0.6, 0.8): 0.6, 0.8, 1.12 -> best 2, worst 0: the direction,
    # not one attribute, decides.
    _, best, worst = select_pairs(scores, torch.tensor([[0.0, 1.0], [0.6, 0.8]]))
    assert best.tolist() == [1, 2] and worst.tolist() == [0, 0]

    # Ties: the first best and the first worst; all tied -> best == worst (no pair).
    tied = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [2.0, 0.0], [0.0, 0.0]], [[1.0, 1.0]] * 4])
    weighted, best, worst = select_pairs(tied, torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
    assert best.tolist() == [0, 0] and worst.tolist() == [1, 0]
    assert weighted[1].tolist() == [1.0] * 4


def test_minmax_scale_by_hand():
    raw = torch.tensor([[0.2, 0.5, 3.0], [0.4, 0.9, 3.0], [0.3, 0.7, 3.0], [0.2, 0.5, 3.0]])
    scale = stated_scale(raw, "minmax")
    np.testing.assert_allclose(scale, [[0.2, 0.4], [0.5, 0.9], [3.0, 3.0]], rtol=1e-6)
    scaled = on_stated_scale(raw, scale)
    # relevance 0.2 -> 0, 0.4 -> 100, 0.3 -> 50; brevity the same over [0.5, 0.9]; a constant attribute -> 0.
    np.testing.assert_allclose(scaled, [[0, 0, 0], [100, 100, 0], [50, 50, 0], [0, 0, 0]], atol=1e-4)
    assert stated_scale(raw, "raw") is None
    assert torch.equal(on_stated_scale(raw, None), raw.double())


def test_the_stated_weights_decide_on_the_minmax_scale_not_the_units():
    # Relevance varies over 0.2, brevity over 0.7 (the quickstart's units: cosine vs share of 100 words).
    raw = torch.tensor([[0.70, 0.50], [0.80, 0.30], [0.60, 1.00]])
    w = (
        torch.tensor([direction_weights(direction(30))], dtype=torch.float64) / 100
    )  # relevance*87 + brevity*50
    assert w.tolist() == [[0.87, 0.5]]
    # Raw units: 0.609 + 0.25, 0.696 + 0.15, 0.522 + 0.5 -> the briefest answer (2) wins although the prompt
    # weighs relevance higher.
    _, best, _ = select_pairs(raw[None], w)
    assert best.tolist() == [2]
    # 0-100 over the observed ranges: (50, 28.6), (100, 0), (0, 100) -> 57.8, 87, 50: the most relevant (1).
    weighted, best, worst = select_pairs(on_stated_scale(raw, stated_scale(raw, "minmax"))[None], w)
    assert weighted[0].tolist() == pytest.approx([0.87 * 50 + 0.5 * 100 * 0.2 / 0.7, 87.0, 50.0])
    assert best.tolist() == [1] and worst.tolist() == [2]


def test_sft_data_carries_the_rendered_direction():
    v = direction(-15)
    conditioned = [
        {"role": "system", "content": render_direction(v, NAMES)},
        {"role": "user", "content": "tell me a story"},
    ]
    data = sft_dataset(
        [{"conditioned_prompt": conditioned, "candidates": ["the cat", "a dog ran"], "chosen": 1}]
    )
    assert data[0]["prompt"] == conditioned
    assert data[0]["completion"] == [{"role": "assistant", "content": "a dog ran"}]
    # Standard format: TRL joins prompt + completion, so the completion starts with a space when needed.
    rows = [
        {"conditioned_prompt": "weighted rating\n\nhello", "candidates": ["cat sat", " dog"], "chosen": 0},
        {"conditioned_prompt": "hello ", "candidates": ["cat sat"], "chosen": 0},
        {"conditioned_prompt": "hello", "candidates": ["cat", " dog"], "chosen": 1},
    ]
    assert sft_dataset(rows)["completion"] == [" cat sat", "cat sat", " dog"]


def test_dpo_data_is_best_against_worst_where_the_gap_is_large_enough():
    conditioned = [{"role": "system", "content": "w"}, {"role": "user", "content": "hi"}]
    rows = [
        {
            "conditioned_prompt": conditioned,
            "candidates": ["a", "b", "c"],
            "chosen": 2,
            "rejected": 0,
            "gap": 30.0,
        },
        {"conditioned_prompt": conditioned, "candidates": ["x", "y"], "chosen": 1, "rejected": 0, "gap": 5.0},
        {"conditioned_prompt": conditioned, "candidates": ["z", "z"], "chosen": 0, "rejected": 0, "gap": 0.0},
    ]
    data = dpo_dataset(rows)
    assert len(data) == 2  # the all-tied row has no pair
    assert data[0] == {
        "prompt": conditioned,
        "chosen": [{"role": "assistant", "content": "c"}],
        "rejected": [{"role": "assistant", "content": "a"}],
    }
    assert dpo_dataset(rows, min_gap=10)["chosen"] == [[{"role": "assistant", "content": "c"}]]
    assert len(dpo_dataset(rows, min_gap=30)) == 1  # the gap is inclusive
    with pytest.raises(
        ValueError, match=r"no DPO pair: min_pair_gap=31 but the largest gap .* is 30 \(over 3"
    ):
        dpo_dataset(rows, min_gap=31)
    # Standard format: completions start with a space when the prompt does not end with one.
    plain = dpo_dataset(
        [{"conditioned_prompt": "hello", "candidates": ["x", " y"], "chosen": 1, "rejected": 0, "gap": 5.0}]
    )
    assert (plain[0]["chosen"], plain[0]["rejected"]) == (" y", " x")


# ------------------------------------------------------------------------------------------- reward vectors
def test_multi_objective_reward_scores_named_outputs_in_one_pass(tokenizer):
    rm = tiny_reward_model(tokenizer, num_labels=3)
    rm.config.id2label = {0: "help", 1: "safe", 2: "short"}
    reward = MultiObjectiveReward(rm, tokenizer, attributes=["short", "help"])
    p, r = ["hello there", "tell me"], ["the cat sat", "no"]
    got = reward.score(p, r)
    assert got.shape == (2, 2)
    short = RewardModel(rm, tokenizer, output="short").score(p, r)
    help_ = RewardModel(rm, tokenizer, output="help").score(p, r)
    assert torch.allclose(got, torch.stack([short, help_], dim=1), atol=1e-6)
    with pytest.raises(ValueError, match=r"no output\(s\) \['kind'\].*\['help', 'safe', 'short'\]"):
        MultiObjectiveReward(rm, tokenizer, attributes=["help", "kind"])


def test_stacked_reward_scores_one_column_per_attribute():
    reward = StackedReward([word_count, cat_count], NAMES)
    got = reward.score(["p", "p"], ["the cat cat", "a dog"])
    assert got.tolist() == [[3.0, 2.0], [2.0, 0.0]]
    with pytest.raises(ValueError, match="reward has 1 sources but attribute_names=.*has 2"):
        StackedReward([word_count], NAMES)
    with pytest.raises(TypeError, match=r"reward\[1\] \(cats\) has unsupported type int"):
        StackedReward([word_count, 3], NAMES)


@pytest.fixture
def trained_rm(tmp_path):
    """A tiny 2-output regression reward model trained with modpo_trl.reward_modeling (attributes good, length)."""
    from modpo_trl.rewards.modeling import train_reward_model

    tok = tiny_tokenizer(chat_template=False)
    base = tmp_path / "rm-base"
    tiny_reward_model(tok, seed=0, num_labels=1).save_pretrained(base)
    tok.save_pretrained(base)
    rng = random.Random(0)
    rows = []
    for _ in range(32):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 6))]
        rows.append(
            {
                "prompt": "hello",
                "response": " " + " ".join(words),
                "good": words.count("good"),
                "length": len(words),
            }
        )
    data = tmp_path / "rated.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rm"
    train_reward_model(
        str(base), str(data), ["good", "length"], str(out), epochs=1, batch_size=16, eval_fraction=0
    )
    return out


def test_trained_multi_output_regressor_as_dpa_reward(trained_rm, tmp_path, tokenizer):
    reward = MultiObjectiveReward(str(trained_rm), attributes=["length", "good"])
    p, r = prompts(3), [" the cat", " good good dog", " red"]
    got = reward.score(p, r)
    one_by_one = [RewardModel(str(trained_rm), output=a).score(p, r) for a in ("length", "good")]
    assert torch.allclose(got, torch.stack(one_by_one, dim=1), atol=1e-5)

    # An attribute the reward model lacks fails in the constructor, from config.json alone, before generating.
    missing = MultiObjectiveReward(str(trained_rm), attributes=["good", "brevity"])
    with pytest.raises(ValueError, match=r"no output\(s\) \['brevity'\].*labels.*\['good', 'length'\]"):
        make_trainer(tmp_path, tokenizer, missing)
    assert missing._model is None and not (tmp_path / "dpa").exists()


# --------------------------------------------------------------------------------------------------- the loop
def check_rows(rows, directions_per_prompt: int = 1, shared: bool = False):
    """Each row's scores are the rule-based attributes of its candidates, its weighted scores the weights its
    system prompt states applied to the scores mapped to 0-100 over the whole iteration, chosen / rejected their
    first argmax / argmin."""
    all_scores = np.array([s for r in rows for s in r["scores"]])
    lo, hi = all_scores.min(axis=0), all_scores.max(axis=0)
    for row in rows:
        v, scores = np.array(row["direction"]), np.array(row["scores"])
        assert round(angle_of(v), 6) == row["angle"]
        assert row["weights"] == stated_weights(row) == direction_weights(v)
        assert scores.tolist() == [[len(t.split()), t.split().count("cat")] for t in row["candidates"]]
        np.testing.assert_allclose(row["scale"], np.stack([lo, hi], axis=1))
        span = np.where(hi > lo, hi - lo, 1.0)
        expected = (np.where(hi > lo, 100 * (scores - lo) / span, 0.0) @ np.array(row["weights"])) / 100
        assert row["weighted_scores"] == pytest.approx(expected.tolist())
        assert row["chosen"] == int(np.argmax(expected)) and row["rejected"] == int(np.argmin(expected))
        assert row["gap"] == pytest.approx(expected.max() - expected.min())
        assert row["conditioned_prompt"] == [
            {"role": "system", "content": render_direction(v, NAMES)},
            *row["prompt"],
        ]
        own = [row["weights"]] * (len(row["candidates"]) // (directions_per_prompt if shared else 1))
        if not shared:
            assert row["sampled_under"] == own


def test_two_iterations_then_resume_only_the_missing_work(tmp_path, tokenizer):
    brevity, cats = Counted(word_count), Counted(cat_count)
    trainer = make_trainer(tmp_path, tokenizer, [brevity, cats], attribute_names=NAMES, update="sft")
    result = trainer.train()
    out = tmp_path / "dpa"
    assert result["adapter"] == str(out / "iter-2" / "adapter")
    assert [s["iteration"] for s in result["iterations"]] == [1, 2]
    assert brevity.scored == cats.scored == 2 * 4 * 2  # 2 iterations x 4 prompts x N=2

    training_angles = {-45.0, -15.0, 0.0, 15.0, 30.0, 45.0}  # step 15 over [-45, 45] without held-out -30
    for k in (1, 2):
        rows = read_jsonl(out / f"iter-{k}" / "data.jsonl")
        assert (out / f"iter-{k}" / "adapter" / "adapter_config.json").is_file()
        assert [r["index"] for r in rows] == [0, 1, 2, 3] and [r["prompt"] for r in rows] == prompts()
        assert all(r["angle"] in training_angles and len(r["candidates"]) == 2 for r in rows)
        check_rows(rows)
    summary = result["iterations"][0]
    rows = read_jsonl(out / "iter-1" / "data.jsonl")
    assert summary["chosen_weighted_reward"] == pytest.approx(
        np.mean([max(r["weighted_scores"]) for r in rows])
    )
    assert summary["update"] == "sft" and summary["train_examples"] == 4
    assert np.isfinite(summary["train_loss"])

    # Iteration 2 fine-tuned iteration 1's adapter further: different weights.
    first, second = adapter_weights(out / "iter-1" / "adapter"), adapter_weights(out / "iter-2" / "adapter")
    assert any(not torch.equal(first[k], second[k]) for k in first)
    data_1 = (out / "iter-1" / "data.jsonl").stat().st_mtime_ns
    adapter_1 = (out / "iter-1" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    data_2 = (out / "iter-2" / "data.jsonl").read_text()

    # Lost adapter of iteration 2: its data is reused (nothing generated or scored), only its SFT is redone,
    # from iteration 1's saved adapter, and gives the same weights as the uninterrupted run.
    shutil.rmtree(out / "iter-2" / "adapter")
    brevity.scored = cats.scored = 0
    make_trainer(tmp_path, tokenizer, [brevity, cats], attribute_names=NAMES, update="sft").train()
    assert brevity.scored == cats.scored == 0
    assert (out / "iter-2" / "data.jsonl").read_text() == data_2
    redone = adapter_weights(out / "iter-2" / "adapter")
    assert all(torch.allclose(second[k], redone[k], atol=1e-6) for k in second)
    assert (out / "iter-1" / "data.jsonl").stat().st_mtime_ns == data_1
    assert (out / "iter-1" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == adapter_1

    # Lost iteration 2 entirely: only its 4 prompts x 2 samples are generated and scored again.
    shutil.rmtree(out / "iter-2")
    make_trainer(tmp_path, tokenizer, [brevity, cats], attribute_names=NAMES, update="sft").train()
    assert brevity.scored == cats.scored == 4 * 2
    assert (out / "iter-2" / "adapter").is_dir() and not (out / "iter-2" / ".trainer").exists()
    assert (out / "iter-1" / "data.jsonl").stat().st_mtime_ns == data_1


def test_directional_dpo_two_directions_per_prompt_shared_candidates_reloadable_and_resumable(
    tmp_path, tokenizer
):
    logs = Logs()
    kwargs = dict(
        attribute_names=NAMES,
        update="dpo",
        num_samples=3,
        max_new_tokens=6,
        directions_per_prompt=2,
        share_candidates=True,
        angle_range_degrees=[0, 90],
        angle_step_degrees=30,
        heldout_angles=[],
        beta=0.5,
        conditioning="prompt",  # the direction stated in each row's prompt ("auto" would gate the adapter)
    )
    trainer = make_trainer(tmp_path, tokenizer, [word_count, cat_count], callbacks=[logs], **kwargs)
    result = trainer.train()
    out = tmp_path / "dpa"
    for k in (1, 2):
        rows = read_jsonl(out / f"iter-{k}" / "data.jsonl")
        check_rows(rows, directions_per_prompt=2, shared=True)
        # One row per prompt and direction; a prompt's two directions come from the two strata of the pool
        # (0, 30 | 60, 90) and choose among the same 2 x 3 candidates, each tagged with its own direction.
        assert [r["index"] for r in rows] == [0, 0, 1, 1, 2, 2, 3, 3]
        for a, b in zip(rows[::2], rows[1::2], strict=True):
            assert a["angle"] in (0.0, 30.0) and b["angle"] in (60.0, 90.0)
            assert a["candidates"] == b["candidates"] and len(a["candidates"]) == 6
            assert a["sampled_under"] == b["sampled_under"] == [a["weights"]] * 3 + [b["weights"]] * 3
        pairs = [r for r in rows if r["gap"] > 0]
        assert pairs, "the tiny model's samples should differ in length or cats"
        summary = result["iterations"][k - 1]
        assert summary["update"] == "dpo" and summary["train_examples"] == len(pairs)
        assert summary["rows"] == 8 and summary["prompts"] == 4

    # The reference is the policy each iteration starts from: at the first step of either iteration the policy
    # equals its reference, so the loss is log 2 and the margin 0 (iteration 2 starts from a trained adapter, so
    # a base-model reference would give another loss).
    first_steps = [line for line in logs.lines if line.get("epoch", 1) <= 0.5 and "loss" in line]
    assert len(first_steps) == 2
    for line in first_steps:
        assert line["loss"] == pytest.approx(math.log(2), abs=1e-4)
        assert line["rewards/margins"] == pytest.approx(0.0, abs=1e-4)

    # The saved adapter holds the policy only (no reference copy) and reloads into the trained model's outputs.
    adapter = out / "iter-2" / "adapter"
    assert result["adapter"] == str(adapter) and not (adapter / "ref").exists()
    assert set(json.loads((adapter / "adapter_config.json").read_text())["target_modules"]) == {
        "q_proj",
        "v_proj",
    }
    reloaded = PeftModel.from_pretrained(tiny_causal_lm(tokenizer, seed=0), str(adapter)).eval()
    ids = torch.tensor([tokenizer("the cat sat on the mat")["input_ids"]])
    trained = trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, trained(ids).logits, atol=1e-5)
        with reloaded.disable_adapter():
            assert not torch.allclose(reloaded(ids).logits, trained(ids).logits, atol=1e-3)

    # Resume: iteration 2's DPO redone from iteration 1's saved adapter on the kept data gives the same weights.
    second = adapter_weights(adapter)
    shutil.rmtree(adapter)
    counted = Counted(word_count)
    make_trainer(tmp_path, tokenizer, [counted, cat_count], **kwargs).train()
    assert counted.scored == 0
    redone = adapter_weights(adapter)
    assert set(redone) == set(second)
    assert all(torch.allclose(second[k], redone[k], atol=1e-6) for k in second)


def test_no_pair_at_the_gap_keeps_the_data_for_a_rerun(tmp_path, tokenizer):
    counted = Counted(word_count)
    trainer = make_trainer(
        tmp_path, tokenizer, [counted, cat_count], attribute_names=NAMES, update="dpo", min_pair_gap=1000.0
    )
    with pytest.raises(ValueError, match=r"no DPO pair: min_pair_gap=1000.0 but the largest gap"):
        trainer.train()
    assert (tmp_path / "dpa" / "iter-1" / "data.jsonl").is_file()
    assert not (tmp_path / "dpa" / "iter-1" / "adapter").exists()
    scored = counted.scored
    make_trainer(
        tmp_path, tokenizer, [counted, cat_count], attribute_names=NAMES, update="dpo", iterations=1
    ).train()
    assert counted.scored == scored  # iteration 1's samples were reused, not drawn again
    assert (tmp_path / "dpa" / "iter-1" / "adapter").is_dir()


def test_prompts_per_iteration_takes_new_prompts_each_iteration(tmp_path, tokenizer):
    trainer = make_trainer(
        tmp_path, tokenizer, [word_count, cat_count], attribute_names=NAMES, prompts_per_iteration=3
    )
    first, second = trainer.iteration_prompts(1), trainer.iteration_prompts(2)
    assert len(first) == len(second) == 3
    assert sorted(set(first) | set(second)) == [0, 1, 2, 3]  # 4 prompts: the second slice wraps around
    assert first == make_trainer(
        tmp_path, tokenizer, [word_count, cat_count], attribute_names=NAMES, prompts_per_iteration=3
    ).iteration_prompts(1)  # seeded


# -------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0}, "num_samples=0 must be an integer >= 1"),
        ({"iterations": 0}, "iterations=0 must be an integer >= 1"),
        ({"temperature": 0.0}, "temperature=0.0 must be a number > 0"),
        ({"top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"),
        ({"prompts_per_iteration": 0}, "prompts_per_iteration=0 must be an integer >= 1"),
        ({"directions": [[1, 0], [0, 0]]}, r"directions\[1\]=\[0.0, 0.0\] is the zero vector"),
        (
            {"attribute_names": NAMES, "directions": [[1, 0, 0]]},
            r"directions\[0\]=\[1, 0, 0\] has 3 entries; it needs 2",
        ),
        ({"attribute_names": ["a", "b", "c"]}, "angles describe 2 attributes; give the training directions"),
        ({"angle_range_degrees": [45, -45]}, r"angle_range_degrees=\[45.0, -45.0\] must have lo <= hi"),
        ({"heldout_angles": [0], "angle_range_degrees": [0, 0]}, "leaves no training angle"),
        ({"eval_angles": [float("nan")]}, "eval_angles=.* must be a non-empty list of finite angles"),
        ({"attribute_names": ["a", "a"]}, r"attribute_names=\['a', 'a'\] has duplicates"),
        ({"update": "ppo"}, r"update='ppo' is not valid; valid: \['sft', 'dpo'\]"),
        ({"reward_scale": "z"}, r"reward_scale='z' is not valid; valid: \['minmax', 'raw'\]"),
        ({"beta": 0}, "beta=0 must be a finite number > 0"),
        ({"min_pair_gap": -1.0}, "min_pair_gap=-1.0 must be a finite number >= 0"),
        ({"min_pair_gap": float("inf")}, "min_pair_gap=inf must be a finite number >= 0"),
        ({"directions_per_prompt": 0}, "directions_per_prompt=0 must be an integer >= 1"),
        ({"directions_per_prompt": 7}, "directions_per_prompt=7 exceeds the 6 training directions"),
        ({"share_candidates": "yes"}, "share_candidates='yes' must be true or false"),
        ({"dpo_kwargs": ["beta"]}, r"dpo_kwargs=\['beta'\] must be a mapping of DPOConfig fields"),
        ({"dpo_kwargs": {"beta": 0.2}}, "dpo_kwargs.beta: set `beta`, a DPAConfig field, instead"),
        ({"dpo_kwargs": {"learning_rate": 1.0}}, "dpo_kwargs.learning_rate is a field of this config itself"),
        ({"dpo_kwargs": {"max_length": 8}}, "dpo_kwargs.max_length is a field of this config itself"),
        (
            {"dpo_kwargs": {"betta": 0.2}},
            r"dpo_kwargs.betta is not a DPOConfig field; valid: \[.*'loss_type'",
        ),
    ],
)
def test_config_errors_name_the_field(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **kwargs)


def test_dpo_config_takes_the_training_loop_and_the_dpo_fields(tmp_path):
    args = config(
        tmp_path,
        max_length=77,
        beta=0.3,
        learning_rate=3e-4,
        loss_type="nll",  # SFT's token loss: not DPO's preference loss
        dpo_kwargs={"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
    )
    dpo = args.dpo_config(output_dir=str(tmp_path / "work"))
    assert (dpo.beta, dpo.max_length, dpo.learning_rate, dpo.seed) == (0.3, 77, 3e-4, 0)
    assert dpo.loss_type == ["sigmoid", "sft"] and dpo.loss_weights == [1.0, 0.5]
    assert dpo.output_dir == str(tmp_path / "work") and dpo.per_device_train_batch_size == 4
    assert config(tmp_path).dpo_config().loss_type == ["sigmoid"]


def test_trainer_errors_before_any_work(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="peft_config is required"):
        DPATrainer(
            tiny_causal_lm(tokenizer), config(tmp_path), prompts(), tokenizer, reward=[word_count, cat_count]
        )
    with pytest.raises(ValueError, match=r"attribute_names=\['brevity', 'cats'\] but the reward scores"):
        make_trainer(
            tmp_path, tokenizer, StackedReward([word_count, cat_count], ["a", "b"]), attribute_names=NAMES
        )
    with pytest.raises(ValueError, match="reward has 3 sources but attribute_names"):
        make_trainer(tmp_path, tokenizer, [word_count] * 3, attribute_names=NAMES)
    with pytest.raises(ValueError, match="attribute_names has 3 entries.*angles describe 2 attributes"):
        make_trainer(tmp_path, tokenizer, [word_count] * 3, attribute_names=["a", "b", "c"])
    with pytest.raises(TypeError, match="single-output RewardModel; use MultiObjectiveReward"):
        make_trainer(tmp_path, tokenizer, RewardModel(tiny_reward_model(tokenizer), tokenizer))
    with pytest.raises(ValueError, match="loss_weights"):  # a bad DPOConfig value, before any generation
        make_trainer(
            tmp_path,
            tokenizer,
            [word_count, cat_count],
            attribute_names=NAMES,
            dpo_kwargs={"loss_weights": [1.0, 2.0]},
        )
    with pytest.raises(ValueError, match="train_dataset has no prompts"):
        DPATrainer(
            tiny_causal_lm(tokenizer),
            config(tmp_path, attribute_names=NAMES),
            [],
            tokenizer,
            [word_count, cat_count],
            peft_config=LoraConfig(**LORA),
        )
    assert not (tmp_path / "dpa").exists()


def test_non_finite_reward_names_attribute_and_prompt(tmp_path, tokenizer):
    def broken(prompts, responses):
        return [float("nan")] * len(responses)

    trainer = make_trainer(tmp_path, tokenizer, [word_count, broken], attribute_names=NAMES)
    with pytest.raises(ValueError, match="non-finite score.*attribute 'cats' of sampled response 0"):
        trainer.train()
    assert not (tmp_path / "dpa" / "iter-1" / "data.jsonl").exists()


# ---------------------------------------------------------------------------------- recipes and evaluation


def test_adapter_conditioning_gates_sampling_and_directional_dpo(tmp_path, tokenizer):
    """`conditioning="adapter"`: the prompt stays plain, each row carries the gates of its direction, TRL's DPO runs
    every row at its own gates for the policy and for the reference copy of the adapter (so each iteration starts
    at log 2, as with the prompt), and the saved adapter reloads gated."""
    from modpo_trl.conditioning.directions import direction_gates
    from modpo_trl.conditioning.svd_lora import PreferenceLoRA, load_preference_adapter, preference

    logs = Logs()
    kwargs = dict(
        attribute_names=NAMES,
        conditioning="adapter",
        num_samples=3,
        max_new_tokens=6,
        directions_per_prompt=2,
        share_candidates=True,
        angle_range_degrees=[0, 90],
        angle_step_degrees=30,
        heldout_angles=[],
        beta=0.5,
    )
    trainer = make_trainer(tmp_path, tokenizer, [word_count, cat_count], callbacks=[logs], **kwargs)
    trainer.train()
    out = tmp_path / "dpa"
    for k in (1, 2):
        rows = read_jsonl(out / f"iter-{k}" / "data.jsonl")
        assert all(r["conditioned_prompt"] == r["prompt"] for r in rows)  # no direction in the prompt
        assert all(r["preference"] == direction_gates(r["direction"]) for r in rows)
    first_steps = [line for line in logs.lines if line.get("epoch", 1) <= 0.5 and "loss" in line]
    assert len(first_steps) == 2
    for line in first_steps:
        assert line["loss"] == pytest.approx(math.log(2), abs=1e-4)

    adapter = out / "iter-2" / "adapter"
    assert PreferenceLoRA.load(adapter) == PreferenceLoRA(tuple(NAMES), 0, 2)
    model = load_preference_adapter(tiny_causal_lm(tokenizer, seed=0), adapter).eval()
    ids = torch.tensor([tokenizer("the cat sat on the mat")["input_ids"]])
    with torch.no_grad():
        with preference(model, [1.0, 0.0]):
            brevity = model(ids).logits
        with preference(model, [0.0, 1.0]):
            cats = model(ids).logits
    assert not torch.allclose(brevity, cats, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "lora", "expected"),
    [
        (dict(angle_range_degrees=[0, 90], heldout_angles=[]), True, "adapter"),
        (dict(), True, "prompt"),  # the default angles, -45 to 45: a gate cannot express a negative weight
        (
            dict(angle_range_degrees=[0, 90], heldout_angles=[], update="sft"),
            True,
            "prompt",
        ),  # SFT: no gated update
        (
            dict(angle_range_degrees=[0, 90], heldout_angles=[]),
            False,
            "prompt",
        ),  # an IA3 adapter: no LoRA to gate
    ],
)
def test_auto_conditioning_gates_the_adapter_where_it_can(tmp_path, tokenizer, kwargs, lora, expected):
    args = config(tmp_path, attribute_names=NAMES, **kwargs)
    assert args.conditioning == "auto"  # the default
    trainer = DPATrainer(
        tiny_causal_lm(tokenizer, seed=0),
        args,
        prompts(),
        tokenizer,
        reward=[word_count, cat_count],
        peft_config=LoraConfig(**LORA)
        if lora
        else IA3Config(target_modules=["q_proj"], feedforward_modules=[]),
    )
    assert trainer.args.conditioning == expected  # written back, so the saved run says what was trained
    assert (trainer.layout is not None) == (expected == "adapter")


def test_adapter_conditioning_needs_dpo_and_non_negative_directions(tmp_path):
    with pytest.raises(
        ValueError, match=r"conditioning='adapter' gates the adapter row by row.*update='sft'"
    ):
        config(tmp_path, conditioning="adapter", update="sft", angle_range_degrees=[0, 90], heldout_angles=[])
    with pytest.raises(
        ValueError, match=r"conditioning='both' gates the adapter by each direction's weights"
    ):
        config(tmp_path, conditioning="both")  # the default angles run from -45 to 45
