"""MOD: decoding-time mixing of LoRA adapters (Shi et al., 2024, "Decoding-Time Language Model Alignment with
Multiple Objectives", arXiv:2406.18853).

If each adapter `pi_i` is the reverse-KL-regularised optimum of a reward `r_i` against the same reference model
and beta (what DPO and MODPO train), `pi_i ∝ pi_ref exp(r_i / beta)`, then for `w` on the simplex the optimum of
`sum_i w_i r_i` is `prod_i pi_i^{w_i}`, renormalised. MOD applies this rule to every next-token distribution:

    log p(y_t | x, y_<t) = sum_i w_i log pi_i(y_t | x, y_<t) - log Z_t

No training: the adapters of a sweep give a front at any `w` in their weightings' convex hull.

All K adapters run in ONE forward per token: the batch is stacked K times and every LoRA layer routes copy i
through adapter i (`routed`: a slice of the batch per adapter for plain LoRA layers, peft's mixed-adapter batches
otherwise), while the base weights are read once; one KV cache holds the K copies. Sampling (temperature, top-k, top-p, seed) is applied to the mixed distribution as
`model.generate` applies it to one model's, so a mixture with all weight on one adapter decodes exactly as that
adapter does.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import AuxiliaryTrainingWrapper
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedModel,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

RULE = "reverse_kl"  # sum_i w_i log pi_i, renormalised: the mixing rule MOD derives for the reverse-KL family

# Generation-config fields that would change the distribution, with their neutral values: MOD decoding does not
# apply them, so a model whose generation config sets one is refused rather than decoded unlike `model.generate`.
_NOT_APPLIED = {
    "num_beams": 1,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "sequence_bias": None,
    "min_length": 0,
    "min_new_tokens": None,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "top_h": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
}
# What `model.generate` samples with when the generation config leaves these unset (its global defaults).
_GENERATE_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


def mix_log_probs(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`(K, B, V)` next-token logits of K models -> `(B, V)` log-probs of the mixture
    `log_softmax(sum_k w_k log_softmax(logits_k))`. A zero weight drops its model, even where it gives -inf."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    w = weights.to(log_probs)[:, None, None]
    mixed = torch.where(w > 0, w * log_probs, torch.zeros_like(log_probs)).sum(dim=0)
    return torch.log_softmax(mixed, dim=-1)


def check_weights(weights: Sequence[float], k: int) -> list[float]:
    """Mixing weights: `k` finite numbers >= 0 that sum to 1 (within 1e-6), one per adapter."""
    values = [float(x) for x in weights]
    if (
        len(values) != k
        or not all(math.isfinite(x) and x >= 0 for x in values)
        or abs(sum(values) - 1) > 1e-6
    ):
        raise ValueError(
            f"MOD weights={values} must be {k} finite numbers >= 0 summing to 1, one per adapter"
        )
    return values


def warpers(config: GenerationConfig) -> LogitsProcessorList:
    """The sampling warpers `model.generate` applies for `config`, in its order (temperature, top-k, top-p)."""
    found = {
        name: value
        for name, neutral in _NOT_APPLIED.items()
        if (value := getattr(config, name, None)) is not None and value != neutral
    }
    if found:
        raise ValueError(
            f"MOD decoding applies temperature, top_k and top_p only; the generation config also sets {found}"
        )
    processors = LogitsProcessorList()
    if not config.do_sample:
        return processors
    temperature, top_k, top_p = (
        getattr(config, name) if getattr(config, name) is not None else default
        for name, default in _GENERATE_DEFAULTS.items()
    )
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        processors.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=top_p))
    return processors


class MODDecoder:
    """A `modpo_trl.generation.Decode`: decodes a left-padded batch with the mixture of the PeftModel's adapters
    `adapter_names` at `weights`. With `keep_scores`, `scores` collects each step's mixed log-probs `(B, V)`
    (before temperature and top-p), for inspection."""

    def __init__(self, adapter_names: Sequence[str], weights: Sequence[float], keep_scores: bool = False):
        if not adapter_names:
            raise ValueError("MOD needs at least one adapter to decode with")
        self.adapter_names = list(adapter_names)
        self.weights = check_weights(weights, len(self.adapter_names))
        self.keep_scores = keep_scores
        self.scores: list[torch.Tensor] = []

    @torch.inference_mode()
    def __call__(
        self,
        model: PreTrainedModel,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        config: GenerationConfig,
    ) -> torch.Tensor:
        process = warpers(config)
        k, (b, width) = len(self.adapter_names), input_ids.shape
        device = input_ids.device
        eos = config.eos_token_id
        eos = torch.tensor(eos if isinstance(eos, list) else [] if eos is None else [eos], device=device)
        weights = torch.tensor(self.weights, device=device)
        rows = [name for name in self.adapter_names for _ in range(b)]  # copy i of the batch: adapter i
        mask = attention_mask.repeat(k, 1)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # as `generate`: padding does not count
        cache = DynamicCache(config=model.config)
        cache_arg = _cache_argument(model)
        step_ids, out_ids = input_ids.repeat(k, 1), input_ids
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        with routed(model, rows):
            for step in range(config.max_new_tokens):
                logits = model(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    logits_to_keep=1,
                    **{cache_arg: cache},
                ).logits[:, -1]
                if step == 0 and cache.get_seq_length() != width:
                    raise RuntimeError(
                        f"{type(model).__name__} did not fill the KV cache passed as `{cache_arg}`"
                    )
                scores = mix_log_probs(logits.view(k, b, -1), weights)
                if self.keep_scores:
                    self.scores.append(scores.clone())
                scores = process(out_ids, scores)
                if config.do_sample:
                    tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
                else:
                    tokens = torch.argmax(scores, dim=-1)
                tokens = torch.where(finished, torch.full_like(tokens, config.pad_token_id), tokens)
                out_ids = torch.cat([out_ids, tokens[:, None]], dim=-1)
                finished |= torch.isin(tokens, eos)
                if bool(finished.all()):
                    break
                step_ids = tokens.repeat(k)[:, None]
                mask = torch.cat([mask, mask.new_ones(k * b, 1)], dim=-1)
                positions = positions[:, -1:] + 1
        return out_ids


@contextmanager
def routed(model: PeftModel, rows: Sequence[str]) -> Iterator[None]:
    """Inside the block, every LoRA layer of `model` sends row i of its input through the adapter `rows[i]`.

    Plain LoRA layers (no DoRA or other variant, no extra trained modules): the adapters are disabled, so each
    layer gives its base output, and a hook adds each run of equal `rows` its adapter's `B A x * scaling`, as
    peft's own forward computes it, on a slice of the batch. Otherwise peft's mixed-adapter batches
    (`adapter_names`), which handle every variant with a gather and scatter per layer. Either way the hooks are
    added once for the whole decoding, not around every forward call as `model(..., adapter_names=rows)` does."""
    if not isinstance(model, PeftModel):
        raise ValueError(
            f"MOD decoding mixes LoRA adapters: it needs a PeftModel, not {type(model).__name__}"
        )
    unknown = sorted(set(rows) - set(model.peft_config))
    if unknown:
        raise ValueError(f"MOD: no adapter {unknown} in the model; it has {sorted(model.peft_config)}")
    if model.training:
        raise ValueError("MOD decoding needs the model in eval mode (dropout off): call model.eval()")
    rows = list(rows)
    blocks = _blocks(rows)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer | AuxiliaryTrainingWrapper)]
    if plain_lora(layers, set(rows)):
        handles = [layer.register_forward_hook(partial(_add_blocks, blocks=blocks)) for layer in layers]
        context = model.disable_adapter()
    else:
        route = partial(_with_adapter_names, adapter_names=rows)
        handles = [layer.register_forward_pre_hook(route, with_kwargs=True) for layer in layers]
        context = nullcontext()
    try:
        with context:
            yield
    finally:
        for handle in handles:
            handle.remove()


def plain_lora(layers: Sequence[torch.nn.Module], names: set[str]) -> bool:
    """Whether every layer holding one of the adapters `names` is a plain LoRA layer for them: `B A x * scaling`
    added to its base output (no variant such as DoRA, no embedding LoRA, no extra trained module)."""
    for layer in layers:
        if isinstance(layer, AuxiliaryTrainingWrapper):
            return False
        variants = set(getattr(layer, "lora_variant", {}))
        if names & (set(layer.lora_embedding_A) | variants):
            return False
    return True


def _blocks(rows: list[str]) -> list[tuple[str, int, int]]:
    """`(adapter, start, end)` of each run of equal `rows`."""
    blocks, start = [], 0
    for name, run in itertools.groupby(rows):
        end = start + len(list(run))
        blocks.append((name, start, end))
        start = end
    return blocks


def _add_blocks(
    layer: LoraLayer, args: tuple, output: torch.Tensor, blocks: list[tuple[str, int, int]]
) -> torch.Tensor:
    x = args[0]
    for name, start, end in blocks:
        if name in layer.lora_A:  # an adapter that does not target this layer leaves it as it is
            lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
            delta = lora_b(lora_a(x[start:end].to(lora_a.weight.dtype))) * layer.scaling[name]
            output[start:end] += delta.to(output.dtype)
    return output


def _with_adapter_names(module: torch.nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]):
    return args, {**kwargs, "adapter_names": adapter_names}


def _cache_argument(model: PreTrainedModel) -> str:
    """The KV cache's keyword in the base model's forward (`cache` in recent transformers)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
