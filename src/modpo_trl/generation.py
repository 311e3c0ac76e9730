"""Sampling responses from a causal LM: the primitives shared by DPA's rejection sampling, the evaluation and
serving.

Prompts are tokenised exactly as TRL's DPO tokenises them for training: a message list (conversational format)
through the tokenizer's chat template with the generation prompt, a string (standard format) as it is. Batches
are left-padded, and every batch is seeded with `seed + batch index`, so two models given the same prompts see
the same sampling noise and their differences come from the weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

# (model, left-padded input ids, attention mask, generation config) -> input ids followed by the new tokens
Decode = Callable[[PreTrainedModel, torch.Tensor, torch.Tensor, GenerationConfig], torch.Tensor]


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are sampled (the recipe's `eval:` fields of the same names)."""

    max_new_tokens: int = 64
    do_sample: bool = True
    temperature: float = 0.7
    top_p: float = 0.9
    batch_size: int = 16
    seed: int = 0

    def check(self) -> None:
        """Raises ValueError naming the first invalid field."""
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 when do_sample is true")
        if self.do_sample and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict[str, Any]]) -> list[int]:
    """Token ids of a prompt as TRL's DPO tokenises it in training (`trl.data_utils._tokenize`)."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "conversational prompts (message lists) need a tokenizer with a chat template; set "
            "eval.prompts.conversational=false to use the prompts as plain text"
        )
    encoded = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def as_response(prompt: str | list[dict[str, Any]], text: str) -> str | list[dict[str, Any]]:
    """A generated text in the prompt's format: an assistant message for conversational prompts (TRL's
    convention, which reward sources expect), the text itself for standard ones."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def hf_generate(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: GenerationConfig
) -> torch.Tensor:
    """transformers' `model.generate`."""
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)


def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | list[dict[str, Any]]],
    settings: SamplingSettings,
    desc: str = "Generating",
    decode: Decode = hf_generate,
) -> list[str]:
    """One response per prompt: left-padded batches through `decode` (`model.generate`, or another decoding
    rule such as `modpo_trl.serving.mod`'s), each seeded with `settings.seed + batch index`; the text stops
    before the first end-of-sequence token."""
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(model, tokenizer)
    config = copy.deepcopy(model.generation_config)
    config.update(max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample, pad_token_id=pad)
    if settings.do_sample:
        config.update(temperature=settings.temperature, top_p=settings.top_p)
    texts: list[str] = []
    starts = range(0, len(ids), settings.batch_size)
    for index, start in enumerate(tqdm(starts, desc=desc, leave=False)):
        batch = ids[start : start + settings.batch_size]
        width = max(len(row) for row in batch)
        # Left padding: every prompt ends at the same position, where generation continues.
        input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in batch], device=model.device)
        torch.manual_seed(settings.seed + index)
        with torch.inference_mode():
            out = decode(model, input_ids, mask, config)
        for row in out[:, width:].tolist():
            end = next((i for i, token in enumerate(row) if token in eos), len(row))
            texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return texts
