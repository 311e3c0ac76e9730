"""Directional Preference Alignment (Wang et al., 2024, arXiv:2402.18571): iterated, preference-conditioned
rejection-sampling fine-tuning (RSF) with a multi-objective reward.

One iteration `k`, for every prompt `x`:

    v      ~ the training directions (unit vectors; 2 attributes: (cos t, sin t), t on an angle grid)
    x_v    = x with v stated in its system prompt            (modpo_trl.directions.condition_prompt)
    y_1..N ~ pi_{k-1}(. | x_v)                               (pi_0: the base model)
    y*     = argmax_n  v . r(x, y_n)                         (r: k reward attributes, scored on x, not x_v)

then `pi_k` = `pi_{k-1}` fine-tuned (TRL's `SFTTrainer`, LoRA, loss on the completion only) on the pairs
`(x_v, y*)`. The LoRA adapter keeps training across iterations, as RSF fine-tunes the current policy.

Layout of `args.output_dir`:

    iter-<k>/data.jsonl   one row per prompt: prompt, direction, angle, conditioned prompt, all candidates, their
                          reward vectors and v . r, the chosen index (written atomically once all are scored)
    iter-<k>/adapter/     the LoRA adapter + tokenizer after iteration k (exists only when complete)

`train()` skips iterations whose adapter exists, reuses an iteration's data when only its adapter is missing,
and continues from the last finished adapter.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import textwrap
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from .directions import angle_of, condition_prompt, sample_directions
from .dpa_config import DPA_FIELDS, DPAConfig, check_dpa_fields, dpa_defaults
from .recipe import Recipe, RecipeError, as_dict, resolved_yaml
from .rewards import ColumnReward, FunctionReward, RewardModel, RewardSource

DATA_FILE, ADAPTER_DIR, SFT_METRICS = "data.jsonl", "adapter", "dpa_iteration.json"
RUN_TAG = "dpa"  # the manifest entry and the sub-folder of the run directory


# ---------------------------------------------------------------------------------------------- reward vectors
class MultiObjectiveReward(RewardModel):
    """A reward model with one regression output per attribute (e.g. trained by
    `modpo_trl.reward_modeling.train_reward_model`), scored as a vector: `score` returns `(N, k)`, the outputs
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

    def _output_index(self, model) -> list[int]:
        # RewardModel.score indexes the logits' last dimension with this: a list keeps all k columns.
        return self._indices(model.config)

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
        from transformers import AutoConfig

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
        from .cache import fingerprint

        return fingerprint("stacked", [s.fingerprint() for s in self.sources])

    def score(self, prompts, responses) -> torch.Tensor:
        columns = []
        for attribute, source in zip(self.attributes, self.sources, strict=True):
            values = torch.as_tensor(source.score(prompts, responses), dtype=torch.float32).reshape(-1)
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
    from transformers import PreTrainedModel

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
        "fn(prompts, responses) -> floats, or a RewardSource (RewardModel(..., output=...), ImplicitReward, ...)"
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


def select_best(scores: torch.Tensor, directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling's choice: for `scores` `(P, N, k)` and unit `directions` `(P, k)`, the weighted
    scores `v . r` `(P, N)` and the index of the best candidate per prompt `(P,)` (the first one on ties)."""
    weighted = torch.einsum("pnk,pk->pn", scores.double(), directions.double())
    return weighted.argmax(dim=1), weighted


# --------------------------------------------------------------------------------------------------- trainer
class DPATrainer:
    """Directional Preference Alignment: preference-conditioned rejection-sampling fine-tuning, iterated.

    A loop around TRL's `SFTTrainer` rather than a subclass of it: each iteration generates and scores a new
    dataset with the current policy and then runs one ordinary SFT on it (fresh optimizer and schedule, as RSF
    prescribes), so one `SFTTrainer` per iteration does exactly TRL's SFT, with every `SFTConfig` field of
    `args` applied and nothing overridden.

    Args:
        model: the base causal LM (loaded, or a path loaded with `args.model_init_kwargs`).
        args: a `DPAConfig`.
        train_dataset: the prompts: a `Dataset` with a `prompt` column or a list, strings (standard format) or
            message lists (conversational: the direction goes in the system message).
        processing_class: the policy's tokenizer.
        reward: a `MultiObjectiveReward` (one output per attribute), or a list of one reward source / callable
            `fn(prompts, responses) -> floats` per attribute. It scores the original prompt, not the conditioned
            one.
        peft_config: the LoRA adapter trained across iterations (required: each iteration saves an adapter).
        callbacks: passed to every iteration's `SFTTrainer`.
    """

    _name = "DPA"
    _paper = {
        "title": "Arithmetic Control of LLMs for Diverse User Preferences: Directional Preference Alignment "
        "with Multi-Objective Rewards",
        "id": "2402.18571",
        "citation": textwrap.dedent("""\
            @inproceedings{wang2024arithmetic,
                title     = {{Arithmetic Control of LLMs for Diverse User Preferences: Directional Preference Alignment with Multi-Objective Rewards}},
                author    = {Haoxiang Wang and Yong Lin and Wei Xiong and Rui Yang and Shizhe Diao and Shuang Qiu and Han Zhao and Tong Zhang},
                year      = 2024,
                booktitle = {Proceedings of the 62nd Annual Meeting of the Association for Computational Linguistics (ACL)},
            }"""),
    }

    def __init__(
        self,
        model,
        args: DPAConfig,
        train_dataset: Dataset | Sequence,
        processing_class,
        reward,
        peft_config=None,
        callbacks=None,
    ):
        if not isinstance(args, DPAConfig):
            raise TypeError(f"args must be a DPAConfig, got {type(args).__name__}")
        if peft_config is None:
            raise ValueError(
                "peft_config is required: DPATrainer trains one LoRA adapter across its iterations"
            )
        if processing_class is None:
            raise ValueError("processing_class (the policy's tokenizer) is required")
        self.reward = as_reward_vector(reward, args.attribute_names)
        if args.attribute_names is None:
            args.attribute_names = list(self.reward.attributes)
        check_dpa_fields(args)  # again, now that the number of attributes is known
        self.reward.check()  # an attribute the reward model lacks fails here, before anything is generated
        self.args, self.peft_config, self.callbacks = args, peft_config, callbacks
        self.prompts = _prompt_list(train_dataset)
        self.directions = args.training_directions()
        self.processing_class = processing_class
        if isinstance(model, str | os.PathLike):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(model), **(args.model_init_kwargs or {}))
        self.model = model  # the current policy: the base model, then a PeftModel with the latest adapter
        self._policy_iteration = 0

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    def iteration_dir(self, k: int) -> Path:
        return self.output_dir / f"iter-{k}"

    def train(self) -> dict[str, Any]:
        """Runs the iterations not finished yet; returns `{"adapter": last adapter folder, "iterations": [...]}`
        with per-iteration metrics (mean `v . r` of the chosen and of all candidates, per-attribute means of the
        chosen, the SFT loss)."""
        from accelerate import PartialState

        state = PartialState()
        summaries = []
        for k in range(1, self.args.iterations + 1):
            folder = self.iteration_dir(k)
            if (folder / ADAPTER_DIR).is_dir():
                _log(f"DPA iteration {k}/{self.args.iterations}: done, skipped ({folder / ADAPTER_DIR})")
                summaries.append(self._summary(k, read_jsonl(folder / DATA_FILE), _read_json(folder)))
                continue
            started = time.monotonic()
            self._load_policy_of(k - 1)
            if (folder / DATA_FILE).is_file():
                _log(f"DPA iteration {k}/{self.args.iterations}: reusing {folder / DATA_FILE}")
            else:
                if state.is_main_process:
                    write_jsonl_atomic(folder / DATA_FILE, self.collect(k))
                state.wait_for_everyone()
            rows = read_jsonl(folder / DATA_FILE)
            sft = self._fine_tune(k, rows)
            summaries.append(self._summary(k, rows, sft))
            _log(f"DPA iteration {k}/{self.args.iterations}: done in {time.monotonic() - started:.0f}s")
        return {
            "adapter": str(self.iteration_dir(self.args.iterations) / ADAPTER_DIR),
            "iterations": summaries,
        }

    # ----------------------------------------------------------------------------------------- one iteration
    def iteration_prompts(self, k: int) -> list[int]:
        """Indices of the prompts of iteration `k`: all, or the `k`-th slice of one seeded shuffle."""
        n, m = len(self.prompts), self.args.prompts_per_iteration
        if m is None:
            return list(range(n))
        order = np.random.default_rng(self.args.seed).permutation(n)
        start = (k - 1) * m
        return [int(order[(start + j) % n]) for j in range(min(m, n))]

    def collect(self, k: int) -> list[dict[str, Any]]:
        """Samples directions and `num_samples` responses per prompt from the current policy, scores them and
        picks the best under `v . r`: the rows of `iter-<k>/data.jsonl`."""
        from .generation import SamplingSettings, as_response, generate_texts

        args, names, n = self.args, self.args.attribute_names, self.args.num_samples
        indices = self.iteration_prompts(k)
        prompts = [self.prompts[i] for i in indices]
        _, directions = sample_directions(len(prompts), self.directions, seed=[args.seed, k])
        conditioned = [
            condition_prompt(p, v, names, args.system_prompt)
            for p, v in zip(prompts, directions, strict=True)
        ]
        settings = SamplingSettings(
            max_new_tokens=args.max_new_tokens,
            do_sample=True,
            temperature=args.temperature,
            top_p=args.top_p,
            batch_size=args.generation_batch_size * n,
            seed=args.seed + 1_000_003 * k,  # a different noise stream per iteration
        )
        self.model.eval()  # no dropout while sampling (SFT leaves the model in train mode)
        texts = generate_texts(
            self.model,
            self.processing_class,
            [c for c in conditioned for _ in range(n)],
            settings,
            desc=f"DPA iteration {k}: sampling {n} x {len(prompts)}",
        )
        repeated = [p for p in prompts for _ in range(n)]
        responses = [as_response(p, t) for p, t in zip(repeated, texts, strict=True)]
        scores = self._score(repeated, responses).reshape(len(prompts), n, len(names))
        self.reward.release()  # frees a reward model loaded from a path before the SFT needs the memory
        chosen, weighted = select_best(scores, torch.tensor(directions))
        rows = []
        for j, (i, prompt) in enumerate(zip(indices, prompts, strict=True)):
            v = directions[j]
            rows.append(
                {
                    "index": i,
                    "prompt": prompt,
                    "direction": list(v),
                    "angle": round(angle_of(v), 6) if len(v) == 2 else None,
                    "conditioned_prompt": conditioned[j],
                    "candidates": texts[j * n : (j + 1) * n],
                    "scores": scores[j].tolist(),
                    "weighted_scores": weighted[j].tolist(),
                    "chosen": int(chosen[j]),
                }
            )
        return rows

    def _score(self, prompts: list, responses: list) -> torch.Tensor:
        names = self.args.attribute_names
        with torch.no_grad():
            scores = torch.as_tensor(self.reward.score(prompts, responses), dtype=torch.float32).cpu()
        if scores.shape != (len(prompts), len(names)):
            raise ValueError(
                f"reward '{self.reward.name}' returned scores of shape {tuple(scores.shape)}; expected "
                f"({len(prompts)}, {len(names)}): one per response and attribute {names}"
            )
        bad = (~torch.isfinite(scores)).nonzero()
        if len(bad):
            row, col = (int(x) for x in bad[0])
            raise ValueError(
                f"reward '{self.reward.name}' returned a non-finite score ({scores[row, col].item()}) for "
                f"attribute '{names[col]}' of response {row % self.args.num_samples} to prompt "
                f"{row // self.args.num_samples}; rewards must be finite numbers"
            )
        return scores

    def _load_policy_of(self, k: int) -> None:
        """Makes `self.model` the policy after iteration `k` (0: the base model), loading its saved adapter
        unless this process just trained it."""
        if k == self._policy_iteration:
            return
        from peft import PeftModel

        adapter = self.iteration_dir(k) / ADAPTER_DIR
        _log(f"DPA: continuing from {adapter}")
        self.model = PeftModel.from_pretrained(self.model, str(adapter), is_trainable=True)
        self._policy_iteration = k

    def _fine_tune(self, k: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """SFT of the current policy on (conditioned prompt, chosen response); saves the adapter atomically."""
        from accelerate import PartialState
        from accelerate.utils import is_peft_model
        from trl import SFTTrainer

        state = PartialState()
        folder = self.iteration_dir(k)
        work, partial, final = folder / ".trainer", folder / f".{ADAPTER_DIR}.partial", folder / ADAPTER_DIR
        args = dataclasses.replace(
            self.args, output_dir=str(work), run_name=f"{self.args.run_name or 'dpa'}/iter-{k}"
        )
        trainer = SFTTrainer(
            model=self.model,
            args=args,
            train_dataset=sft_dataset(rows),
            processing_class=self.processing_class,
            peft_config=None if is_peft_model(self.model) else self.peft_config,
            callbacks=self.callbacks,
        )
        output = trainer.train()
        if state.is_main_process and partial.exists():  # left by a run killed while saving
            shutil.rmtree(partial)
        state.wait_for_everyone()
        trainer.save_model(str(partial))  # every process: sharded weights are gathered
        metrics = {"train_loss": output.training_loss, "examples": len(rows)}
        if state.is_main_process:
            (partial / SFT_METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
            os.replace(partial, final)
            shutil.rmtree(work, ignore_errors=True)
        state.wait_for_everyone()
        self.model, self._policy_iteration = trainer.model, k
        del trainer  # its optimizer state, before the next iteration's generation needs the memory
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return metrics

    def _summary(self, k: int, rows: list[dict[str, Any]], sft: dict[str, Any]) -> dict[str, Any]:
        chosen = np.asarray([r["scores"][r["chosen"]] for r in rows], dtype=np.float64)
        weighted = [r["weighted_scores"] for r in rows]
        return {
            "iteration": k,
            "prompts": len(rows),
            "chosen_weighted_reward": float(np.mean([r["weighted_scores"][r["chosen"]] for r in rows])),
            "mean_weighted_reward": float(np.mean([np.mean(w) for w in weighted])),
            "chosen_reward": {a: float(chosen[:, j].mean()) for j, a in enumerate(self.args.attribute_names)},
            **{f"sft_{key}": value for key, value in sft.items()},
        }


def sft_dataset(rows: Sequence[dict[str, Any]]) -> Dataset:
    """The SFT data of an iteration: TRL's prompt-completion format, the prompt conditioned on the row's
    direction and the completion its chosen candidate (an assistant message for conversational prompts)."""
    examples = []
    for row in rows:
        prompt, text = row["conditioned_prompt"], row["candidates"][row["chosen"]]
        if isinstance(prompt, str):
            # Standard format: TRL tokenises prompt + completion as one string, so keep the words apart.
            completion = text if text[:1].isspace() or prompt[-1:].isspace() else " " + text
        else:
            completion = [{"role": "assistant", "content": text}]
        examples.append({"prompt": prompt, "completion": completion})
    return Dataset.from_list(examples)


def _prompt_list(train_dataset: Dataset | Sequence) -> list:
    if isinstance(train_dataset, Dataset):
        if "prompt" not in train_dataset.column_names:
            raise ValueError(f"train_dataset needs a 'prompt' column; it has {train_dataset.column_names}")
        prompts = list(train_dataset["prompt"])
    elif isinstance(train_dataset, str) or not isinstance(train_dataset, Sequence):
        raise TypeError(
            f"train_dataset must be a Dataset or a list of prompts, got {type(train_dataset).__name__}"
        )
    else:
        prompts = list(train_dataset)
    if not prompts:
        raise ValueError("train_dataset has no prompts")
    return prompts


# ------------------------------------------------------------------------------------------------ files
def write_jsonl_atomic(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    from .sweep import write_atomic

    write_atomic(Path(path), "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _read_json(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_DIR / SFT_METRICS
    return json.loads(path.read_text()) if path.is_file() else {}


def _log(message: str) -> None:
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(message, flush=True)


# ----------------------------------------------------------------------------------------------- recipes
def _dpa_fields(recipe: Recipe) -> SimpleNamespace:
    """The recipe's DPA settings (defaults + `training:`), checked without building the SFT config."""
    values = {**dpa_defaults(), **{k: v for k, v in recipe.training.items() if k in DPA_FIELDS}}
    if values["attribute_names"] is not None:
        raise RecipeError(
            "training.attribute_names is set by the recipe: the objectives' names are the attributes"
        )
    values["attribute_names"] = recipe.objective_names
    cfg = SimpleNamespace(**values)
    try:
        check_dpa_fields(cfg)
    except ValueError as e:
        raise RecipeError(f"training: {e}") from None
    return cfg


def _prompt_data(recipe: Recipe):
    data = recipe.objectives[0].data
    if data is None:
        raise RecipeError(
            f"objectives[0] ({recipe.objective_names[0]}).data is required for method=dpa: its prompt_column "
            "gives the training prompts (responses are generated)"
        )
    return data


def _reward_layout(recipe: Recipe) -> str:
    """`multi`: `objectives[0].reward` is a reward model with one output per objective (`output` unset);
    `stacked`: every objective has its own reward. Anything else is a RecipeError."""
    objectives = recipe.objectives
    given = [i for i, o in enumerate(objectives) if o.reward is not None]
    first = objectives[0].reward
    if given == [0] and first.type == "reward_model" and first.output is None:
        return "multi"
    if len(given) == len(objectives):
        for i, o in enumerate(objectives):
            if o.reward.type == "columns":
                raise RecipeError(
                    f"objectives[{i}] ({o.name}).reward.type=columns cannot score generated responses; "
                    "valid for method=dpa: reward_model, implicit, function"
                )
        return "stacked"
    missing = [f"objectives[{i}] ({o.name})" for i, o in enumerate(objectives) if o.reward is None]
    raise RecipeError(
        f"method=dpa needs a reward for every objective: either objectives[0].reward is a reward_model with one "
        f"output per objective (labels {recipe.objective_names}, `output` unset), or every objective has its own "
        f"`reward`; missing: {missing}"
    )


def build_reward_vector(recipe: Recipe) -> MultiObjectiveReward | StackedReward:
    """The recipe's reward as a vector scorer; reward models with a `train:` section that are not trained yet
    are trained first (`modpo_trl.reward_modeling`)."""
    from .models import check_loadable
    from .recipe import build_reward
    from .sweep import _train_reward_model_if_needed

    names = recipe.objective_names
    if _reward_layout(recipe) == "multi":
        cfg, key = recipe.objectives[0].reward, f"objectives[0] ({names[0]}).reward"
        if cfg.train:
            _train_reward_model_if_needed({"attributes": names, **cfg.train}, cfg.path, key)
        check_loadable(cfg.path, f"{key}.path")
        return MultiObjectiveReward(
            cfg.path,
            cfg.tokenizer,
            attributes=names,
            max_length=cfg.max_length,
            batch_size=cfg.batch_size,
            name=Path(cfg.path).name,
        )
    sources = []
    for i, objective in enumerate(recipe.objectives):
        cfg, key = objective.reward, f"objectives[{i}] ({objective.name}).reward"
        if cfg.type == "reward_model" and cfg.train:
            _train_reward_model_if_needed(cfg.train, cfg.path, key)
        if cfg.path:
            check_loadable(cfg.path, f"{key}.path")
        sources.append(build_reward(cfg, objective.name, key))
    return StackedReward(sources, names)


def _check_reward(reward: MultiObjectiveReward | StackedReward, recipe: Recipe) -> None:
    """A reward model without an output per objective is a recipe error (found from its config alone)."""
    try:
        reward.check()
    except ValueError as e:
        raise RecipeError(f"objectives[0] ({recipe.objective_names[0]}).reward: {e}") from None


def run_dir_of(recipe: Recipe) -> Path:
    """`<output_dir>/<run_name>/dpa`: where the iterations are written."""
    return recipe.run_dir / RUN_TAG


def iteration_status(folder: Path, iterations: int) -> list[dict[str, Any]]:
    """Each iteration's state on disk: `done` (adapter saved), `data only` (SFT to redo) or `pending`."""
    rows = []
    for k in range(1, iterations + 1):
        it = folder / f"iter-{k}"
        status = (
            "done"
            if (it / ADAPTER_DIR).is_dir()
            else "data only"
            if (it / DATA_FILE).is_file()
            else "pending"
        )
        rows.append({"iteration": k, "status": status, "folder": str(it)})
    return rows


def train_from_recipe(recipe: Recipe, dry_run: bool = False) -> dict[str, Any] | None:
    """`method: dpa`: trains the DPA adapter a recipe describes into `<run_dir>/dpa/iter-<k>/` and records the
    final adapter in the run's manifest (tag `dpa`). With `dry_run`, checks the recipe and prints the plan."""
    from .sweep import Manifest, recipe_fingerprint, write_atomic

    if recipe.method != "dpa":
        raise RecipeError(f"method={recipe.method!r}: modpo_trl.dpa_trainer trains method=dpa recipes")
    if not recipe.lora.enabled:
        raise RecipeError("lora.enabled=false: DPA trains one LoRA adapter across its iterations; enable it")
    cfg = _dpa_fields(recipe)
    layout = _reward_layout(recipe)
    data = _prompt_data(recipe)
    out = run_dir_of(recipe)
    if dry_run:
        _print_plan(recipe, cfg, layout, data, out)
        return None

    from .data import load_prompts
    from .models import check_policy, load_policy, lora_config

    check_policy(recipe)
    try:
        args = DPAConfig(
            **recipe.training,
            attribute_names=recipe.objective_names,
            output_dir=str(out),
            run_name=f"{recipe.run_name}/{RUN_TAG}",
        )
    except (TypeError, ValueError) as e:
        raise RecipeError(f"training: {e}") from e
    from accelerate import PartialState

    state = PartialState()
    manifest, recipe_fp = Manifest(recipe.run_dir), recipe_fingerprint(recipe)
    if state.is_main_process:
        previous = manifest.read().get("runs", {}).get(RUN_TAG, {}).get("fingerprints", {}).get("recipe")
        if previous not in (None, recipe_fp) and out.exists():
            _log(
                f"DPA: the iterations in {out} were trained under a different recipe; finished ones are kept. "
                "Delete the folder (or use another run_name) to train them with this one."
            )
        recipe.run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(recipe.run_dir / "recipe.yaml", resolved_yaml(recipe))
        manifest.update(_register(recipe, recipe_fp))
    state.wait_for_everyone()
    try:
        reward = build_reward_vector(recipe)
        _check_reward(reward, recipe)
        key = f"objectives[0] ({recipe.objective_names[0]}).data"
        try:
            prompts = load_prompts(data)
        except RecipeError as e:
            raise RecipeError(f"{key}: {e}") from None
        model, tokenizer = load_policy(recipe)
        trainer = DPATrainer(model, args, prompts, tokenizer, reward=reward, peft_config=lora_config(recipe))
        result = trainer.train()
    except Exception as e:
        if state.is_main_process:
            manifest.update_run(RUN_TAG, status="failed", finished=_now(), error=f"{type(e).__name__}: {e}")
        raise
    if state.is_main_process:
        adapter = Path(result["adapter"]).relative_to(recipe.run_dir).as_posix()
        metrics = {f"iter-{s['iteration']}": s for s in result["iterations"]}
        manifest.update_run(RUN_TAG, status="done", finished=_now(), adapter=adapter, metrics=metrics)
    _log(f"DPA: done -> {result['adapter']}")
    return result


def _register(recipe: Recipe, recipe_fp: str) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data.update(
            run_name=recipe.run_name,
            method=recipe.method,
            base_model=recipe.model.path,
            objectives=recipe.objective_names,
            target=None,  # DPA has no target objective: every objective is an output of the reward
            recipe=as_dict(recipe),
        )
        runs = data.setdefault("runs", {})
        runs[RUN_TAG] = {
            "tag": RUN_TAG,
            "weights": None,  # one conditioned adapter for every direction
            "trainer_weights": None,
            "status": "running",
            "adapter": None,
            "metrics": {},
            "fingerprints": {"recipe": recipe_fp},
            "started": _now(),
            "finished": None,
            "error": None,
        }

    return change


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _print_plan(recipe: Recipe, cfg: SimpleNamespace, layout: str, data, out: Path) -> None:
    from .dpa_config import evaluation_angles, training_directions

    names = recipe.objective_names
    if layout == "multi":
        reward = recipe.objectives[0].reward
        trained = reward.path and Path(reward.path).expanduser().exists()
        if trained:
            _check_reward(MultiObjectiveReward(reward.path, reward.tokenizer, attributes=names), recipe)
        where = (
            reward.path
            if trained
            else f"{reward.path} (to be trained first)"
            if reward.train
            else reward.path
        )
        print(f"# reward: one reward model with outputs {names}: {where}")
    else:
        print(f"# reward: one per objective: {[f'{o.name}: {o.reward.type}' for o in recipe.objectives]}")
    pool = training_directions(cfg)
    angles = [round(angle_of(v), 4) for v in pool] if len(names) == 2 and cfg.directions is None else None
    print(f"# prompts: {data.path} (column {data.prompt_column!r}); N = {cfg.num_samples} samples per prompt")
    print(f"# training directions ({len(pool)}): {angles if angles is not None else [list(v) for v in pool]}")
    if cfg.directions is None:
        print(f"# held-out angles: {list(cfg.heldout_angles)}; evaluated angles: {evaluation_angles(cfg)}")
    print(f"# iterations in {out}:")
    for row in iteration_status(out, cfg.iterations):
        print(f"  iter-{row['iteration']}  {row['status']}")


def evaluation_candidates(recipe: Recipe, run_dir: str | Path) -> list:
    """What `modpo_trl.evaluate` compares for a DPA run: the final adapter asked for each evaluation direction
    (`training.eval_angles`, held-out angles included; label `t-15`, `t+10-heldout`, or `v97_-26_0` for explicit
    directions). `weights` and `preference` are the direction `v`, in the order of the objectives."""
    import functools

    from .directions import direction_weights
    from .dpa_config import evaluation_directions
    from .evaluate import Candidate
    from .sweep import Manifest

    cfg = _dpa_fields(recipe)
    run_dir = Path(run_dir)
    entry = Manifest(run_dir).read().get("runs", {}).get(RUN_TAG)
    adapter = (
        run_dir / entry["adapter"]
        if entry and entry.get("status") == "done" and entry.get("adapter")
        else None
    )
    if adapter is None or not adapter.is_dir():
        raise RecipeError(
            f"{run_dir}: no finished DPA adapter to evaluate (manifest entry {RUN_TAG!r}: "
            f"{entry.get('status') if entry else 'missing'}); train it with python -m modpo_trl.train <recipe>"
        )
    heldout = [float(a) for a in cfg.heldout_angles]
    candidates = []
    for v in evaluation_directions(cfg):
        held_out = False
        if cfg.directions is None:
            t = angle_of(v)
            held_out = any(abs(t - h) < 1e-6 for h in heldout)
            label = f"t{round(t, 4):+g}" + ("-heldout" if held_out else "")
        else:
            label = "v" + "_".join(str(w) for w in direction_weights(v))
        prompt_fn = functools.partial(
            condition_prompt, v=v, attribute_names=recipe.objective_names, system_prompt=cfg.system_prompt
        )
        candidates.append(
            Candidate(
                RUN_TAG,
                label,
                weights=list(v),
                adapter=str(adapter),
                preference=list(v),
                prompt_fn=prompt_fn,
                held_out=held_out,
            )
        )
    return candidates
