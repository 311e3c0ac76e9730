"""MODPOTrainer as a drop-in for TRL's DPOTrainer.

1. Without margin rewards (`weights=[1.0]`), `MODPOTrainer` and `DPOTrainer` side by side over every loss type,
   every f-divergence, standard / conversational / implicit-prompt data, `Dataset` / `IterableDataset`, with and
   without LoRA and precomputed reference log-probs: equal first-step losses and gradients. The default run covers
   each axis fully against a base case; the full cross product is `@pytest.mark.slow`.
2. With margin rewards, every loss type against its formula written out by hand on MODPO's margin-adjusted rewards.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

from modpo_trl import ColumnReward, MODPOConfig, MODPOTrainer
from modpo_trl.rewards.sources import sequence_logps
from modpo_trl.testing import tiny_causal_lm, toy_preference_dataset
from modpo_trl.trainers.moc_config import PAIR_LOSS_TYPES

from .test_modpo_trainer import COMMON as MODPO_COMMON

# One step by hand; a streaming train set needs max_steps, and the stream's order is the data's, so the map-style
# sets are read in order too.
COMMON = {**MODPO_COMMON, "max_steps": 1, "train_sampling_strategy": "sequential"}
del COMMON["output_dir"]  # each trainer gets its own
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])

# Every TRL loss type: those of one pair's implicit rewards (as MOC splits them), the batch-level ones, a list.
LOSS_TYPES = [*PAIR_LOSS_TYPES, "aot", "aot_unpaired", "sft", ("sigmoid", "sft")]
# TRL: the f-DPO reparameterisation only holds for losses of the chosen-minus-rejected difference.
F_DIVERGENCE_LOSSES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
F_DIVERGENCES = ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
FORMS = ["standard", "conversational", "implicit"]


def loss_fields(loss_type) -> dict:
    """Config fields for a loss type (or a list of them), with the options TRL requires or that make it bite."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    fields = {"loss_type": types, "beta": 0.3}
    if len(types) > 1:
        fields["loss_weights"] = [1.0, 0.5]
    if "exo_pair" in types:
        fields["label_smoothing"] = 1e-3  # TRL requires > 0
    if {"robust", "aot", "aot_unpaired"} & set(types):
        fields["label_smoothing"] = 0.1
    return fields


def preference_data(form: str, n: int = 8, seed: int = 0) -> Dataset:
    if form == "standard":
        return toy_preference_dataset(n, seed=seed)
    data = toy_preference_dataset(n, seed=seed, conversational=True)
    if form == "implicit":  # whole conversations in chosen/rejected: TRL extracts the shared prompt
        data = data.map(
            lambda r: {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]},
            remove_columns=["prompt"],
        )
    return data


@pytest.fixture(scope="module")
def base_model(tokenizer):
    return tiny_causal_lm(tokenizer, seed=1)


@pytest.fixture(scope="module")
def tokenizer():
    from modpo_trl.testing import tiny_tokenizer

    return tiny_tokenizer()


def build(
    trainer_cls,
    config_cls,
    base_model,
    tokenizer,
    tmp_path,
    data,
    lora=False,
    precompute=False,
    eval_dataset=None,
    **fields,
):
    """A trainer of `base_model`'s copy; `fields` are config fields, or MODPO's `margin_rewards`."""
    extra = {"margin_rewards": fields.pop("margin_rewards")} if "margin_rewards" in fields else {}
    return trainer_cls(
        model=copy.deepcopy(base_model),
        ref_model=None if (lora or precompute) else copy.deepcopy(base_model),
        args=config_cls(
            output_dir=str(tmp_path / trainer_cls.__name__),
            precompute_ref_log_probs=precompute,
            **{**COMMON, **fields},
        ),
        train_dataset=data,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA) if lora else None,
        **extra,
    )


def first_step(trainer):
    """The loss of the first training batch (as the dataloader gives it) and the gradients it leaves."""
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad and p.grad is not None}
    return batch["input_ids"], loss.detach(), grads


def assert_same_first_step(
    base_model, tokenizer, tmp_path, loss_type, f_divergence, form, iterable, lora, precompute
):
    fields = loss_fields(loss_type)
    if f_divergence != "reverse_kl":
        fields["f_divergence_type"] = f_divergence
        fields["f_alpha_divergence_coef"] = 0.5
    data = preference_data(form)
    if iterable:
        data = data.to_iterable_dataset()
    dpo = build(DPOTrainer, DPOConfig, base_model, tokenizer, tmp_path, data, lora, precompute, **fields)
    ids_dpo, loss_dpo, grads_dpo = first_step(dpo)
    modpo = build(
        MODPOTrainer, MODPOConfig, base_model, tokenizer, tmp_path, data, lora, precompute, **fields
    )
    ids_modpo, loss_modpo, grads_modpo = first_step(modpo)

    assert torch.equal(ids_modpo, ids_dpo)
    assert torch.isfinite(loss_dpo)
    torch.testing.assert_close(loss_modpo, loss_dpo, rtol=0, atol=1e-6)
    assert grads_dpo and grads_modpo.keys() == grads_dpo.keys()
    for name, grad in grads_dpo.items():
        torch.testing.assert_close(grads_modpo[name], grad, rtol=0, atol=1e-6, msg=name)


BASE = dict(
    loss_type="sigmoid",
    f_divergence="reverse_kl",
    form="standard",
    iterable=False,
    lora=False,
    precompute=False,
)


def axis_cases():
    """The base case, and every value of each axis against it."""
    cases = [BASE]
    cases += [{**BASE, "loss_type": t} for t in LOSS_TYPES if t != "sigmoid"]
    cases += [{**BASE, "f_divergence": f} for f in F_DIVERGENCES if f != "reverse_kl"]
    cases += [{**BASE, "form": f} for f in FORMS if f != "standard"]
    cases += [{**BASE, "iterable": True}, {**BASE, "lora": True}, {**BASE, "precompute": True}]
    return cases


def full_cases():
    cases = []
    for loss_type, f_div, form, iterable, lora, precompute in itertools.product(
        LOSS_TYPES, F_DIVERGENCES, FORMS, [False, True], [False, True], [False, True]
    ):
        types = {loss_type} if isinstance(loss_type, str) else set(loss_type)
        if f_div != "reverse_kl" and not types <= F_DIVERGENCE_LOSSES:
            continue  # rejected by TRL alike (test_trl_checks_give_trl_errors)
        if iterable and precompute:
            continue  # rejected by TRL alike
        case = dict(loss_type=loss_type, f_divergence=f_div, form=form, iterable=iterable, lora=lora)
        case["precompute"] = precompute
        cases.append(case)
    return cases


def case_id(case):
    return "-".join(str(v) if not isinstance(v, bool) else (k if v else f"no_{k}") for k, v in case.items())


@pytest.mark.parametrize("case", axis_cases(), ids=case_id)
def test_without_margins_first_step_equals_dpo(base_model, tokenizer, tmp_path, case):
    assert_same_first_step(base_model, tokenizer, tmp_path, **case)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in full_cases() if c not in axis_cases()], ids=case_id)
def test_without_margins_first_step_equals_dpo_full_matrix(base_model, tokenizer, tmp_path, case):
    assert_same_first_step(base_model, tokenizer, tmp_path, **case)


def test_evaluation_on_dicts_of_datasets_and_streams_equals_dpo(base_model, tokenizer, tmp_path):
    """Evaluation sets given at construction (a dict of a Dataset and a stream) and one given to `evaluate()`."""
    evals = {"map": preference_data("conversational", seed=1), "stream": preference_data("implicit", seed=2)}
    evals["stream"] = evals["stream"].to_iterable_dataset()
    results = []
    for cls, config in ((DPOTrainer, DPOConfig), (MODPOTrainer, MODPOConfig)):
        trainer = build(
            cls,
            config,
            base_model,
            tokenizer,
            tmp_path,
            preference_data("conversational"),
            False,
            False,
            evals,
        )
        metrics = trainer.evaluate()
        metrics.update(
            trainer.evaluate(
                preference_data("implicit", seed=3).to_iterable_dataset(), metric_key_prefix="new"
            )
        )
        results.append({k: v for k, v in metrics.items() if "runtime" not in k and "per_second" not in k})
    dpo, modpo = results
    assert dpo.keys() == modpo.keys() and {"eval_map_loss", "eval_stream_loss", "new_loss"} <= dpo.keys()
    for key, value in dpo.items():
        assert modpo[key] == pytest.approx(value, abs=1e-6), key


def test_default_config_and_tags(base_model, tokenizer, tmp_path, monkeypatch):
    """`args=None` builds a default config (named after the model, as TRL does) with `weights=[1.0]`: DPO."""
    monkeypatch.chdir(tmp_path)
    # TRL's default config trains in bf16, which TrainingArguments refuses on a machine without a GPU.
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)
    data = preference_data("standard")
    dpo, modpo = (
        cls(
            model=copy.deepcopy(base_model),
            ref_model=copy.deepcopy(base_model),
            train_dataset=data,
            processing_class=tokenizer,
        )
        for cls in (DPOTrainer, MODPOTrainer)
    )
    assert type(modpo.args) is MODPOConfig and modpo.args.weights == [1.0]
    assert modpo.args.output_dir == dpo.args.output_dir.replace("-DPO", "-MODPO")
    assert set(dpo.model.model_tags) <= set(modpo.model.model_tags)
    assert {"modpo", "modpo_trl"} <= set(modpo.model.model_tags)
    batch = dpo.data_collator([dpo.train_dataset[i] for i in range(4)])
    losses = [t.compute_loss(t.model, dict(batch)) for t in (dpo, modpo)]
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-6)


def raised(make):
    with pytest.raises(Exception) as info:
        make()
    return type(info.value), str(info.value)


@pytest.mark.parametrize(
    "fields,iterable",
    [
        ({"loss_type": ["nca_pair"], "f_divergence_type": "js_divergence"}, False),
        ({"loss_type": ["exo_pair"], "label_smoothing": 0.0}, False),
        ({"loss_type": ["aot"], "use_weighting": True}, False),
        ({"precompute_ref_log_probs": True}, True),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, False),
    ],
    ids=[
        "f_divergence_with_nca",
        "exo_without_smoothing",
        "weighting_with_aot",
        "precompute_stream",
        "loss_weights",
    ],
)
def test_trl_checks_give_trl_errors(base_model, tokenizer, tmp_path, fields, iterable):
    data = preference_data("standard")
    data = data.to_iterable_dataset() if iterable else data

    def make(cls, config):
        return lambda: cls(
            model=copy.deepcopy(base_model),
            ref_model=copy.deepcopy(base_model),
            args=config(output_dir=str(tmp_path), **{**COMMON, **fields}),
            train_dataset=data,
            processing_class=tokenizer,
        )

    assert raised(make(MODPOTrainer, MODPOConfig)) == raised(make(DPOTrainer, DPOConfig))


# ------------------------------------------------------------------------------------------------ with margins
WEIGHTS = [0.6, 0.25, 0.15]


def margin_data(form: str = "standard") -> Dataset:
    """Pairs with two reward columns per response, of different offsets, so that a missing centring would show."""
    return preference_data(form).map(
        lambda r, i: {"a_c": 0.5 * i, "a_r": 2.0 - 0.3 * i, "b_c": 3.0 + (i % 3), "b_r": 5.0 - (i % 2)},
        with_indices=True,
    )


MARGINS = [ColumnReward("a_c", "a_r", name="a"), ColumnReward("b_c", "b_r", name="b")]


def hand_loss(loss_type: str, trainer, examples, batch) -> torch.Tensor:
    """TRL's formula for `loss_type` written on MODPO's margin-adjusted rewards, from independent pieces: our own
    log-prob code, the reference log-probs and the margin rewards stored on the rows."""
    args, w = trainer.args, torch.tensor(WEIGHTS)
    model = trainer.model
    with torch.no_grad():
        pi_c, pi_r = sequence_logps(model, batch).chunk(2)
    ref_c = torch.tensor([e["ref_chosen_logps"] for e in examples])
    ref_r = torch.tensor([e["ref_rejected_logps"] for e in examples])
    r_c = torch.tensor([[e["a_c"], e["b_c"]] for e in examples])
    r_r = torch.tensor([[e["a_r"], e["b_r"]] for e in examples])
    centre = (r_c + r_r) / 2
    # MODPO: h(y) = beta * log-ratio - w . r(y) (r centred on the pair), and the reward TRL's loss sees is h / w_0.
    R_c = (args.beta * (pi_c - ref_c) - (r_c - centre) @ w[1:]) / w[0]
    R_r = (args.beta * (pi_r - ref_r) - (r_r - centre) @ w[1:]) / w[0]
    b = args.beta / w[0]  # the loss's beta: R = b * (log-ratio), for the losses written on log-ratios
    lr_c, lr_r = R_c / b, R_r / b
    n_c, n_r = batch["completion_mask"].sum(1).float().chunk(2)
    eps = args.label_smoothing
    z = R_c - R_r
    if loss_type == "sigmoid":
        return -F.logsigmoid(z)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    if loss_type == "ipo":
        return (lr_c / n_c - lr_r / n_r - 1 / (2 * b)) ** 2
    if loss_type == "exo_pair":
        return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(eps)
        )
    if loss_type == "nca_pair":
        return -F.logsigmoid(R_c) - 0.5 * F.logsigmoid(-R_c) - 0.5 * F.logsigmoid(-R_r)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -F.logsigmoid(R_c) - F.logsigmoid(-R_r)
    if loss_type == "sppo_hard":
        return (lr_c - 0.5 / b) ** 2 + (lr_r + 0.5 / b) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":  # sorted policy log-ratio differences against the (margin-shifted) reference's
            policy = pi_c - pi_r
            delta = torch.sort(policy).values - torch.sort(policy - (lr_c - lr_r)).values
        else:
            delta = torch.sort(lr_c).values - torch.sort(lr_r).values
        return -F.logsigmoid(b * delta) * (1 - eps) - F.logsigmoid(-b * delta) * eps
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(R_c) + torch.sigmoid(R_r)
    if loss_type == "apo_down":
        return torch.sigmoid(R_c) + 1 - torch.sigmoid(z)
    if loss_type == "discopop":
        modulation = torch.sigmoid(z / args.discopop_tau)
        return -F.logsigmoid(z) * (1 - modulation) + torch.exp(-z) * modulation
    if loss_type == "sigmoid_norm":
        return -F.logsigmoid(b * (lr_c / n_c - lr_r / n_r))
    if loss_type == "sft":  # no rewards: the chosen responses' mean token log-likelihood
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
                :, :-1
            ]
        token_logps = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        mask = batch["completion_mask"][:, 1:].bool()
        chosen_tokens = token_logps.chunk(2)[0][mask.chunk(2)[0]]
        return -chosen_tokens.mean().expand(len(examples))
    raise AssertionError(loss_type)


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "sft"], ids=str)
def test_with_margins_every_loss_type_sees_the_margin_adjusted_rewards(
    base_model, tokenizer, tmp_path, loss_type
):
    fields = loss_fields(loss_type)
    trainer = build(
        MODPOTrainer,
        MODPOConfig,
        base_model,
        tokenizer,
        tmp_path,
        margin_data(),
        precompute=True,
        weights=WEIGHTS,
        margin_rewards=MARGINS,
        **fields,
    )
    trainer.model.eval()  # no dropout either way; eval mode keeps TRL's metrics under "eval"
    examples = [trainer.train_dataset[i] for i in range(8)]
    batch = trainer.data_collator(examples)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    weights = fields.get("loss_weights", [1.0])
    expected = sum(
        weight * hand_loss(t, trainer, examples, batch).mean()
        for t, weight in zip(fields["loss_type"], weights, strict=True)
    )
    torch.testing.assert_close(loss, expected, rtol=0, atol=2e-5)
