"""MODPO in the run engine: one LoRA adapter per weighting of the recipe's sweep (`<run_dir>/w-0.30-0.70/`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainerState

from ..rewards.cache import path_fingerprint
from ..trainers.modpo_config import MODPOConfig
from ..trainers.modpo_trainer import MODPOTrainer
from .data import load_preference_data
from .engine import check_finite_metrics, is_done, pairs_on_disk, work_dir
from .method import Candidate, Method, Prepared, Run, Trained, trainer_config
from .models import load_policy, lora_config
from .recipe import Recipe, weight_tag
from .rewards import margin_columns, ready_reward

TRAIN_COLUMNS = ["prompt", "chosen", "rejected"]


class MODPO(Method):
    name = "modpo"
    trainer_class = MODPOTrainer

    def runs(self, recipe: Recipe, dry_run: bool = False) -> list[Run]:
        names, t = recipe.objective_names, recipe.target_index
        runs = []
        for index, weighting in enumerate(recipe.weightings()):
            tag = weight_tag(weighting)
            args = trainer_config(
                MODPOConfig,
                recipe,
                dry_run,
                weights=recipe.trainer_weights(weighting),
                objective_names=[names[t], *(n for i, n in enumerate(names) if i != t)],
                output_dir=str(work_dir(recipe.run_dir, tag)),
                run_name=f"{recipe.run_name}/{tag}",
            )
            runs.append(Run(tag, index, args, weighting, recipe.trainer_weights(weighting)))
        return runs

    def prepare(self, recipe: Recipe) -> Prepared:
        margins = {}
        for i, objective in enumerate(recipe.objectives):
            if i != recipe.target_index:
                hint = "; train it first, e.g. with the recipe of its DPO stage (recipes/<task>/dpo_*.yaml)"
                key = f"objectives[{i}] ({objective.name}).reward"
                source = ready_reward(objective.reward, objective.name, key, hint)
                margins[objective.name] = (source, objective.reward, key)
        key = f"objectives[{recipe.target_index}].data"
        train, evals = load_preference_data(recipe.objectives[recipe.target_index].data, key=key)
        (train, evals), readers = margin_columns(margins, [train, evals], recipe, MODPOConfig)
        train, evals, data_fp = pairs_on_disk(train, evals, recipe.run_dir, TRAIN_COLUMNS, "")
        fingerprints = {
            "base_model": path_fingerprint(recipe.model.path),
            "train_data": data_fp,
            "rewards": {s.name: s.fingerprint() for s, _, _ in margins.values()},
        }
        return Prepared(fingerprints, {"train": train, "eval": evals, "margin_rewards": readers})

    def train(self, recipe: Recipe, run: Run, prepared: Prepared, resume: str | None) -> Trained:
        return fit(MODPOTrainer, recipe, run, prepared, resume)

    def candidates(
        self, recipe: Recipe, run_dir: Path, entries: dict[str, dict[str, Any]]
    ) -> list[Candidate]:
        return [
            Candidate("modpo", tag, weights=entry["weights"], adapter=str(run_dir / entry["adapter"]))
            for tag, entry in entries.items()
            if is_done(entry, run_dir)
        ]


def fit(trainer_class: type, recipe: Recipe, run: Run, prepared: Prepared, resume: str | None) -> Trained:
    """Trains `run` with a DPO-style trainer (`MODPOTrainer`, `MOCTrainer`) on the prepared pairs and margin
    rewards, the LoRA adapter of the recipe on its policy."""
    model, tokenizer = load_policy(recipe)
    trainer = trainer_class(
        model=model,
        args=run.args,
        train_dataset=prepared.inputs["train"],
        eval_dataset=prepared.inputs["eval"],
        processing_class=tokenizer,
        margin_rewards=prepared.inputs["margin_rewards"],
        peft_config=lora_config(recipe),
        callbacks=[StopOnNonFinite(run.tag)],
    )
    final = Path(resume or "") / "adapter_model.safetensors"
    state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json")) if resume else None
    if state is not None and 0 < run.args.max_steps <= state.global_step and final.is_file():
        # The checkpoint is the finished training (a run stopped while saving its adapter): it is taken as it is,
        # since Trainer resumed mid-epoch at max_steps would train one step more.
        set_peft_model_state_dict(trainer.model, load_file(final))
        trainer.state, output = state, None
    else:
        output = trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()  # trainer_state.json (the log history), kept with the adapter (runs.publish)
    return Trained(lambda folder: trainer.save_model(str(folder)), final_metrics(trainer, output, resume))


def final_metrics(trainer: Any, output: Any, resume: str | None = None) -> dict[str, Any]:
    """The last logged training metrics and the mean training loss, for the manifest. A resumed training has no
    mean loss (None): the trainer averages only the steps of this process, over every step."""
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return {
        **(logs[-1] if logs else {}),
        "train_loss": None if resume or output is None else output.training_loss,
    }


class StopOnNonFinite(TrainerCallback):
    """Stops a training as soon as a logged loss or gradient norm is NaN or infinite (`NonFiniteError`)."""

    def __init__(self, tag: str):
        self.tag = tag

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any):
        check_finite_metrics(f"{self.tag} (step {state.global_step})", logs or {})
