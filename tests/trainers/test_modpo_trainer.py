import copy
import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel
from trl import DPOConfig, DPOTrainer

from modpo_trl import ColumnReward, MODPOConfig, MODPOTrainer
from modpo_trl.rewards.sources import sequence_logps
from modpo_trl.testing import tiny_causal_lm, toy_preference_dataset

COMMON = dict(
    output_dir="unused",
    per_device_train_batch_size=4,
    per_device_eval_batch_size=4,
    report_to="none",
    save_strategy="no",
    use_cpu=True,
    bf16=False,
    gradient_checkpointing=False,
    disable_tqdm=True,
    seed=0,
)
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def n_words(prompts, responses):
    return [float(len(r.split())) for r in responses]


def has_cat(prompts, responses):
    return [float("cat" in r) for r in responses]


def make_modpo(tokenizer, tmp_path, weights, margins, dataset=None, model=None, eval_dataset=None, **kwargs):
    kwargs = {**COMMON, "output_dir": str(tmp_path / "out"), **kwargs}
    peft = kwargs.pop("peft", False)
    model = model or tiny_causal_lm(tokenizer)
    return MODPOTrainer(
        model=model,
        ref_model=None if (peft or kwargs.get("precompute_ref_log_probs")) else copy.deepcopy(model),
        args=MODPOConfig(weights=weights, **kwargs),
        train_dataset=dataset if dataset is not None else toy_preference_dataset(16),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        margin_rewards=margins,
        peft_config=LoraConfig(**LORA) if peft else None,
    )


def first_examples(trainer, n=4):
    return [trainer.train_dataset[i] for i in range(n)]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("precompute,peft", [(False, False), (True, False), (False, True), (True, True)])
def test_vertex_weighting_equals_trl_dpo_loss_and_gradients(tokenizer, tmp_path, precompute, peft):
    """w = (1, 0): MODPO must be DPO exactly, whatever the (non-zero) margin rewards are."""
    model = tiny_causal_lm(tokenizer, seed=1)
    dpo_model = copy.deepcopy(model)
    modpo = make_modpo(
        tokenizer,
        tmp_path,
        [1.0, 0.0],
        [n_words],
        model=model,
        precompute_ref_log_probs=precompute,
        peft=peft,
    )
    dpo = DPOTrainer(
        model=dpo_model,
        ref_model=None if (peft or precompute) else copy.deepcopy(dpo_model),
        args=DPOConfig(
            **{**COMMON, "output_dir": str(tmp_path / "dpo")}, precompute_ref_log_probs=precompute
        ),
        train_dataset=toy_preference_dataset(16),
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA) if peft else None,
    )
    losses = []
    for trainer in (modpo, dpo):
        trainer.model.train()
        batch = trainer.data_collator(first_examples(trainer))
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-6), losses
    g_modpo, g_dpo = grads(modpo.model), grads(dpo.model)
    assert g_modpo.keys() == g_dpo.keys() and g_modpo
    for name in g_dpo:
        assert torch.allclose(g_modpo[name], g_dpo[name], atol=1e-6), name


@pytest.mark.parametrize("weights", [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.25, 0.0, 0.75]])
def test_loss_matches_hand_computation(tokenizer, tmp_path, weights):
    beta = 0.5
    data = toy_preference_dataset(8).map(
        lambda ex, i: {"a_c": 0.3 * i, "a_r": -0.1 * i, "b_c": 1.0 - i, "b_r": 2.0}, with_indices=True
    )
    margins = [ColumnReward("a_c", "a_r", name="a"), ColumnReward("b_c", "b_r", name="b")]
    trainer = make_modpo(
        tokenizer, tmp_path, weights, margins, dataset=data, beta=beta, precompute_ref_log_probs=True
    )
    trainer.model.train()
    examples = first_examples(trainer, 8)
    batch = trainer.data_collator(examples)
    loss = trainer.compute_loss(trainer.model, batch)

    # Independent computation: our own log-prob code, the reference log-probs and margins stored on the rows.
    with torch.no_grad():
        policy = sequence_logps(trainer.model, batch)
    pi_c, pi_r = policy.chunk(2)
    ref_c = torch.tensor([e["ref_chosen_logps"] for e in examples])
    ref_r = torch.tensor([e["ref_rejected_logps"] for e in examples])
    r_c = torch.tensor([[e["a_c"], e["b_c"]] for e in examples])
    r_r = torch.tensor([[e["a_r"], e["b_r"]] for e in examples])
    w = torch.tensor(weights)
    h_c = beta * (pi_c - ref_c) - r_c @ w[1:]
    h_r = beta * (pi_r - ref_r) - r_r @ w[1:]
    expected = -F.logsigmoid((h_c - h_r) / w[0]).mean()
    assert torch.allclose(loss, expected, atol=1e-5), (loss, expected)


def test_margin_favouring_chosen_raises_the_loss(tokenizer, tmp_path):
    """MODPO subtracts the margin: a frozen reward already preferring y_w leaves less for the policy to learn."""
    data = toy_preference_dataset(8).map(lambda ex: {"up_c": 2.0, "up_r": 0.0, "zero": 0.0})
    losses = {}
    for name, source in {
        "favours_chosen": ColumnReward("up_c", "up_r"),
        "neutral": ColumnReward("zero", "zero"),
    }.items():
        trainer = make_modpo(tokenizer, tmp_path / name, [0.5, 0.5], [source], dataset=data)
        batch = trainer.data_collator(first_examples(trainer))
        losses[name] = trainer.compute_loss(trainer.model, batch).item()
    assert losses["favours_chosen"] > losses["neutral"] + 0.1


def test_training_logs_trl_and_per_objective_metrics_with_grad_accumulation_and_eval(tokenizer, tmp_path):
    trainer = make_modpo(
        tokenizer,
        tmp_path,
        [0.5, 0.3, 0.2],
        [n_words, has_cat],
        max_steps=4,
        logging_steps=1,
        gradient_accumulation_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        peft=True,
        learning_rate=1e-3,
        eval_dataset=toy_preference_dataset(8, seed=1),
    )
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    logs = {k for entry in trainer.state.log_history for k in entry}
    for key in [
        "loss",
        "rewards/chosen",
        "rewards/margins",
        "rewards/accuracies",
        "margin/n_words",
        "margin/has_cat",
    ]:
        assert key in logs
    assert {"eval_loss", "eval_rewards/margins", "eval_margin/n_words"} <= logs
    # evaluate() on a raw dataset scores its margins first
    metrics = trainer.evaluate(toy_preference_dataset(4, seed=2))
    assert math.isfinite(metrics["eval_loss"]) and "eval_margin/has_cat" in metrics


def test_conversational_data_trains(tokenizer, tmp_path):
    def reply_len(prompts, responses):
        assert isinstance(prompts[0], list) and isinstance(responses[0], list)  # the dataset's own messages
        return [float(len(r[0]["content"])) for r in responses]

    trainer = make_modpo(
        tokenizer,
        tmp_path,
        [0.7, 0.3],
        [reply_len],
        dataset=toy_preference_dataset(8, conversational=True),
        max_steps=2,
    )
    assert math.isfinite(trainer.train().training_loss)


def test_lora_adapter_saves_and_reloads_with_same_logps(tokenizer, tmp_path):
    trainer = make_modpo(
        tokenizer, tmp_path, [0.6, 0.4], [n_words], peft=True, max_steps=3, learning_rate=5e-2
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    batch = trainer.data_collator(first_examples(trainer))
    trained = trainer.model.eval()
    with torch.no_grad():
        before = sequence_logps(trained, batch)
        with trained.disable_adapter():
            base_logps = sequence_logps(trained, batch)
    reloaded = PeftModel.from_pretrained(tiny_causal_lm(tokenizer), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        after = sequence_logps(reloaded, batch)
    assert torch.allclose(before, after, atol=1e-5)
    assert not torch.allclose(before, base_logps, atol=1e-3)  # the adapter learned something


def test_zscore_normalisation_scales_margins(tokenizer, tmp_path):
    data = toy_preference_dataset(8).map(lambda ex, i: {"c": 10.0 * i, "r": 0.0}, with_indices=True)
    raw = make_modpo(tokenizer, tmp_path / "raw", [0.5, 0.5], [ColumnReward("c", "r")], dataset=data)
    z = make_modpo(
        tokenizer,
        tmp_path / "z",
        [0.5, 0.5],
        [ColumnReward("c", "r")],
        dataset=data,
        margin_normalization="zscore",
    )
    raw_c = torch.tensor(raw.train_dataset["chosen_margin_rewards"])
    z_c = torch.tensor(z.train_dataset["chosen_margin_rewards"])
    values = torch.tensor([10.0 * i for i in range(8)] + [0.0] * 8)
    assert torch.allclose(raw_c[:, 0], values[:8])
    assert torch.allclose(z_c[:, 0], values[:8] / values.std(unbiased=False), atol=1e-5)
