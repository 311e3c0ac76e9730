"""DPA in the run engine: one direction-conditioned adapter (`<run_dir>/dpa/`), trained by iterated
rejection-sampling fine-tuning or directional DPO (`training.update`) in its work folder
(`<run_dir>/.dpa.tmp/iter-<k>/`).

The reward is either one reward model with an output per objective (`objectives[0].reward`, `output` unset)
or one reward per objective. The finished adapter keeps each iteration's rejection-sampling data in
`dpa/iterations/iter-<k>.jsonl`.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate import PartialState

from ..conditioning.directions import (
    angle_of,
    condition_prompt,
    direction_gates,
    direction_weights,
    unit_vector,
)
from ..conditioning.svd_lora import saved_conditioning
from ..rewards.cache import path_fingerprint
from ..rewards.vector import MultiObjectiveReward, StackedReward
from ..trainers.dpa_config import DPAConfig, evaluation_angles
from ..trainers.dpa_trainer import ADAPTER_DIR, DATA_FILE, DPATrainer
from ..trainers.logs import LOG_OUTPUTS, keep_logs
from .data import load_prompts
from .engine import conditioned_run, is_done
from .method import Candidate, Method, Prepared, Run, Trained, usage_notes
from .models import check_loadable, load_policy, lora_config
from .recipe import Recipe, RecipeError
from .rewards import ready_reward, train_reward_model_if_needed

TAG = "dpa"  # the run's manifest entry and adapter folder: <run_dir>/dpa/


class DPA(Method):
    name = "dpa"
    trainer_class = DPATrainer
    has_target = False  # every objective is an output of the reward
    preference_space = "direction"  # a user preference is a unit vector v, and weights = v

    def check(self, recipe: Recipe) -> None:
        if not recipe.lora.enabled:
            raise RecipeError(
                "lora.enabled=false: DPA trains one LoRA adapter across its iterations; enable it"
            )
        _prompt_data(recipe)
        if _reward_layout(recipe) == "multi":
            reward = recipe.objectives[0].reward
            if Path(reward.path).expanduser().exists():  # labels are read from its config.json, nothing loads
                _check_reward(
                    MultiObjectiveReward(reward.path, reward.tokenizer, attributes=recipe.objective_names),
                    recipe,
                )

    def runs(self, recipe: Recipe, dry_run: bool = False) -> list[Run]:
        return [conditioned_run(DPAConfig, recipe, TAG, dry_run, attribute_names=recipe.objective_names)]

    def describe(self, recipe: Recipe, runs: list[Run]) -> list[str]:
        args, names = runs[0].args, recipe.objective_names
        reward = recipe.objectives[0].reward
        if _reward_layout(recipe) == "multi":
            trained = Path(reward.path).expanduser().exists()
            where = reward.path if trained or not reward.train else f"{reward.path} (to be trained first)"
            lines = [f"# reward: one reward model with outputs {names}: {where}"]
        else:
            lines = [
                f"# reward: one per objective: {[f'{o.name}: {o.reward.type}' for o in recipe.objectives]}"
            ]
        pool = args.training_directions()
        two = len(names) == 2 and args.directions is None
        data = _prompt_data(recipe)
        lines += [
            f"# prompts: {data.path} (column {data.prompt_column!r}); update: {args.update}; "
            f"{args.directions_per_prompt} direction(s) per prompt x N = {args.num_samples} samples"
            + (", shared" if args.share_candidates and args.directions_per_prompt > 1 else "")
            + f"; v . r on the {args.reward_scale} scale",
            f"# training directions ({len(pool)}): "
            f"{[round(angle_of(v), 4) for v in pool] if two else [list(v) for v in pool]}",
        ]
        if args.directions is None:
            lines.append(
                f"# held-out angles: {list(args.heldout_angles)}; evaluated angles: {evaluation_angles(args)}"
            )
        lines.append(f"# iterations in {runs[0].work_dir}:")
        lines += [f"  iter-{row['iteration']}  {row['status']}" for row in iteration_status(runs[0])]
        return lines

    def card_notes(self, recipe: Recipe, run: Run) -> list[str]:
        names = recipe.objective_names
        return usage_notes(
            f"One adapter for every direction v over {names}: state v in the system prompt, as in training:",
            "from modpo_trl.conditioning.directions import condition_prompt",
            f"prompt = condition_prompt(prompt, v={[round(1 / len(names) ** 0.5, 4)] * len(names)}, "
            f"attribute_names={names}, system_prompt={run.args.system_prompt!r})",
        )

    def prepare(self, recipe: Recipe) -> Prepared:
        reward = build_reward_vector(recipe)
        _check_reward(reward, recipe)
        try:
            prompts = load_prompts(_prompt_data(recipe))
        except RecipeError as e:
            raise RecipeError(f"objectives[0] ({recipe.objective_names[0]}).data: {e}") from None
        fingerprints = {
            "base_model": path_fingerprint(recipe.model.path),
            "rewards": {reward.name: reward.fingerprint()},
        }
        return Prepared(fingerprints, {"prompts": prompts, "reward": reward})

    def resume_point(self, run: Run) -> str | None:
        """The last finished iteration: `DPATrainer.train` skips it and every one before."""
        done = [row for row in iteration_status(run) if row["status"] == "done"]
        return done[-1]["folder"] if done else None

    def train(self, recipe: Recipe, run: Run, prepared: Prepared, resume: str | None) -> Trained:
        model, tokenizer = load_policy(recipe)
        trainer = DPATrainer(
            model,
            run.args,
            prepared.inputs["prompts"],
            tokenizer,
            reward=prepared.inputs["reward"],
            peft_config=lora_config(recipe),
        )
        result = trainer.train()

        def save(folder: Path) -> None:
            if PartialState().is_main_process:
                shutil.copytree(result["adapter"], folder, ignore=shutil.ignore_patterns(*LOG_OUTPUTS))
                for k in range(1, run.args.iterations + 1):
                    data = trainer.iteration_dir(k) / DATA_FILE
                    (folder / "iterations").mkdir(exist_ok=True)
                    shutil.copy2(data, folder / "iterations" / f"iter-{k}.jsonl")
                    # each iteration's SFT log history and TensorBoard runs: iterations/iter-<k>/
                    keep_logs(trainer.iteration_dir(k) / ADAPTER_DIR, folder / "iterations" / f"iter-{k}")

        return Trained(save, {f"iter-{s['iteration']}": s for s in result["iterations"]})

    def candidates(
        self, recipe: Recipe, run_dir: Path, entries: dict[str, dict[str, Any]]
    ) -> list[Candidate]:
        """The adapter asked for each evaluation direction (`training.eval_angles`, held-out angles included;
        label `t-15`, `t+10-heldout`, or `v97_-26_0` for explicit directions). `weights` and `preference` are
        the direction `v`, in the order of the objectives."""
        entry = entries.get(TAG)
        if not is_done(entry, run_dir):
            return []
        args = self.runs(recipe, dry_run=True)[0].args
        return [_candidate(recipe, run_dir, entry, args, v) for v in args.evaluation_directions()]

    def candidate_at(
        self, recipe: Recipe, run_dir: Path, entries: dict[str, dict[str, Any]], weights: list[float]
    ) -> Candidate | None:
        entry = entries.get(TAG)
        if not is_done(entry, run_dir):
            return None
        args = self.runs(recipe, dry_run=True)[0].args
        return _candidate(
            recipe, run_dir, entry, args, unit_vector(weights, len(recipe.objectives), "weights")
        )


def _candidate(
    recipe: Recipe, run_dir: Path, entry: dict[str, Any], args: DPAConfig, v: Sequence[float]
) -> Candidate:
    """The adapter asked for the direction `v` as it was trained (its folder says how): its `prompt_fn` states `v` in
    the system prompt, and a preference-gated adapter runs with its gates at `v` (`direction_gates`)."""
    held_out, parameter = False, None
    if args.directions is None:
        t = angle_of(v)
        held_out = any(abs(t - float(h)) < 1e-6 for h in args.heldout_angles)
        label = f"t{round(t, 4):+g}" + ("-heldout" if held_out else "")
        parameter = {"angle": t}  # the preference's own coordinate, for controllability and generalisation
    else:
        label = "v" + "_".join(str(w) for w in direction_weights(v))
    adapter = run_dir / entry["adapter"]
    conditioning = saved_conditioning(adapter)
    prompt_fn = functools.partial(
        condition_prompt,
        v=v,
        attribute_names=recipe.objective_names,
        system_prompt=args.system_prompt,
    )
    return Candidate(
        TAG,
        label,
        weights=list(v),
        adapter=str(adapter),
        preference=list(v),
        prompt_fn=prompt_fn if conditioning != "adapter" else None,
        held_out=held_out,
        parameter=parameter,
        adapter_preference=direction_gates(v) if conditioning != "prompt" else None,
    )


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
    are trained first (`modpo_trl.rewards.modeling`)."""
    names = recipe.objective_names
    if _reward_layout(recipe) == "multi":
        cfg, key = recipe.objectives[0].reward, f"objectives[0] ({names[0]}).reward"
        if cfg.train:
            train_reward_model_if_needed({"attributes": names, **cfg.train}, cfg.path, key)
        check_loadable(cfg.path, f"{key}.path")
        return MultiObjectiveReward(
            cfg.path,
            cfg.tokenizer,
            attributes=names,
            max_length=cfg.max_length,
            batch_size=cfg.batch_size,
            name=Path(cfg.path).name,
        )
    sources = [
        ready_reward(o.reward, o.name, f"objectives[{i}] ({o.name}).reward")
        for i, o in enumerate(recipe.objectives)
    ]
    return StackedReward(sources, names)


def _check_reward(reward: MultiObjectiveReward | StackedReward, recipe: Recipe) -> None:
    """A reward model without an output per objective is a recipe error (found from its config alone)."""
    try:
        reward.check()
    except ValueError as e:
        raise RecipeError(f"objectives[0] ({recipe.objective_names[0]}).reward: {e}") from None


def iteration_status(run: Run) -> list[dict[str, Any]]:
    """Each iteration's state in the work folder: `done` (adapter saved), `data only` (SFT to redo) or
    `pending`."""
    rows = []
    for k in range(1, run.args.iterations + 1):
        folder = run.work_dir / f"iter-{k}"
        done, data = (folder / ADAPTER_DIR).is_dir(), (folder / DATA_FILE).is_file()
        rows.append(
            {
                "iteration": k,
                "status": "done" if done else "data only" if data else "pending",
                "folder": str(folder),
            }
        )
    return rows
