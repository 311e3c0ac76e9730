"""Reward vectors: scorers of `(N, k)` rewards, one column per attribute, as DPA's rejection sampling needs.

`MultiObjectiveReward` is one reward model with an output per attribute; `StackedReward` puts one reward source
per attribute side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel

from .cache import fingerprint
from .sources import ColumnReward, FunctionReward, RewardModel, RewardSource


# ---------------------------------------------------------------------------------------------- reward vectors
class MultiObjectiveReward(RewardModel):
    """A reward model with one regression output per attribute (e.g. trained by
    `modpo_trl.rewards.modeling.train_reward_model`), scored as a vector: `score` returns `(N, k)`, the outputs
    named `attributes` (labels of `config.id2label`) in that order, from one forward pass per batch.

    Everything else (lazy loading from a path, chat-template rendering, left truncation, batching) is
    `RewardModel`'s: only the choice of outputs differs. Scores are the raw outputs: z-scores for a model trained
    with `normalize=True`, i.e. every attribute in units of its spread over the training ratings, which keeps a
    direction's angle comparable across attributes rated on different scales.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        attributes: Sequence[str] = (),
        max_length: int = 1024,
        batch_size: int = 8,
        name: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ):
        if isinstance(attributes, str) or not attributes:
            raise ValueError(
                f"attributes={attributes!r} must name the reward model's outputs to use, in order"
            )
        self.attributes = list(attributes)
        # `output` is part of RewardModel's fingerprint: the tuple makes it follow the selected attributes.
        super().__init__(model, tokenizer, tuple(self.attributes), max_length, batch_size, name, model_kwargs)

    def _output_index(self, config) -> list[int]:
        # RewardModel.score indexes the logits' last dimension with this: a list keeps all k columns.
        return self._indices(config)

    def _indices(self, config) -> list[int]:
        label2id = {str(v): int(k) for k, v in (config.id2label or {}).items()}
        missing = [a for a in self.attributes if a not in label2id]
        if missing:
            raise ValueError(
                f"reward model '{self.name}' has no output(s) {missing}: its labels (config.id2label) are "
                f"{sorted(label2id)}; the attribute names (the objectives' names) must be among them"
            )
        return [label2id[a] for a in self.attributes]

    def check(self) -> None:
        """Fails now if an attribute is not an output of the model, reading only its config when it is a path."""
        if self._model is not None or (Path(self._model_arg) / "adapter_config.json").is_file():
            self.model  # noqa: B018 - a LoRA reward model's labels are only known once it is loaded
            return
        try:
            config = AutoConfig.from_pretrained(str(self._model_arg))
        except Exception as e:
            raise OSError(
                f"could not read the config of the reward model {str(self._model_arg)!r}: {e}"
            ) from e
        self._indices(config)


class StackedReward(RewardSource):
    """One reward source per attribute (rule-based callables, single-output reward models, ...): `score`
    returns their scores side by side, `(N, k)`."""

    def __init__(self, sources: Sequence[RewardSource | Callable], attributes: Sequence[str]):
        if len(sources) != len(attributes):
            raise ValueError(
                f"reward has {len(sources)} sources but attribute_names={list(attributes)} has {len(attributes)}: "
                "give one reward per attribute, in the same order"
            )
        self.sources = [_as_source(s, i, a) for i, (s, a) in enumerate(zip(sources, attributes, strict=True))]
        self.attributes = list(attributes)
        self.name = "+".join(self.attributes)

    def fingerprint(self) -> str:
        return fingerprint("stacked", [s.fingerprint() for s in self.sources])

    def score(self, prompts, responses) -> torch.Tensor:
        columns = []
        for attribute, source in zip(self.attributes, self.sources, strict=True):
            values = source.score(prompts, responses)
            if isinstance(values, list | tuple) and any(v is None for v in values):
                i = next(i for i, v in enumerate(values) if v is None)
                raise ValueError(
                    f"reward for '{attribute}' returned None (not applicable) for response {i}: a reward vector "
                    "needs a score for every attribute of every response"
                )
            values = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
            if values.numel() != len(prompts):
                raise ValueError(
                    f"reward for '{attribute}' returned {values.numel()} scores for {len(prompts)} responses"
                )
            columns.append(values)
        return torch.stack(columns, dim=1)

    def check(self) -> None:
        """Nothing to read ahead: every source scores exactly one attribute."""

    def release(self) -> None:
        for source in self.sources:
            source.release()


def _as_source(entry: Any, index: int, attribute: str) -> RewardSource:
    if isinstance(entry, ColumnReward):
        raise TypeError(
            f"reward[{index}] ({attribute}) is a ColumnReward: generated responses have no columns"
        )
    if isinstance(entry, RewardSource):
        return entry
    if callable(entry) and not isinstance(entry, PreTrainedModel):
        return FunctionReward(entry, name=attribute)
    raise TypeError(
        f"reward[{index}] ({attribute}) has unsupported type {type(entry).__name__}; valid: a callable "
        "fn(prompts, responses) -> floats or TRL-style fn(completions, **kwargs), or a RewardSource "
        "(RewardModel(..., output=...), ImplicitReward, ...)"
    )


def as_reward_vector(
    reward: Any, attribute_names: Sequence[str] | None
) -> MultiObjectiveReward | StackedReward:
    """`reward` as a scorer of `(N, k)` reward vectors: a `MultiObjectiveReward`, or a list with one reward
    source or callable per attribute (a `StackedReward`)."""
    if isinstance(reward, MultiObjectiveReward | StackedReward):
        if attribute_names is not None and list(attribute_names) != reward.attributes:
            raise ValueError(
                f"attribute_names={list(attribute_names)} but the reward scores {reward.attributes}; "
                "they must be the same names in the same order"
            )
        return reward
    if isinstance(reward, list | tuple):
        if attribute_names is None:
            raise ValueError("attribute_names is required when the reward is a list of per-attribute rewards")
        return StackedReward(reward, attribute_names)
    if isinstance(reward, RewardModel):
        raise TypeError(
            "reward is a single-output RewardModel; use MultiObjectiveReward(model, tokenizer, attributes=[...]) "
            "for a reward model with one output per attribute, or a list with one reward per attribute"
        )
    raise TypeError(
        f"reward has unsupported type {type(reward).__name__}; valid: MultiObjectiveReward(...), or a list of "
        "one reward source / callable fn(prompts, responses) -> floats per attribute"
    )
