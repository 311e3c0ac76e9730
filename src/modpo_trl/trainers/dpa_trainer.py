"""Directional Preference Alignment (Wang et al., 2024, arXiv:2402.18571): iterated, preference-conditioned
rejection-sampling fine-tuning (RSF) with a multi-objective reward.

One iteration `k`, for every prompt `x`:

    v      ~ the training directions (unit vectors; 2 attributes: (cos t, sin t), t on an angle grid)
    x_v    = x with v stated in its system prompt            (modpo_trl.conditioning.directions)
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
from trl import SFTTrainer

from ..conditioning.directions import angle_of, condition_prompt, sample_directions
from ..generation import SamplingSettings, as_response, generate_texts
from ..rewards.vector import as_reward_vector
from ..storage import read_jsonl, write_jsonl
from .dpa_config import DPAConfig, check_dpa_fields
from .logs import keep_logs

DATA_FILE, ADAPTER_DIR, SFT_METRICS = "data.jsonl", "adapter", "dpa_iteration.json"


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
        self.args, self.peft_config, self.callbacks = args, peft_config, callbacks
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
        chosen, the SFT loss)."""
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
        adapter = self.iteration_dir(k) / ADAPTER_DIR
        _log(f"DPA: continuing from {adapter}")
        self.model = PeftModel.from_pretrained(self.model, str(adapter), is_trainable=True)
        self._policy_iteration = k

    def _fine_tune(self, k: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """SFT of the current policy on (conditioned prompt, chosen response); saves the adapter atomically."""
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
        trainer.save_state()  # the log history: kept with the iteration's adapter
        if state.is_main_process and partial.exists():  # left by a run killed while saving
            shutil.rmtree(partial)
        state.wait_for_everyone()
        trainer.save_model(str(partial))  # every process: sharded weights are gathered
        metrics = {"train_loss": output.training_loss, "examples": len(rows)}
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
def _read_json(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_DIR / SFT_METRICS
    return json.loads(path.read_text()) if path.is_file() else {}


def _log(message: str) -> None:
    if PartialState().is_main_process:
        print(message, flush=True)
