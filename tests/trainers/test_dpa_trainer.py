"""DPATrainer: rejection sampling under v . r, the SFT data it builds, the iterated loop and its resumption, reward
vectors (rule-based and a trained multi-output regressor), bad input."""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from modpo_trl.conditioning.directions import angle_of, direction, render_direction
from modpo_trl.rewards.sources import RewardModel
from modpo_trl.rewards.vector import MultiObjectiveReward, StackedReward
from modpo_trl.storage import read_jsonl
from modpo_trl.testing import WORDS, tiny_causal_lm, tiny_reward_model, tiny_tokenizer
from modpo_trl.trainers.dpa_config import DPAConfig
from modpo_trl.trainers.dpa_trainer import DPATrainer, select_best, sft_dataset

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


def make_trainer(tmp_path, tokenizer, reward, **kwargs) -> DPATrainer:
    return DPATrainer(
        tiny_causal_lm(tokenizer, seed=0),
        config(tmp_path, **kwargs),
        prompts(),
        tokenizer,
        reward=reward,
        peft_config=LoraConfig(**LORA),
    )


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


# ------------------------------------------------------------------------------------------------ selection
def test_select_best_is_argmax_of_v_dot_r():
    # 2 prompts x 3 candidates x 2 attributes.
    scores = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 1.0], [0.8, 0.8]],
            [[1.0, 0.0], [0.0, 1.0], [0.8, 0.8]],
        ]
    )
    directions = torch.tensor([[1.0, 0.0], [0.6, -0.8]])
    chosen, weighted = select_best(scores, directions)
    # prompt 0, v = (1, 0): 1.0, 0.0, 0.8 -> candidate 0.
    # prompt 1, v = (0.6, -0.8): 0.6, -0.8, 0.48 - 0.64 = -0.16 -> candidate 0 as well, and with
    # v = (0.6, 0.8) it would be candidate 2 (1.12): the direction, not one attribute, decides.
    assert torch.allclose(weighted, torch.tensor([[1.0, 0.0, 0.8], [0.6, -0.8, -0.16]], dtype=torch.float64))
    assert chosen.tolist() == [0, 0]
    chosen, _ = select_best(scores, torch.tensor([[0.0, 1.0], [0.6, 0.8]]))
    assert chosen.tolist() == [1, 2]
    chosen, _ = select_best(torch.ones(1, 3, 2), torch.tensor([[0.6, 0.8]]))
    assert chosen.tolist() == [0]  # ties: the first candidate


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
def test_two_iterations_then_resume_only_the_missing_work(tmp_path, tokenizer):
    brevity, cats = Counted(word_count), Counted(cat_count)
    trainer = make_trainer(tmp_path, tokenizer, [brevity, cats], attribute_names=NAMES)
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
        for row in rows:
            v, scores = np.array(row["direction"]), np.array(row["scores"])
            assert round(angle_of(v), 6) == row["angle"] and row["angle"] in training_angles
            assert scores.shape == (2, 2) and len(row["candidates"]) == 2
            # scores are the rule-based attributes of each candidate, v . r their weighted sum, chosen its argmax
            texts = row["candidates"]
            assert scores.tolist() == [[len(t.split()), t.split().count("cat")] for t in texts]
            assert row["weighted_scores"] == pytest.approx((scores @ v).tolist())
            assert row["chosen"] == int(np.argmax(scores @ v))
            assert row["conditioned_prompt"] == [
                {"role": "system", "content": render_direction(v, NAMES)},
                *row["prompt"],
            ]
    summary = result["iterations"][0]
    rows = read_jsonl(out / "iter-1" / "data.jsonl")
    assert summary["chosen_weighted_reward"] == pytest.approx(
        np.mean([max(r["weighted_scores"]) for r in rows])
    )
    assert summary["sft_examples"] == 4 and np.isfinite(summary["sft_train_loss"])

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
    make_trainer(tmp_path, tokenizer, [brevity, cats], attribute_names=NAMES).train()
    assert brevity.scored == cats.scored == 0
    assert (out / "iter-2" / "data.jsonl").read_text() == data_2
    redone = adapter_weights(out / "iter-2" / "adapter")
    assert all(torch.allclose(second[k], redone[k], atol=1e-6) for k in second)
    assert (out / "iter-1" / "data.jsonl").stat().st_mtime_ns == data_1
    assert (out / "iter-1" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == adapter_1

    # Lost iteration 2 entirely: only its 4 prompts x 2 samples are generated and scored again.
    shutil.rmtree(out / "iter-2")
    make_trainer(tmp_path, tokenizer, [brevity, cats], attribute_names=NAMES).train()
    assert brevity.scored == cats.scored == 4 * 2
    assert (out / "iter-2" / "adapter").is_dir() and not (out / "iter-2" / ".trainer").exists()
    assert (out / "iter-1" / "data.jsonl").stat().st_mtime_ns == data_1


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
    ],
)
def test_config_errors_name_the_field(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **kwargs)


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
    with pytest.raises(ValueError, match="non-finite score.*attribute 'cats' of response 0 to prompt 0"):
        trainer.train()
    assert not (tmp_path / "dpa" / "iter-1" / "data.jsonl").exists()


# ---------------------------------------------------------------------------------- recipes and evaluation
