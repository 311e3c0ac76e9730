"""Real scorers for two (or three) objectives that pull against each other, usable without a model hub.

Each has the `fn(prompts, responses) -> list[float]` signature of `FunctionReward` and of a recipe's
`scorer: {type: function, function: modpo_trl.rewards.scorers:<name>}`. Prompts and responses are strings (TRL's
standard format) or chat message lists (conversational format), of which the last message's text is scored.

- `relevance`: how close the response is to the prompt in meaning (all-MiniLM-L6-v2 embeddings, cosine).
- `brevity`: how short the response is, linear in its number of words.
- `positivity`: VADER's sentiment of the response.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoModel, AutoTokenizer

from ..offline import minilm

BREVITY_WORDS = 100  # brevity reaches 0 at this many words


def text_of(value: str | Sequence[dict[str, Any]]) -> str:
    """A string as it is; a message list as its last message's content."""
    if isinstance(value, str):
        return value
    if not value:
        return ""
    return str(value[-1]["content"])


def brevity(prompts: Sequence, responses: Sequence) -> list[float]:
    """`max(0, 1 - n_words / 100)`: 1 for an empty response, 0.5 at 50 words, 0 from 100 words on.

    Linear, so every word costs the same: the length trade-off a margin reward sees does not depend on where
    in the length range the two responses of a pair are. Bounded, so one rambling response cannot dominate
    a batch's margins. Words are whitespace-separated tokens.
    """
    _check_lengths(prompts, responses)
    return [max(0.0, 1.0 - len(text_of(r).split()) / BREVITY_WORDS) for r in responses]


@functools.cache
def _minilm():
    folder = minilm()
    model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    return AutoTokenizer.from_pretrained(str(folder)), model


def embed(texts: list[str], batch_size: int = 64, max_length: int = 256):
    """Unit-norm mean-pooled all-MiniLM-L6-v2 sentence embeddings (as sentence-transformers computes them)."""
    tokenizer, model = _minilm()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 384)


def relevance(prompts: Sequence, responses: Sequence) -> list[float]:
    """Cosine similarity of the prompt's and the response's all-MiniLM-L6-v2 embeddings, in [-1, 1].

    The model is loaded once, on first use (CPU is fast enough: 22M parameters).
    """
    _check_lengths(prompts, responses)
    if not prompts:
        return []
    p = embed([text_of(x) for x in prompts])
    r = embed([text_of(x) for x in responses])
    return (p * r).sum(-1).tolist()


@functools.cache
def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as e:
        raise ImportError(
            "the positivity scorer needs vaderSentiment: `pip install vaderSentiment` (or `make install`)"
        ) from e
    return SentimentIntensityAnalyzer()


def positivity(prompts: Sequence, responses: Sequence) -> list[float]:
    """VADER's compound sentiment of the response, in [-1, 1] (rule-based, lexicon shipped in the package)."""
    _check_lengths(prompts, responses)
    analyzer = _vader()
    return [analyzer.polarity_scores(text_of(r))["compound"] for r in responses]


def _check_lengths(prompts: Sequence, responses: Sequence) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; they must pair up")
