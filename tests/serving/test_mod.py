"""MOD decoding: the mixing rule against a hand computation, exact agreement with `model.generate` when all the
weight is on one adapter, one batched forward per token with the KV cache, and bad input."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import AuxiliaryTrainingWrapper
from transformers import GenerationConfig

from modpo_trl.generation import SamplingSettings, encode_prompt, generate_texts
from modpo_trl.serving.mod import MODDecoder, mix_log_probs, plain_lora, warpers
from modpo_trl.testing import tiny_causal_lm, tiny_tokenizer

PROMPTS = ["hello", "tell me a story about a big red dog", [{"role": "user", "content": "why"}]]


def adapters_p_and_q(**lora):
    """A tiny PeftModel with adapters "p" and "q" (random, large enough to change what it says), in eval mode."""
    tokenizer = tiny_tokenizer()
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **lora)
    model = get_peft_model(tiny_causal_lm(tokenizer, seed=0), LoraConfig(**config), adapter_name="p")
    model.add_adapter("q", LoraConfig(**config))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 2.0)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def two_adapters():
    return adapters_p_and_q(lora_dropout=0.05)  # dropout, which eval mode turns off


def batch(tokenizer, prompts):
    """Left-padded ids and mask, as `generate_texts` builds them."""
    rows = [encode_prompt(tokenizer, p) for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize(
    "settings",
    [
        SamplingSettings(max_new_tokens=8, do_sample=False, batch_size=3),
        SamplingSettings(max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9, batch_size=2, seed=3),
    ],
    ids=["greedy", "sampled"],
)
def test_all_weight_on_one_adapter_decodes_exactly_as_that_adapter(two_adapters, settings):
    """Both adapters run in the batch (the other at weight 0); padding, the cache, positions, sampling order
    and seeds are those of `model.generate`."""
    model, tokenizer = two_adapters
    for k, name in enumerate(["p", "q"]):
        model.set_adapter(name)
        expected = generate_texts(model, tokenizer, PROMPTS, settings)
        weights = [1.0 - k, float(k)]
        assert generate_texts(
            model, tokenizer, PROMPTS, settings, decode=MODDecoder(["p", "q"], weights)
        ) == (expected)
    model.set_adapter("p")
    assert (
        generate_texts(model, tokenizer, PROMPTS, settings) != expected
    )  # the adapters say different things


def test_mixed_distribution_is_the_hand_computed_geometric_mixture(two_adapters):
    """Every step's distribution is exp(0.3 log p_a + 0.7 log p_b) / Z, with p_a and p_b computed one adapter at
    a time on the whole sequence so far (no cache, no padding, no batching)."""
    model, tokenizer = two_adapters
    w = [0.3, 0.7]
    ids, mask = batch(tokenizer, PROMPTS[:2])
    config = GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    decoder = MODDecoder(["p", "q"], w, keep_scores=True)
    out = decoder(model, ids, mask, config)
    width = ids.shape[1]
    assert len(decoder.scores) == 4
    for row in range(2):
        prompt = ids[row][mask[row].bool()]
        for t, scores in enumerate(decoder.scores):
            sequence = torch.cat([prompt, out[row, width : width + t]])[None]
            probs = {}
            for name in ("p", "q"):
                model.set_adapter(name)
                with torch.no_grad():
                    probs[name] = torch.softmax(model(input_ids=sequence).logits[0, -1].double(), dim=-1)
            unnormalised = probs["p"] ** w[0] * probs["q"] ** w[1]
            expected = unnormalised / unnormalised.sum()
            assert torch.allclose(scores[row].double().exp(), expected, atol=1e-5)
            assert out[row, width + t] == expected.argmax()  # greedy picks the mixture's mode
            assert not torch.allclose(expected, probs["p"], atol=1e-3)
            assert not torch.allclose(expected, probs["q"], atol=1e-3)


def test_one_batched_forward_per_token_with_the_cache(two_adapters):
    model, tokenizer = two_adapters
    ids, mask = batch(tokenizer, PROMPTS)
    shapes = []
    hook = model.get_base_model().register_forward_hook(
        lambda module, args, kwargs, output: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        config = GenerationConfig(max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out = MODDecoder(["p", "q"], [0.5, 0.5])(model, ids, mask, config)
    finally:
        hook.remove()
    steps = out.shape[1] - ids.shape[1]
    # the prompt once, then one new token per step, for K = 2 copies of the batch of 3
    assert shapes == [(6, ids.shape[1])] + [(6, 1)] * (steps - 1)


def test_mix_log_probs_renormalises_and_drops_zero_weights():
    logits = torch.tensor([[[0.0, 1.0, 2.0]], [[float("-inf"), 0.0, 0.0]]])
    mixed = mix_log_probs(logits, torch.tensor([1.0, 0.0]))
    assert torch.allclose(mixed, torch.log_softmax(logits[0], dim=-1))  # no nan from 0 * -inf
    mixed = mix_log_probs(logits, torch.tensor([0.5, 0.5]))
    assert mixed[0, 0] == float("-inf") and torch.isclose(mixed.exp().sum(), torch.tensor(1.0))


def test_bad_input():
    with pytest.raises(
        ValueError, match=r"MOD weights=\[0.5, 0.6\] must be 2 finite numbers >= 0 summing to 1"
    ):
        MODDecoder(["a", "b"], [0.5, 0.6])
    with pytest.raises(ValueError, match="must be 2 finite numbers"):
        MODDecoder(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="needs at least one adapter"):
        MODDecoder([], [])
    config = copy.deepcopy(GenerationConfig(do_sample=True, repetition_penalty=1.3))
    with pytest.raises(ValueError, match=r"applies temperature, top_k and top_p only.*repetition_penalty"):
        warpers(config)
    assert len(warpers(GenerationConfig(do_sample=True, repetition_penalty=1.0))) == 1  # neutral: top_k 50


def test_plain_lora_layers_take_the_sliced_path_and_others_peft_mixed_batches(two_adapters):
    """Plain LoRA layers are routed by slicing the stacked batch; adapters that also train a module (here the LM
    head) go through peft's mixed-adapter batches, and decode exactly as `generate` does too."""
    assert plain_lora([m for m in two_adapters[0].modules() if isinstance(m, LoraLayer)], {"p", "q"})
    model, tokenizer = adapters_p_and_q(modules_to_save=["lm_head"])
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["q"].weight.mul_(3.0)  # q's own head
    layers = [m for m in model.modules() if isinstance(m, LoraLayer | AuxiliaryTrainingWrapper)]
    assert not plain_lora(layers, {"p", "q"})
    settings = SamplingSettings(max_new_tokens=6, do_sample=False, batch_size=3)
    model.set_adapter("q")
    expected = generate_texts(model, tokenizer, PROMPTS, settings)
    decoder = MODDecoder(["p", "q"], [0.0, 1.0])
    assert generate_texts(model, tokenizer, PROMPTS, settings, decode=decoder) == expected
    model.set_adapter("p")
    assert generate_texts(model, tokenizer, PROMPTS, settings) != expected
    dora, _ = adapters_p_and_q(use_dora=True)  # peft has no mixed batches for DoRA: a clear refusal
    with pytest.raises(ValueError, match="DoRA"):
        MODDecoder(["p", "q"], [0.5, 0.5])(
            dora, *batch(tokenizer, PROMPTS), GenerationConfig(max_new_tokens=2)
        )
