import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tokenizers.processors import TemplateProcessing
from trl import DPOConfig, DPOTrainer

from modpo_trl import ColumnReward, FunctionReward, ImplicitReward, RewardModel
from modpo_trl.evaluation.responses import score_all
from modpo_trl.rewards.sources import _completion_batch, check_scores, render_pair, sequence_logps
from modpo_trl.rewards.vector import StackedReward
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


# ------------------------------------------------------------------------------- how a callable reward is called
def test_function_reward_accepts_trls_keyword_convention_and_the_positional_form():
    data = toy_preference_dataset(3).map(lambda r, i: {"bonus": float(i), "note": "x"}, with_indices=True)

    def grpo_style(prompts, completions, **kwargs):  # TRL's GRPO reward functions
        assert set(kwargs) == {"bonus", "note"} and len(kwargs["bonus"]) == len(completions)
        return [len(c.split()) + b for c, b in zip(completions, kwargs["bonus"], strict=True)]

    def completions_only(completions, **kwargs):
        return [float(len(c.split())) for c in completions]

    def declared(completions, bonus):  # only what it declares is passed
        return [len(c.split()) + b for c, b in zip(completions, bonus, strict=True)]

    def positional(prompts, responses):
        return [float(len(r.split())) for r in responses]

    def positional_with_columns(prompts, responses, bonus):
        return [len(r.split()) + b for r, b in zip(responses, bonus, strict=True)]

    words = torch.tensor([float(len(r.split())) for r in data["chosen"]])
    for fn, plus_bonus in [
        (grpo_style, True),
        (completions_only, False),
        (declared, True),
        (positional, False),
        (positional_with_columns, True),
        (lambda prompts, responses: positional(prompts, responses), False),
    ]:
        source = FunctionReward(fn)
        chosen, rejected = source.score_pairs(data, batch_size=2)  # batches mix chosen and rejected rows
        expected = words + torch.tensor(data["bonus"]) * plus_bonus
        assert torch.equal(chosen, expected), fn
        assert rejected.shape == (3,)
    assert FunctionReward(grpo_style).keyword and not FunctionReward(positional).keyword
    assert FunctionReward(declared).input_columns(["prompt", "chosen", "bonus", "note"]) == ["bonus"]
    assert FunctionReward(positional).input_columns(["prompt", "bonus"]) == []


def test_none_is_not_applicable_for_margins_and_an_error_where_every_response_needs_a_score():
    def first_only(completions, **kwargs):
        return [1.0] + [None] * (len(completions) - 1)

    chosen, rejected = FunctionReward(first_only).score_pairs(toy_preference_dataset(2), batch_size=4)
    assert chosen[0] == 1.0 and torch.isnan(chosen[1]) and torch.isnan(rejected).all()
    with pytest.raises(ValueError, match=r"'first_only' returned None \(not applicable\) at item 1"):
        check_scores("first_only", first_only(["a", "b"]), expected=2)
    with pytest.raises(ValueError, match="non-finite score"):  # NaN is not a way to say "not applicable"
        FunctionReward(lambda completions, **kw: [float("nan")] * len(completions)).score_pairs(
            toy_preference_dataset(1)
        )


def grpo_words(prompts, completions, **kwargs):
    """A reward function written for TRL's GRPOTrainer."""
    return [float(len(c.split())) for c in completions]


def evaluation_entry(responses, tmp_path):
    """One candidate's responses, as `modpo_trl.evaluation.responses.score_all` takes them."""
    return {
        "candidate": "c",
        "fingerprint": "f",
        "responses": responses,
        "scores": {},
        "cache_path": tmp_path / "c.json",
    }


def test_trl_reward_functions_score_dpa_reward_vectors_and_evaluations(tmp_path):
    """The other places a callable reward is used: DPA's per-attribute rewards and the evaluation scorers."""
    vector = StackedReward([grpo_words, lambda prompts, responses: [1.0] * len(responses)], ["words", "one"])
    assert vector.score(["p", "q"], ["a b c", "d"]).tolist() == [[3.0, 1.0], [1.0, 1.0]]
    entries = {"c": evaluation_entry(["a b c", "d"], tmp_path)}
    score_all([FunctionReward(grpo_words, name="words")], ["p", "q"], entries, batch_size=1)
    assert entries["c"]["scores"]["words"]["values"] == [3.0, 1.0] and entries["c"]["error"] is None


def test_none_fails_clearly_in_dpa_and_evaluation(tmp_path):
    def not_for_short(completions, **kwargs):
        return [None if len(c) < 2 else 1.0 for c in completions]

    with pytest.raises(ValueError, match=r"reward for 'x' returned None \(not applicable\) for response 1"):
        StackedReward([not_for_short], ["x"]).score(["p", "q"], ["a b", "d"])
    entries = {"c": evaluation_entry(["a b", "d"], tmp_path)}
    score_all([FunctionReward(not_for_short)], ["p", "q"], entries, batch_size=4)
    assert "returned None (not applicable) at item 1" in entries["c"]["error"]
