"""Directional Preference Alignment (Wang et al., 2024, arXiv:2402.18571): iterated, preference-conditioned
rejection-sampling fine-tuning (RSF) with a multi-objective reward, and its contrastive variant, directional DPO.

One iteration `k`, for every prompt `x` and each of its M directions (`directions_per_prompt`):

    v      ~ the training directions (unit vectors; 2 attributes: (cos t, sin t), t on an angle grid)
    x_v    = x with v stated in its system prompt as integer weights w = round(100 v)
    y_1..N ~ pi_{k-1}(. | x_v)                               (pi_0: the base model)
    s_n    = (w / 100) . r'(x, y_n)                          (r' = r on the stated scale, see `reward_scale`)
    y+     = argmax_n s_n,   y- = argmin_n s_n               (the first one on ties)

(with `share_candidates`, n runs over the M x N responses of x sampled under all its directions). Then `pi_k` is
`pi_{k-1}` trained on the iteration's rows: TRL's `SFTTrainer` on `(x_v, y+)` (`update="sft"`, the paper's
RSF), or TRL's `DPOTrainer` on `(x_v, y+ > y-)` against the reference `pi_{k-1}` (`update="dpo"`). The LoRA
adapter keeps training across iterations.

Layout of `args.output_dir`:

    iter-<k>/data.jsonl   one row per prompt and direction: prompt, direction, stated weights, conditioned prompt,
                          the candidates, the direction each was sampled under, their reward vectors, the scale
                          and v . r, the chosen (best) and rejected (worst) indices and their gap (written
                          atomically once all are scored)
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import is_peft_model
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM
from trl import DPOTrainer, SFTTrainer

from ..conditioning.directions import (
    angle_of,
    condition_prompt,
    direction_gates,
    direction_weights,
    sample_directions,
)
from ..conditioning.svd_lora import (
    PreferenceLoRA,
    apply_preference,
    attach,
    gated_lora_rank,
    is_lora,
    preference,
)
from ..generation import SamplingSettings, as_response, generate_texts
from ..rewards.vector import as_reward_vector
from ..storage import read_jsonl, write_jsonl
from .dpa_config import DPAConfig, auto_conditioning, check_dpa_fields
from .logs import keep_logs

DATA_FILE, ADAPTER_DIR, SFT_METRICS = "data.jsonl", "adapter", "dpa_iteration.json"
REF_ADAPTER = "ref"  # the frozen copy of the starting adapter TRL's DPOTrainer adds as the reference
PREFERENCE = "preference"  # a row's adapter gates (`conditioning="adapter"`)


def stated_scale(scores: torch.Tensor, reward_scale: str) -> torch.Tensor | None:
    """`(k, 2)`: per attribute, the lowest and highest score over `scores` `(M, k)` (every response of the
    iteration), which `"minmax"` maps to 0 and 100; None for `"raw"`."""
    if reward_scale == "raw":
        return None
    flat = scores.reshape(-1, scores.shape[-1]).double()
    return torch.stack([flat.min(dim=0).values, flat.max(dim=0).values], dim=1)


def on_stated_scale(scores: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """`scores` (`(..., k)`) mapped linearly so each attribute's `scale` row `[lo, hi]` becomes `[0, 100]`; an
    attribute that never varied (`hi == lo`) becomes 0 everywhere, so it cannot decide a choice. `scale=None`:
    the scores as they are."""
    if scale is None:
        return scores.double()
    lo, hi = scale[:, 0], scale[:, 1]
    span = hi - lo
    scaled = 100.0 * (scores.double() - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, scaled, torch.zeros_like(scaled))


def select_pairs(
    scores: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For candidate `scores` `(P, C, k)` (on the stated scale) and weights `(P, k)` (the stated ones,
    `round(100 v) / 100`): the weighted scores `w . r` `(P, C)`, the best candidate per row `(P,)` and the worst
    `(P,)`, each the first one on ties (so a row whose candidates all tie has best == worst)."""
    weighted = torch.einsum("pck,pk->pc", scores.double(), weights.double())
    return weighted, weighted.argmax(dim=1), weighted.argmin(dim=1)


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

    _tag_names = ["trl", "dpa", "modpo_trl"]
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
        if args.update == "dpo":
            args.dpo_config()  # a bad dpo_kwargs value fails here, before anything is generated
        self.args, self.peft_config, self.callbacks = args, peft_config, callbacks
        # Adapter conditioning: one block of the LoRA's units per attribute, gated by the direction.
        self.layout = None
        if args.conditioning == "auto":  # resolved once, so that every later reader sees what was trained
            args.conditioning = auto_conditioning(args, is_lora(None, peft_config))
        if args.conditioning != "prompt":
            rank = gated_lora_rank(None, peft_config, args.conditioning)
            self.layout = PreferenceLoRA.for_rank(args.attribute_names, rank)
        self.prompts = _prompt_list(train_dataset)
        self.directions = args.training_directions()
        self.processing_class = processing_class
        if isinstance(model, str | os.PathLike):
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
        chosen, the number of rows trained on and the training loss)."""
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
                    write_jsonl(folder / DATA_FILE, self.collect(k))
                state.wait_for_everyone()
            rows = read_jsonl(folder / DATA_FILE)
            metrics = self._fine_tune(k, rows)
            summaries.append(self._summary(k, rows, metrics))
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
        """Samples `directions_per_prompt` directions and `num_samples` responses per direction for each prompt
        from the current policy, scores them and picks the best and worst under `v . r` on the stated scale: the
        rows of `iter-<k>/data.jsonl`, one per prompt and direction."""
        args, names = self.args, self.args.attribute_names
        n, m = args.num_samples, args.directions_per_prompt
        indices = self.iteration_prompts(k)
        prompts = [self.prompts[i] for i in indices]
        picks = sample_directions(len(prompts), self.directions, seed=[args.seed, k], per_item=m)
        directions = [[self.directions[d] for d in row] for row in picks]  # (P, M) unit vectors
        in_prompt = args.conditioning != "adapter"
        conditioned = [
            [condition_prompt(p, v, names, args.system_prompt) if in_prompt else p for v in vs]
            for p, vs in zip(prompts, directions, strict=True)
        ]
        settings = SamplingSettings(
            max_new_tokens=args.max_new_tokens,
            do_sample=True,
            temperature=args.temperature,
            top_p=args.top_p,
            batch_size=args.generation_batch_size * n,
            seed=args.seed + 1_000_003 * k,  # a different noise stream per iteration
        )
        self.model.eval()  # no dropout while sampling (training leaves the model in train mode)
        texts = self._sample(
            [c for row in conditioned for c in row for _ in range(n)],
            [v for vs in directions for v in vs for _ in range(n)],
            settings,
            f"DPA iteration {k}: sampling {n} x {m} x {len(prompts)}",
        )
        repeated = [p for p in prompts for _ in range(m * n)]
        responses = [as_response(p, t) for p, t in zip(repeated, texts, strict=True)]
        raw = self._score(repeated, responses)
        self.reward.release()  # frees a reward model loaded from a path before training needs the memory
        scale = stated_scale(raw, args.reward_scale)
        shape = (len(prompts), m, n)
        scaled = on_stated_scale(raw, scale).reshape(*shape, len(names))
        raw, texts = raw.reshape(*shape, len(names)), np.asarray(texts, dtype=object).reshape(shape)
        rows = []
        for j, (i, prompt) in enumerate(zip(indices, prompts, strict=True)):
            stated = [direction_weights(v) for v in directions[j]]
            for d, v in enumerate(directions[j]):
                # The candidates this direction chooses among: its own N, or the prompt's M x N.
                own = slice(0, m) if args.share_candidates else slice(d, d + 1)
                weighted, best, worst = select_pairs(
                    scaled[j, own].reshape(1, -1, len(names)),
                    torch.tensor([stated[d]], dtype=torch.float64) / 100,
                )
                weighted, best, worst = weighted[0], int(best[0]), int(worst[0])
                rows.append(
                    {
                        "index": i,
                        "prompt": prompt,
                        "direction": list(v),
                        "angle": round(angle_of(v), 6) if len(v) == 2 else None,
                        "weights": stated[d],
                        "conditioned_prompt": conditioned[j][d],
                        PREFERENCE: direction_gates(v) if self.layout is not None else None,
                        "candidates": texts[j, own].reshape(-1).tolist(),
                        "sampled_under": [stated[e] for e in range(m)[own] for _ in range(n)],
                        "scores": raw[j, own].reshape(-1, len(names)).tolist(),
                        "scale": None if scale is None else scale.tolist(),
                        "weighted_scores": weighted.tolist(),
                        "chosen": best,
                        "rejected": worst,
                        "gap": float(weighted[best] - weighted[worst]),
                    }
                )
        return rows

    def _sample(self, prompts: list, directions: list, settings: SamplingSettings, desc: str) -> list[str]:
        """One response per prompt; a gated policy answers each direction's prompts with its gates set to it."""
        if self.layout is None or not is_peft_model(self.model):  # iteration 1 samples from the base model
            return generate_texts(self.model, self.processing_class, prompts, settings, desc=desc)
        texts: list[str] = [""] * len(prompts)
        for v in dict.fromkeys(tuple(v) for v in directions):
            rows = [i for i, u in enumerate(directions) if tuple(u) == v]
            with preference(self.model, direction_gates(v)):
                answers = generate_texts(
                    self.model, self.processing_class, [prompts[i] for i in rows], settings, desc=desc
                )
            for i, text in zip(rows, answers, strict=True):
                texts[i] = text
        return texts

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
                f"attribute '{names[col]}' of sampled response {row}; rewards must be finite numbers"
            )
        return scores

    def _load_policy_of(self, k: int) -> None:
        """Makes `self.model` the policy after iteration `k` (0: the base model), loading its saved adapter
        unless this process just trained it."""
        if k == self._policy_iteration:
            return
        adapter = self.iteration_dir(k) / ADAPTER_DIR
        _log(f"DPA: continuing from {adapter}")
        self.model = PeftModel.from_pretrained(self.model, str(adapter), is_trainable=True)
        if self.layout is not None:
            attach(self.model, self.layout)
        self._policy_iteration = k

    def _fine_tune(self, k: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """One update of the current policy on the iteration's rows (`update`: SFT on the chosen responses, or
        DPO on chosen vs rejected); saves the adapter atomically."""
        state = PartialState()
        folder = self.iteration_dir(k)
        work, partial, final = folder / ".trainer", folder / f".{ADAPTER_DIR}.partial", folder / ADAPTER_DIR
        run_name = f"{self.args.run_name or 'dpa'}/iter-{k}"
        peft_config = None if is_peft_model(self.model) else self.peft_config
        if self.args.update == "sft":
            data = sft_dataset(rows)
            trainer = SFTTrainer(
                model=self.model,
                args=dataclasses.replace(self.args, output_dir=str(work), run_name=run_name),
                train_dataset=data,
                processing_class=self.processing_class,
                peft_config=peft_config,
                callbacks=self.callbacks,
            )
        else:
            data = dpo_dataset(rows, self.args.min_pair_gap)
            # A PeftModel (iteration 2 on) makes TRL add a frozen copy of its adapter as the reference: pi_{k-1}.
            # Iteration 1 gets a new adapter, whose reference is the base model (adapter disabled).
            trainer = (GatedDPOTrainer if self.layout is not None else DPOTrainer)(
                model=self.model,
                args=self.args.dpo_config(output_dir=str(work), run_name=run_name),
                train_dataset=data,
                processing_class=self.processing_class,
                peft_config=peft_config,
                callbacks=self.callbacks,
            )
        if self.layout is not None:  # the policy's adapter and TRL's reference copy of it, gated alike
            for name in trainer.model.peft_config:
                attach(trainer.model, self.layout, name)
        output = trainer.train()
        model = trainer.accelerator.unwrap_model(trainer.model)
        if REF_ADAPTER in getattr(model, "peft_config", {}):
            # saved adapters hold the policy only; the next DPO adds a new copy
            model.delete_adapter(REF_ADAPTER)
        trainer.save_state()  # the log history: kept with the iteration's adapter
        if state.is_main_process and partial.exists():  # left by a run killed while saving
            shutil.rmtree(partial)
        state.wait_for_everyone()
        trainer.save_model(str(partial))  # every process: sharded weights are gathered
        if self.layout is not None and state.is_main_process:
            self.layout.save(partial, prompt=self.args.conditioning == "both")
        metrics = {
            "update": self.args.update,
            "train_loss": output.training_loss,
            "train_examples": len(data),
        }
        if state.is_main_process:
            (partial / SFT_METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
            keep_logs(work, partial)  # before the work folder goes
            os.replace(partial, final)
            shutil.rmtree(work, ignore_errors=True)
        state.wait_for_everyone()
        self.model, self._policy_iteration = trainer.model, k
        del trainer  # its optimizer state, before the next iteration's generation needs the memory
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return metrics

    def _summary(self, k: int, rows: list[dict[str, Any]], trained: dict[str, Any]) -> dict[str, Any]:
        chosen = np.asarray([r["scores"][r["chosen"]] for r in rows], dtype=np.float64)
        weighted = [r["weighted_scores"] for r in rows]
        return {
            "iteration": k,
            "prompts": len({r["index"] for r in rows}),
            "rows": len(rows),
            "chosen_weighted_reward": float(np.mean([r["weighted_scores"][r["chosen"]] for r in rows])),
            "mean_weighted_reward": float(np.mean([np.mean(w) for w in weighted])),
            "mean_gap": float(np.mean([r["gap"] for r in rows])),
            "chosen_reward": {a: float(chosen[:, j].mean()) for j, a in enumerate(self.args.attribute_names)},
            **trained,  # update, train_loss, train_examples (the rows trained on: DPO keeps rows with a pair)
        }


def sft_dataset(rows: Sequence[dict[str, Any]]) -> Dataset:
    """The SFT data of an iteration: TRL's prompt-completion format, the prompt conditioned on the row's
    direction and the completion its chosen candidate (an assistant message for conversational prompts)."""
    examples = []
    for row in rows:
        prompt = row["conditioned_prompt"]
        examples.append(
            {"prompt": prompt, "completion": _completion(prompt, row["candidates"][row["chosen"]])}
        )
    return Dataset.from_list(examples)


def dpo_dataset(rows: Sequence[dict[str, Any]], min_gap: float = 0.0) -> Dataset:
    """The DPO data of an iteration: TRL's preference format, the prompt conditioned on the row's direction,
    `chosen` its best and `rejected` its worst candidate, for the rows whose gap in `v . r` is > 0 and
    >= `min_gap` (a row whose candidates all tie has no pair)."""
    examples = []
    for row in rows:
        if row["gap"] > 0 and row["gap"] >= min_gap:
            prompt, candidates = row["conditioned_prompt"], row["candidates"]
            example = {
                "prompt": prompt,
                "chosen": _completion(prompt, candidates[row["chosen"]]),
                "rejected": _completion(prompt, candidates[row["rejected"]]),
            }
            if row.get(PREFERENCE) is not None:  # the adapter's gates for the row (`conditioning="adapter"`)
                example[PREFERENCE] = row[PREFERENCE]
            examples.append(example)
    if not examples:
        largest = max((row["gap"] for row in rows), default=0.0)
        raise ValueError(
            f"no DPO pair: min_pair_gap={min_gap} but the largest gap between the best and worst v . r of a "
            f"prompt and direction is {largest:.4g} (over {len(rows)} rows); lower min_pair_gap, or sample "
            "more (num_samples, directions_per_prompt with share_candidates) - the sampled data is kept and "
            "reused"
        )
    return Dataset.from_list(examples)


class GatedDPOTrainer(DPOTrainer):
    """TRL's DPO, with every row run at its own preference (its `preference` column) by a preference-gated
    adapter (`modpo_trl.conditioning.svd_lora`): the gates of the policy and of TRL's reference copy of its adapter
    are set row by row for each forward pass."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        collate = self.data_collator

        def with_preference(examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = collate(examples)
            batch[PREFERENCE] = torch.tensor([e[PREFERENCE] for e in examples], dtype=torch.float32)
            return batch

        self.data_collator = with_preference

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if PREFERENCE not in self._signature_columns:
            self._signature_columns.append(PREFERENCE)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        w = inputs.pop(PREFERENCE)
        apply_preference(model, torch.cat([w, w]))  # TRL runs [chosen; rejected] as one batch
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:  # a forward outside a step must not run at a batch's preferences
            apply_preference(model, None)


def _completion(prompt: str | list, text: str) -> str | list[dict[str, str]]:
    if isinstance(prompt, str):
        # Standard format: TRL tokenises prompt + completion as one string, so keep the words apart.
        return text if text[:1].isspace() or prompt[-1:].isspace() else " " + text
    return [{"role": "assistant", "content": text}]


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
def _read_json(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_DIR / SFT_METRICS
    return json.loads(path.read_text()) if path.is_file() else {}


def _log(message: str) -> None:
    if PartialState().is_main_process:
        print(message, flush=True)
