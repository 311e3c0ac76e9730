import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tokenizers.processors import TemplateProcessing
from trl import DPOConfig, DPOTrainer

from modpo_trl import ColumnReward, FunctionReward, ImplicitReward, RewardModel
from modpo_trl.rewards.sources import _completion_batch, render_pair, sequence_logps
from modpo_trl.testing import tiny_causal_lm, tiny_reward_model, tiny_tokenizer, toy_preference_dataset


def test_function_reward_scores_pairs_in_batches():
    seen = []

    def fn(prompts, responses):
        seen.append(len(responses))
        return torch.tensor([float(len(r)) for r in responses])

    data = toy_preference_dataset(5)
    chosen, rejected = FunctionReward(fn).score_pairs(data, batch_size=4)
    assert seen == [4, 4, 2]
    assert chosen.tolist() == [float(len(r)) for r in data["chosen"]]
    assert rejected.tolist() == [float(len(r)) for r in data["rejected"]]


def test_function_reward_wrong_length_is_an_error():
    with pytest.raises(ValueError, match="returned 1 scores for a batch of 4"):
        FunctionReward(lambda p, r: [1.0], name="short").score_pairs(toy_preference_dataset(2), batch_size=4)


def test_reward_model_uses_chat_template_and_matches_direct_forward(tokenizer):
    rm = tiny_reward_model(tokenizer, seed=3)
    source = RewardModel(rm, tokenizer, batch_size=2)
    data = toy_preference_dataset(3)
    chosen, _ = source.score_pairs(data)
    text = render_pair(tokenizer, data[0]["prompt"], data[0]["chosen"])
    assert text.startswith("<|user|> ") and "<|assistant|> " in text
    enc = tokenizer([text], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        direct = rm(**enc).logits[0, 0]
    assert torch.allclose(chosen[0], direct, atol=1e-5)  # padding in a batch does not change the score


def test_reward_model_without_chat_template_concatenates():
    tok = tiny_tokenizer(chat_template=False)
    assert render_pair(tok, "hello ", "cat") == "hello cat"


def test_multi_output_reward_model_needs_an_output(tokenizer):
    rm = tiny_reward_model(tokenizer, num_labels=3)
    rm.config.id2label = {0: "help", 1: "safe", 2: "short"}
    with pytest.raises(ValueError, match="has 3 outputs.*exactly 1"):
        RewardModel(rm, tokenizer)
    with pytest.raises(ValueError, match="output='kind' is not a label.*'help', 'safe', 'short'"):
        RewardModel(rm, tokenizer, output="kind")
    both = RewardModel(rm, tokenizer, output="safe").score(["hello"], ["cat"])
    assert both.shape == (1,)


def test_implicit_reward_of_fresh_lora_is_zero_and_of_trained_lora_is_beta_logratio(tokenizer):
    base = tiny_causal_lm(tokenizer)
    policy = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    data = toy_preference_dataset(4)
    chosen, rejected = ImplicitReward(policy, tokenizer, beta=0.5).score_pairs(data)
    assert torch.allclose(chosen, torch.zeros(4)) and torch.allclose(rejected, torch.zeros(4))

    # A full model against an explicit reference: 0.5 * (log pi - log pi_ref) on the completion tokens only.
    other = tiny_causal_lm(tokenizer, seed=7)
    source = ImplicitReward(other, tokenizer, beta=0.5, ref_model=base)
    got = source.score([data[0]["prompt"]], [data[0]["chosen"]])
    batch = _completion_batch(tokenizer, [data[0]["prompt"]], [data[0]["chosen"]], 1024, "cpu")
    with torch.no_grad():
        expected = 0.5 * (sequence_logps(other, batch) - sequence_logps(base, batch))
    assert torch.allclose(got, expected, atol=1e-5)
    n_completion = len(data[0]["chosen"].split()) + 1  # + EOS, as TRL appends it
    assert int(batch["completion_mask"].sum()) == n_completion


def test_implicit_reward_tokenises_standard_data_as_trls_dpo_with_bos(tmp_path):
    """The margin of an implicit reward is the one TRL's DPO would compute: same ids, BOS included."""
    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    policy, reference = tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2)
    data = toy_preference_dataset(3)
    config = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    rows = DPOTrainer(policy, reference, config, train_dataset=data, processing_class=tokenizer).train_dataset
    assert rows[0]["prompt_ids"][0] == tokenizer.bos_token_id
    got = ImplicitReward(policy, tokenizer, beta=0.5, ref_model=reference).score(
        data["prompt"], data["chosen"]
    )
    for i, row in enumerate(rows):
        ids = torch.tensor([row["prompt_ids"] + row["chosen_ids"]])
        mask = torch.tensor([[0] * len(row["prompt_ids"]) + [1] * len(row["chosen_ids"])])
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask}
        with torch.no_grad():
            expected = 0.5 * (sequence_logps(policy, batch) - sequence_logps(reference, batch))
        assert torch.allclose(got[i], expected[0], atol=1e-5)


def test_implicit_reward_needs_reference_for_a_full_model(tokenizer):
    with pytest.raises(ValueError, match="must be a PEFT model"):
        ImplicitReward(tiny_causal_lm(tokenizer), tokenizer)
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        ImplicitReward(tiny_causal_lm(tokenizer), tokenizer, beta=0)


def test_path_sources_load_lazily_and_release(tokenizer, tmp_path):
    rm = tiny_reward_model(tokenizer, seed=2)
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    source = RewardModel(str(tmp_path / "rm"))
    assert source._model is None and source.name == "rm"
    in_memory = RewardModel(rm, tokenizer).score(["hello"], ["cat dog"])
    assert torch.allclose(source.score(["hello"], ["cat dog"]), in_memory, atol=1e-5)
    source.release()
    assert source._model is None


def test_unloadable_model_path_names_the_path(tmp_path):
    with pytest.raises(OSError, match="could not load a model from .*missing"):
        RewardModel(str(tmp_path / "missing"), tokenizer=tiny_tokenizer()).score(["a"], ["b"])


def test_column_reward_missing_column():
    with pytest.raises(ValueError, match=r"column\(s\) \['nope'\] not in the dataset"):
        ColumnReward("nope", "chosen").score_pairs(toy_preference_dataset(2))
