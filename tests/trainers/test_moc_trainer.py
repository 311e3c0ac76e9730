"""MOCTrainer: conditioned prompts, the loss (vertex = DPO, one objective with pairs = MODPO, hand computations),
every solver end to end with a reloadable adapter, the weighted solve following the preference, adapter
conditioning (per-row gates, save / load, vertices), preference augmentation, and bad input."""

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, IterableDataset
from peft import LoraConfig, PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer

from modpo_trl import MODPOConfig, MODPOTrainer
from modpo_trl.conditioning.preference import condition_prompt, render_preference
from modpo_trl.conditioning.svd_lora import (
    PreferenceLoRA,
    load_preference_adapter,
    preference,
    saved_conditioning,
)
from modpo_trl.rewards.scorers import text_of
from modpo_trl.rewards.sources import sequence_logps
from modpo_trl.testing import CHAT_TEMPLATE, SPECIAL, WORDS, tiny_causal_lm, toy_preference_dataset
from modpo_trl.trainers.moc_config import PAIR_LOSS_TYPES, MOCConfig
from modpo_trl.trainers.moc_trainer import (
    CONTROL_VARIANCE_FLOOR,
    MOCTrainer,
    PairGroupSampler,
    margin_adjusted_rewards,
    moc_losses,
    objective_pairs,
    pair_losses,
    paired_control_loss,
    zscore_control_loss,
)

from .test_modpo_evaluate import strict_backbone

REPO = Path(__file__).resolve().parents[2]

NAMES = ["kind", "safe", "short"]  # kind and safe have pairs, short only a reward (its margin)
COMMON = dict(
    per_device_train_batch_size=4,
    per_device_eval_batch_size=4,
    report_to="none",
    save_strategy="no",
    use_cpu=True,
    bf16=False,
    disable_tqdm=True,
    seed=0,
)
# MOC with the paper's settings, which most tests below were written for; the measured defaults have their own test.
PAPER = dict(
    conditioning="prompt",
    preference_sampling="dirichlet",
    preference_augmentation=1,
    control_loss="zscore",
    moo_solver="mgda",
)
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
MOC_ARGS = dict(output_dir="unused", objective_names=NAMES, use_cpu=True, **PAPER)


def preference_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny WordLevel tokenizer plus what a rendered preference needs: digits, punctuation, a system role."""
    roles = ["<|system|>", "<|user|>", "<|assistant|>"]
    extra = ["Preference", "weights", ":", "=", ",", ".", *"0123456789"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(SPECIAL + roles + WORDS + extra))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=roles,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture
def tok():
    return preference_tokenizer()


def n_words(prompts, responses):
    return [float(len(text_of(r).split())) for r in responses]


def pairs(conversational=False, n=8):
    return objective_pairs(
        {
            "kind": toy_preference_dataset(n, seed=0, conversational=conversational),
            "safe": toy_preference_dataset(n, seed=1, conversational=conversational),
        }
    )


def make_moc(tok, tmp_path, data=None, model=None, ref_model=None, margins=None, peft=False, **kwargs):
    args = MOCConfig(
        **{**COMMON, **PAPER, "output_dir": str(tmp_path / "moc"), "objective_names": NAMES, **kwargs}
    )
    return MOCTrainer(
        model=model or tiny_causal_lm(tok),
        ref_model=ref_model,
        args=args,
        train_dataset=data if data is not None else pairs(),
        processing_class=tok,
        margin_rewards={"short": n_words} if margins is None else margins,
        peft_config=LoraConfig(**LORA) if peft else None,
    )


def despace(text):
    return "".join(text.split())


@pytest.mark.parametrize("conversational", [False, True])
def test_every_prompt_is_tokenised_with_its_own_rendered_preference(tok, tmp_path, conversational):
    trainer = make_moc(tok, tmp_path, pairs(conversational), peft=True)
    rows = trainer.train_dataset
    assert len({tuple(w) for w in rows["preference"]}) > 10  # one draw per example
    for row in rows:
        decoded = tok.decode(row["prompt_ids"])
        assert despace(render_preference(row["preference"], NAMES)) in despace(decoded)
        assert decoded.startswith("<|system|> Preference" if conversational else "Preference")
        assert NAMES[row["objective_id"]] == row["objective"]


def dpo_loss_and_grads(model, ref_model, rows, tok, tmp_path, **fields):
    dpo = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=DPOConfig(**{**COMMON, **fields}, output_dir=str(tmp_path / "dpo")),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    batch = dpo.data_collator([dpo.train_dataset[i] for i in range(len(rows))])
    loss = dpo.compute_loss(dpo.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in dpo.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("solver", ["linear", "mgda"])
def test_vertex_preference_is_dpo_on_that_objectives_pairs(tok, tmp_path, solver):
    """Every w = e_kind (a grid with the other vertices held out): pairs of `safe` weigh nothing, the margin of
    `short` vanishes, the control loss has no signal, and the loss and gradients are TRL's DPO on kind's pairs."""
    policy, ref = tiny_causal_lm(tok, seed=1), tiny_causal_lm(tok, seed=2)  # log-ratios far from 0
    trainer = make_moc(
        tok,
        tmp_path,
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(ref),
        preference_sampling="grid",
        grid_steps=1,
        heldout_preferences=[[0, 1, 0], [0, 0, 1]],
        moo_solver=solver,
    )
    data = trainer.train_dataset
    assert set(map(tuple, data["preference"])) == {(1.0, 0.0, 0.0)}
    rows = assert_vertex_step_is_dpo(trainer, policy, ref, tok, tmp_path)
    raw = pairs()
    assert [r["prompt"] for r in rows if r["objective"] == "kind"] == [
        condition_prompt(raw[i]["prompt"], [1, 0, 0], NAMES) for i in (0, 1, 2)
    ]


def assert_vertex_step_is_dpo(trainer, policy, ref, tok, tmp_path, **fields):
    """MOC's step on pairs of kind and safe at w = e_kind is TRL's DPO (loss and gradients) on kind's pairs."""
    rows = [trainer.train_dataset[i] for i in (0, 8, 1, 9, 2, 10)]  # kind, safe, kind, safe, ...
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    loss.backward()
    raw = pairs()
    kind_rows = [
        {
            "prompt": condition_prompt(raw[i]["prompt"], [1, 0, 0], NAMES),
            "chosen": raw[i]["chosen"],
            "rejected": raw[i]["rejected"],
        }
        for i in (0, 1, 2)
    ]
    expected_loss, expected_grads = dpo_loss_and_grads(
        copy.deepcopy(policy), copy.deepcopy(ref), kind_rows, tok, tmp_path, **fields
    )
    assert abs(expected_loss.item() - math.log(2)) > 1e-3  # not the trivial value at pi == pi_ref
    torch.testing.assert_close(loss.detach(), expected_loss)
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-4)
    return rows


def test_one_objective_with_pairs_is_modpo_at_every_preference(tok, tmp_path):
    """Pairs of `kind` and the margin of `short`, w = (0.7, 0.3) on every row: the linear loss without control is
    MODPO's loss with weights (0.7, 0.3) on the same conditioned prompts."""
    names, w = ["kind", "short"], [0.7, 0.3]
    policy, ref = tiny_causal_lm(tok, seed=1), tiny_causal_lm(tok, seed=2)
    raw = toy_preference_dataset(6, seed=0)
    data = objective_pairs({"kind": raw}).add_column("preference", [w] * 6)
    moc = MOCTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(ref),
        args=MOCConfig(
            **{**COMMON, **PAPER, "moo_solver": "linear"},
            output_dir=str(tmp_path / "m"),
            objective_names=names,
            control_weight=0,
        ),
        train_dataset=data,
        processing_class=tok,
        margin_rewards={"short": n_words},
    )
    conditioned = raw.map(lambda r: {"prompt": condition_prompt(r["prompt"], w, names)})
    modpo = MODPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(ref),
        args=MODPOConfig(**COMMON, output_dir=str(tmp_path / "p"), weights=w),
        train_dataset=conditioned,
        processing_class=tok,
        margin_rewards=[n_words],
    )
    rows = list(range(6))
    moc_loss = moc.compute_loss(moc.model, moc.data_collator([moc.train_dataset[i] for i in rows]))
    modpo_loss = modpo.compute_loss(modpo.model, modpo.data_collator([modpo.train_dataset[i] for i in rows]))
    torch.testing.assert_close(moc_loss, modpo_loss)


def test_loss_matches_hand_computation():
    beta = 0.1
    delta = [0.5, -1.0, 2.0, 0.3, 1.2]
    w = [[0.6, 0.1, 0.3], [0.2, 0.2, 0.6], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]]
    ids = [0, 0, 1, 1, 1]
    dr = [1.0, -2.0, 0.5, 3.0, 0.0]  # margin of objective 2 (no pairs)
    has_pairs = torch.tensor([True, True, False])
    chosen, rejected, _ = margin_adjusted_rewards(
        torch.tensor(delta) + 1.5,  # only the chosen-minus-rejected log-ratio enters the sigmoid loss
        torch.full((5,), 1.5),
        torch.tensor(w),
        torch.tensor([[0, 0, d] for d in dr]),
        has_pairs,
        beta,
    )
    per_pair = pair_losses(chosen, rejected, beta, (torch.ones(5), torch.ones(5)), MOCConfig(**MOC_ARGS))
    losses, linear = moc_losses(per_pair, torch.tensor(w), torch.tensor(ids), has_pairs)
    pair_loss, weight = [], []
    for b in range(5):
        mass = w[b][0] + w[b][1]
        t = max(mass, 0.01)
        z = (beta * delta[b] - w[b][2] * dr[b]) / t
        pair_loss.append(math.log1p(math.exp(-z)))
        weight.append(t * (w[b][ids[b]] / mass if mass > 0 else 0.5))
    assert weight[3] == pytest.approx(0.005)  # no weight on objectives with pairs: half the 0.01 floor each
    expected = {
        i: sum(weight[b] * pair_loss[b] for b in range(5) if ids[b] == i)
        / sum(weight[b] for b in range(5) if ids[b] == i)
        for i in (0, 1)
    }
    assert {i: v.item() for i, v in losses.items()} == pytest.approx(expected)
    mass = [sum(weight[b] for b in range(5) if ids[b] == i) for i in (0, 1)]
    assert linear == pytest.approx({0: mass[0] / sum(mass), 1: mass[1] / sum(mass)})


def test_control_loss_is_the_mse_of_z_scores():
    w = torch.tensor([[0.1, 0.9], [0.4, 0.6], [0.7, 0.3], [0.9, 0.1]])
    ids, has_pairs = torch.zeros(4, dtype=torch.long), torch.tensor([True, False])
    margins = torch.tensor(
        [[0.0, 1.0], [0.0, -1.0], [0.0, 1.0], [0.0, 0.0]]
    )  # last pair: no preference for 1
    achieved = torch.tensor([-1.0, 0.5, 1.0, 3.0])

    def z(x, floor=0.0):
        return (x - x.mean()) / (x.var(unbiased=False) + floor).sqrt()

    expected_0 = F.mse_loss(z(achieved, CONTROL_VARIANCE_FLOOR), z(w[:, 0]))
    oriented = achieved[:3] * torch.tensor([1.0, -1.0, 1.0])
    expected_1 = F.mse_loss(z(oriented, CONTROL_VARIANCE_FLOOR), z(w[:3, 1]))
    torch.testing.assert_close(
        zscore_control_loss(achieved, w, ids, margins, has_pairs), (expected_0 + expected_1) / 2
    )
    # rising with w: ~0; falling: ~4 (= 2 (1 - r)); one objective, constant w: no signal
    rising = torch.tensor([10.0, 40.0, 70.0, 90.0])
    no_margin = torch.zeros(4, 2)
    assert zscore_control_loss(rising, w, ids, no_margin, has_pairs).item() < 1e-4
    assert zscore_control_loss(-rising, w, ids, no_margin, has_pairs).item() == pytest.approx(4.0, abs=1e-3)
    assert zscore_control_loss(rising, torch.full((4, 2), 0.5), ids, no_margin, has_pairs) is None


@pytest.mark.parametrize("solver", ["linear", "mgda"])
def test_training_saves_one_adapter_that_takes_any_preference(tok, tmp_path, solver):
    trainer = make_moc(
        tok, tmp_path, peft=True, moo_solver=solver, max_steps=3, logging_steps=1, learning_rate=1e-2
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all(math.isfinite(entry["loss"]) for entry in logs)
    expected = {"rewards/margins", "logps/chosen", "moc/loss_kind", "moc/loss_safe", "moc/control"}
    expected |= {f"moc/alpha_{name}" for name in [*NAMES, "control"]}
    assert expected <= logs[-1].keys()
    assert logs[-1]["moc/alpha_short"] == 0.0  # a margin-only objective has no loss of its own
    alphas = [entry[f"moc/alpha_{n}"] for entry in logs for n in ("kind", "safe", "control")]
    assert min(alphas) >= 0 and all(
        sum(entry[f"moc/alpha_{n}"] for n in ("kind", "safe")) == pytest.approx(1.0)
        for entry in logs
        if solver == "linear"
    )
    trainer.save_model(str(tmp_path / "adapter"))

    base = tiny_causal_lm(tok)  # same seed as the trained policy's base
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    messages = [{"role": "user", "content": "write a short story"}]
    response = [{"role": "assistant", "content": "the cat sat on the mat"}]

    def logp(w):
        prompt = tok.apply_chat_template(condition_prompt(messages, w, NAMES), add_generation_prompt=True)
        full = tok.apply_chat_template(condition_prompt(messages, w, NAMES) + response)
        prompt, full = prompt["input_ids"], full["input_ids"]
        mask = torch.tensor([[0] * len(prompt) + [1] * (len(full) - len(prompt))])
        ids = torch.tensor([full])
        with torch.no_grad():
            return sequence_logps(
                model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask}
            )

    a, b = logp([0.8, 0.1, 0.1]), logp([0.1, 0.1, 0.8])
    assert torch.isfinite(a) and torch.isfinite(b) and not torch.allclose(a, b)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            dict(preference_sampling="uniform"),
            r"preference_sampling='uniform' is not valid; valid: \['dirichlet', 'grid'\]",
        ),
        (
            dict(moo_solver="pcgrad"),
            r"moo_solver='pcgrad' is not valid; valid: \['weighted_mgda', 'mgda', 'linear'\]",
        ),
        (
            dict(heldout_preferences=[[0.5, 0.5]]),
            r"heldout_preferences\[0\]=\[0.5, 0.5\] must be a list of 3 numbers",
        ),
        (
            dict(heldout_preferences=[[0.5, 0.5, 0.5]]),
            r"heldout_preferences\[0\]=\[0.5, 0.5, 0.5\] sums to 1.5",
        ),
        (dict(objective_names=["kind"]), r"objective_names=\['kind'\] must list at least 2 objectives"),
        (dict(dirichlet_alpha=0), r"dirichlet_alpha=0 must be a finite number > 0"),
        (dict(control_weight=-1.0), r"control_weight=-1.0 must be a finite number >= 0"),
        (dict(grid_steps=0), r"grid_steps=0 must be an integer >= 1"),
        (dict(preference_rank=0), r"preference_rank=0 must be an integer >= 1"),
        (dict(preference_augmentation=1.5), r"preference_augmentation=1.5 must be an integer >= 1"),
        (
            dict(conditioning="lora"),
            r"conditioning='lora' is not valid; valid: \['auto', 'adapter', 'prompt', 'both'\]",
        ),
        (dict(control_loss="mse"), r"control_loss='mse' is not valid; valid: \['zscore', 'paired'\]"),
        (dict(mgda_normalization="loss"), r"mgda_normalization='loss' is not valid; valid: \['l2', 'none'\]"),
        (
            dict(loss_type="aot"),
            r"loss_type=\['aot'\] is not supported by MOC: \['aot'\] are not functions of one",
        ),
        (dict(loss_type=["sigmoid", "sft"]), r"\['sft'\] are not functions of one pair's implicit rewards"),
        (
            dict(f_divergence_type="js_divergence"),
            r"f_divergence_type='js_divergence' is not supported by MOC",
        ),
        (
            dict(margin_scoring="per_batch", margin_normalization="zscore"),
            "margin_normalization='zscore' needs",
        ),
    ],
)
def test_config_errors_name_the_field(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        MOCConfig(**{**COMMON, **PAPER, "output_dir": str(tmp_path), "objective_names": NAMES, **kwargs})


def test_data_errors_name_the_problem(tok, tmp_path):
    with pytest.raises(ValueError, match=r"objective\(s\) \['short'\] have no pairs in train_dataset"):
        make_moc(tok, tmp_path, margins={})
    with pytest.raises(
        ValueError, match=r"margin_rewards has objective\(s\) \['long'\] not in objective_names"
    ):
        make_moc(tok, tmp_path, margins={"short": n_words, "long": n_words})
    with pytest.raises(
        ValueError, match=r"train_dataset has pairs for \['safe'\], which also have a margin reward"
    ):
        make_moc(tok, tmp_path, margins={"short": n_words, "safe": n_words})
    with pytest.raises(ValueError, match=r"column 'objective' has value\(s\) \['helpful'\]; valid: \['kind'"):
        make_moc(tok, tmp_path, data=objective_pairs({"helpful": toy_preference_dataset(4)}))
    with pytest.raises(ValueError, match=r"train_dataset is missing column\(s\) \['objective'\]"):
        make_moc(tok, tmp_path, data=toy_preference_dataset(4))
    fixed = pairs(n=2).add_column("preference", [[0.5, 0.5, 0.5]] * 4)
    with pytest.raises(ValueError, match=r"train_dataset\[0\]\['preference'\]=\[0.5, 0.5, 0.5\] sums to 1.5"):
        make_moc(tok, tmp_path, data=fixed)


# --------------------------------------------------------------------------- TRL's loss types and data forms
@pytest.mark.parametrize(
    "loss_type", [*(t for t in PAIR_LOSS_TYPES if t != "sigmoid"), ("sigmoid", "ipo")], ids=str
)
def test_vertex_preference_is_dpo_for_every_pair_loss_type(tok, tmp_path, loss_type):
    """At w = e_kind every TRL loss type MOC admits is TRL's DPO loss (and gradients) on kind's pairs."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    fields = {"loss_type": types, "beta": 0.5}
    fields |= {"loss_weights": [1.0, 0.3]} if len(types) > 1 else {}
    fields |= {"label_smoothing": 1e-3 if "exo_pair" in types else 0.1}
    policy, ref = tiny_causal_lm(tok, seed=1), tiny_causal_lm(tok, seed=2)
    data = pairs().add_column("preference", [[1.0, 0.0, 0.0]] * 16)
    trainer = make_moc(
        tok,
        tmp_path,
        data=data,
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(ref),
        moo_solver="linear",
        **fields,
    )
    assert_vertex_step_is_dpo(trainer, policy, ref, tok, tmp_path, **fields)


def implicit(data):
    """Whole conversations in chosen/rejected, no prompt column."""
    return data.map(
        lambda r: {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]},
        remove_columns=["prompt"],
    )


def test_implicit_prompts_and_streams_are_prepared_like_explicit_data(tok, tmp_path):
    explicit = pairs(conversational=True)
    fixed = explicit.add_column("preference", [[0.5, 0.2, 0.3]] * len(explicit))
    reference = make_moc(tok, tmp_path / "e", data=fixed, peft=True)
    columns = ["prompt_ids", "chosen_ids", "rejected_ids", "preference", "objective_id"]
    for data in (implicit(fixed), fixed.to_iterable_dataset(), implicit(fixed).to_iterable_dataset()):
        trainer = make_moc(tok, tmp_path / "o", data=data, peft=True, max_steps=1)
        rows = list(trainer.train_dataset) if isinstance(data, IterableDataset) else trainer.train_dataset
        for got, want in zip(rows, reference.train_dataset, strict=True):
            assert {c: got[c] for c in columns} == {c: want[c] for c in columns}
    # A stream without preferences draws each row's own, reproducibly from the seed and the row's index.
    drawn = [
        make_moc(tok, tmp_path / "s", data=explicit.to_iterable_dataset(), peft=True, max_steps=1)
        for _ in range(2)
    ]
    first, second = ([row["preference"] for row in t.train_dataset] for t in drawn)
    assert first == second and len({tuple(w) for w in first}) > 10


def test_a_stream_trains_and_evaluates_with_margins_scored_per_batch(tok, tmp_path):
    trainer = make_moc(
        tok, tmp_path, data=pairs().to_iterable_dataset(), peft=True, max_steps=2, logging_steps=1
    )
    assert math.isfinite(trainer.train().training_loss)
    metrics = trainer.evaluate(pairs(n=2).to_iterable_dataset())
    assert math.isfinite(metrics["eval_loss"])
    bad = objective_pairs({"helpful": toy_preference_dataset(4)}).to_iterable_dataset()
    with pytest.raises(ValueError, match=r"row 0 has objective='helpful', which is unknown"):
        trainer.evaluate(bad)


def test_per_batch_margins_give_the_precomputed_loss(tok, tmp_path):
    data = pairs().add_column("preference", [[0.4, 0.3, 0.3]] * 16)
    losses = []
    for scoring in ("precompute", "per_batch"):
        trainer = make_moc(tok, tmp_path / scoring, data=data, peft=True, margin_scoring=scoring)
        rows = [trainer.train_dataset[i] for i in range(6)]
        losses.append(trainer.compute_loss(trainer.model, trainer.data_collator(rows)))
    torch.testing.assert_close(losses[1], losses[0])


@pytest.mark.parametrize("precompute", [False, True])
def test_evaluate_passes_only_model_inputs_to_the_model(tok, tmp_path, precompute):
    """TRL's reference precompute in `evaluate()` collates with MOC's collator: preferences, objective ids and
    margins must not reach `forward` (a model without `**kwargs` would raise)."""
    trainer = make_moc(
        tok,
        tmp_path,
        model=strict_backbone(tiny_causal_lm(tok)),
        peft=True,
        precompute_ref_log_probs=precompute,
    )
    assert math.isfinite(trainer.evaluate(pairs(n=2))["eval_loss"])


def two_objective_moc(tok, tmp_path, w, **kwargs):
    """`kind` and `safe` pairs, no margins, every row at the fixed preference `w`."""
    data = objective_pairs(
        {"kind": toy_preference_dataset(4, seed=0), "safe": toy_preference_dataset(4, seed=1)}
    ).add_column("preference", [w] * 8)
    args = MOCConfig(
        **{
            **COMMON,
            **PAPER,
            "output_dir": str(tmp_path / "m"),
            "objective_names": ["kind", "safe"],
            **kwargs,
        }
    )
    return MOCTrainer(
        model=tiny_causal_lm(tok, seed=1),
        ref_model=tiny_causal_lm(tok, seed=2),
        args=args,
        train_dataset=data,
        processing_class=tok,
    )


@pytest.mark.parametrize("solver", ["mgda", "weighted_mgda", "linear"])
def test_batches_with_different_preferences_get_different_updates(tok, tmp_path, solver):
    """The issue's example: every row at (0.9, 0.1), then every row at (0.1, 0.9). The two objectives' losses are on
    disjoint pairs, so plain MGDA splits the update ~50/50 both times; the weighted solve and the linear
    combination follow the preference."""
    alphas = []
    for w in ([0.9, 0.1], [0.1, 0.9]):
        trainer = two_objective_moc(tok, tmp_path, w, moo_solver=solver, control_weight=0.0)
        trainer.model.train()
        rows = [trainer.train_dataset[i] for i in range(8)]
        trainer.compute_loss(trainer.model, trainer.data_collator(rows)).backward()
        alphas.append(trainer._metrics["train"]["moc/alpha_kind"][-1])
    if solver == "mgda":
        assert alphas[0] == pytest.approx(0.5, abs=0.15) and alphas[1] == pytest.approx(0.5, abs=0.15)
    else:
        assert alphas[0] > 0.75 and alphas[1] < 0.25
    if solver == "linear":
        assert alphas == pytest.approx([0.9, 0.1])


def test_paired_control_loss_matches_hand_computation():
    achieved = torch.tensor([0.5, 0.2, -0.1, 0.4, 1.0])
    w = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.5, 0.5], [0.1, 0.9], [0.6, 0.4]])
    ids = torch.tensor([0, 0, 0, 0, 1])  # objective 1 has no pairs: its margin orients the pair
    pairs_ = torch.tensor([7, 7, 3, 3, 9])  # rows 0/1 and 2/3 are copies of one pair each; row 4 alone
    margins = torch.tensor([[0, 2.0], [0, 2.0], [0, -1.0], [0, -1.0], [0, 5.0]])
    has_pairs = torch.tensor([True, False])
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    terms = [  # (weight w_a,i - w_b,i, -log sigmoid(s (m_a - m_b)))
        (0.8 - 0.3, softplus(-(0.5 - 0.2))),  # objective 0, pair 7: row 0 weighs it more
        (0.7 - 0.2, softplus(-(0.2 - 0.5))),  # objective 1 (margin +2): row 1 weighs it more
        (0.5 - 0.1, softplus(-(-0.1 - 0.4))),  # objective 0, pair 3
        (0.9 - 0.5, softplus(+(0.4 - -0.1))),  # objective 1 (margin -1): the margin should fall as w_1 rises
    ]
    expected = sum(a * b for a, b in terms) / sum(a for a, _ in terms)
    got = paired_control_loss(achieved, w, ids, pairs_, margins, has_pairs)
    assert got.item() == pytest.approx(expected)
    alone = paired_control_loss(achieved, w, ids, torch.arange(5), margins, has_pairs)
    assert alone is None  # no pair seen twice: no signal


def test_augmentation_sees_every_pair_at_distinct_grid_points_in_one_batch(tok, tmp_path):
    trainer = make_moc(
        tok,
        tmp_path,
        peft=True,
        preference_sampling="grid",
        grid_steps=2,
        preference_augmentation=3,
        heldout_preferences=[[0.5, 0.5, 0.0]],
        control_loss="paired",
        per_device_train_batch_size=6,
    )
    data = trainer.train_dataset
    assert len(data) == 3 * 16
    for start in range(0, len(data), 3):
        copies = data.select(range(start, start + 3))
        assert len(set(copies["pair_index"])) == 1 and len(set(copies["objective"])) == 1
        assert len({tuple(w) for w in copies["preference"]}) == 3  # distinct points
        assert [0.5, 0.5, 0.0] not in copies["preference"]
    batches = list(trainer.get_train_dataloader())
    for batch in batches:
        pair_ids = batch["pair_index"].tolist()
        assert pair_ids[:3] == [pair_ids[0]] * 3 and pair_ids[3:] == [pair_ids[3]] * 3
    seen = [p for b in batches for p in b["pair_index"].tolist()]
    assert sorted(seen) == sorted(data["pair_index"]) and seen != sorted(seen)  # every row once, shuffled
    sampler = PairGroupSampler(data["pair_index"], seed=0)
    assert list(sampler) == list(PairGroupSampler(data["pair_index"], seed=0))
    sampler.set_epoch(1)
    assert list(sampler) != list(PairGroupSampler(data["pair_index"], seed=0))
    with pytest.raises(
        ValueError, match=r"preference_augmentation=4 copies need as many distinct grid points"
    ):
        make_moc(tok, tmp_path, preference_sampling="grid", grid_steps=1, preference_augmentation=4)


@pytest.mark.parametrize("conditioning", ["adapter", "both"])
def test_adapter_conditioning_trains_saves_and_loads_at_any_preference(tok, tmp_path, conditioning):
    trainer = make_moc(
        tok,
        tmp_path,
        peft=True,
        conditioning=conditioning,
        preference_rank=1,  # LoRA r=4: 1 shared unit + 1 per objective
        moo_solver="weighted_mgda",
        preference_augmentation=2,
        control_loss="paired",
        max_steps=3,
        logging_steps=1,
        learning_rate=1e-2,
    )
    decoded = tok.decode(trainer.train_dataset[0]["prompt_ids"])
    assert ("Preference" in decoded) == (conditioning == "both")
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all(math.isfinite(entry["loss"]) for entry in logs)
    assert "moc/control" in logs[-1]
    trainer.save_model(str(tmp_path / "adapter"))
    assert PreferenceLoRA.load(tmp_path / "adapter") == PreferenceLoRA(tuple(NAMES), 1, 1)
    assert saved_conditioning(tmp_path / "adapter") == conditioning

    model = load_preference_adapter(tiny_causal_lm(tok), tmp_path / "adapter").eval()
    messages = [{"role": "user", "content": "write a short story"}]
    response = [{"role": "assistant", "content": "the cat sat on the mat"}]

    def logp(w):
        conversation = condition_prompt(messages, w, NAMES) if conditioning == "both" else messages
        prompt = tok.apply_chat_template(conversation, add_generation_prompt=True)["input_ids"]
        full = tok.apply_chat_template(conversation + response)["input_ids"]
        mask = torch.tensor([[0] * len(prompt) + [1] * (len(full) - len(prompt))])
        ids = torch.tensor([full])
        with torch.no_grad(), preference(model, w):
            return sequence_logps(
                model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask}
            )

    a, b = logp([0.8, 0.1, 0.1]), logp([0.1, 0.1, 0.8])
    assert torch.isfinite(a) and torch.isfinite(b) and not torch.allclose(a, b)


def test_adapter_conditioning_at_a_vertex_trains_only_that_objectives_units(tok, tmp_path):
    """Every w = e_kind: the units of `safe` and `short` are gated to 0, so their columns of every lora_B get no
    gradient, while the shared units and kind's do."""
    trainer = make_moc(
        tok,
        tmp_path,
        peft=True,
        conditioning="adapter",
        preference_rank=1,
        preference_sampling="grid",
        grid_steps=1,
        heldout_preferences=[[0, 1, 0], [0, 0, 1]],
    )
    rows = [trainer.train_dataset[i] for i in (0, 1, 2, 8)]
    trainer.compute_loss(trainer.model, trainer.data_collator(rows)).backward()
    grads = [p.grad for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert grads and all(g.shape[1] == 4 for g in grads)
    assert all((g[:, 2:] == 0).all() for g in grads)  # safe's and short's units
    assert all(g[:, :2].abs().sum() > 0 for g in grads)  # shared and kind


def test_adapter_conditioning_needs_a_lora_of_sufficient_rank(tok, tmp_path):
    with pytest.raises(ValueError, match=r"conditioning='adapter' gates a LoRA adapter by the preference"):
        make_moc(tok, tmp_path, conditioning="adapter")
    with pytest.raises(ValueError, match=r"rank r=4 cannot give 3 objectives preference_rank=2 units each"):
        make_moc(tok, tmp_path, peft=True, conditioning="adapter", preference_rank=2)


def test_adapter_conditioning_scores_each_pairs_reference_once(tok, tmp_path, monkeypatch):
    """The copies of a pair share their tokens under adapter conditioning: the reference runs on each pair once and
    every copy gets the log-probs the reference gives that pair."""
    scored_rows = []
    original = MOCTrainer.compute_ref_log_probs

    def counting(self, model, inputs):
        scored_rows.append(inputs["input_ids"].size(0) // 2)
        return original(self, model, inputs)

    monkeypatch.setattr(MOCTrainer, "compute_ref_log_probs", counting)
    trainer = make_moc(
        tok,
        tmp_path,
        peft=True,
        conditioning="adapter",
        preference_rank=1,
        preference_sampling="grid",
        grid_steps=2,
        preference_augmentation=3,
        precompute_ref_log_probs=True,
    )
    data = trainer.train_dataset
    assert sum(scored_rows) == len(set(data["pair_index"])) == len(data) // 3
    batch = trainer.data_collator([data[i] for i in range(len(data))])
    with torch.no_grad():
        chosen, rejected = original(
            trainer, trainer.model, {k: v for k, v in batch.items() if "ref_" not in k}
        )
    assert torch.allclose(torch.tensor(data["ref_chosen_logps"]), chosen, atol=1e-4)
    assert torch.allclose(torch.tensor(data["ref_rejected_logps"]), rejected, atol=1e-4)


@pytest.mark.parametrize("peft", [True, False])
def test_default_conditioning_is_the_adapter_when_one_is_trained(tok, tmp_path, peft):
    """MOCConfig's defaults (the measured best): a LoRA adapter split into one gated block per objective, every pair
    under 2 grid preferences with the paired control loss; a fully fine-tuned model is told w in its prompt."""
    args = MOCConfig(output_dir=str(tmp_path / "moc"), objective_names=NAMES, use_cpu=True, report_to="none")
    assert (args.conditioning, args.preference_rank, args.moo_solver) == ("auto", None, "linear")
    assert (args.preference_sampling, args.preference_augmentation, args.control_loss) == (
        "grid",
        2,
        "paired",
    )
    trainer = MOCTrainer(
        model=tiny_causal_lm(tok),
        ref_model=None if peft else tiny_causal_lm(tok),
        args=args,
        train_dataset=pairs(),
        processing_class=tok,
        margin_rewards={"short": n_words},
        peft_config=LoraConfig(**{**LORA, "r": 7}) if peft else None,
    )
    assert trainer.args.conditioning == ("adapter" if peft else "prompt")
    decoded = tok.decode(trainer.train_dataset[0]["prompt_ids"])
    assert ("Preference" in decoded) != peft
    if peft:  # r=7 over 3 objectives: 2 units each, 1 left shared
        assert trainer.preference_layout == PreferenceLoRA(tuple(NAMES), 1, 2)
    assert len(trainer.train_dataset) == 2 * 16
