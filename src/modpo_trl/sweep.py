"""A MODPO sweep: one LoRA adapter per weighting of a recipe, resumable, safe for job arrays.

Layout of `<output_dir>/<run_name>/` (the run directory):

    manifest.json         every weighting: status, metrics, fingerprints, times (read by modpo_trl.evaluate)
    recipe.yaml           the resolved recipe, for provenance
    w-0.30-0.70/          a finished adapter + tokenizer: exists under this name only when complete
    .w-0.30-0.70.tmp/     checkpoints of a weighting being trained (the resume point), deleted when done
    .w-0.30-0.70.partial/ the adapter being saved, renamed to `w-0.30-0.70/` once written
    .w-0.30-0.70.lock     held by the process training that weighting, so concurrent sweeps skip it
    .data/                distributed runs only: the pairs on disk, shared by the processes (see `_on_disk`)

Margin rewards and reference log-probs are cached by content (`MODPOConfig.use_score_cache`), so every
weighting after the first, in this process or another, trains without scoring them again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .recipe import Recipe, RecipeError, as_dict, build_reward, resolved_yaml, weight_tag

MANIFEST = "manifest.json"
TRAIN_COLUMNS = ["prompt", "chosen", "rejected"]
# Sections that decide what an adapter is; `sweep`, `eval` and paths only say which/where.
TRAINED_SECTIONS = ("method", "model", "lora", "objectives", "target", "training")


class Manifest:
    """`<run_dir>/manifest.json`, changed by read-modify-write under a file lock and replaced atomically, so
    concurrent sweeps on one run directory (a job array) keep each other's entries and readers never see a
    half-written file."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / MANIFEST
        self.lock = FileLock(f"{self.path}.lock")

    def read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        return json.loads(self.path.read_text())

    def update(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        with self.lock:
            data = self.read()
            change(data)
            write_atomic(self.path, json.dumps(data, indent=2) + "\n")
        return data

    def update_run(self, tag: str, **values: Any) -> dict[str, Any]:
        return self.update(lambda data: data["runs"][tag].update(values))


def write_atomic(path: Path, text: str) -> None:
    """Writes next to `path` and renames: readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"  # per process: writers never share a temp file
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def recipe_fingerprint(recipe: Recipe) -> str:
    """What the adapters depend on in the recipe: a done weighting trained under another one gets a warning."""
    from .cache import fingerprint

    resolved = as_dict(recipe)
    return fingerprint({k: resolved[k] for k in TRAINED_SECTIONS})


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")  # local time, with its UTC offset


def _new_entry(recipe: Recipe, weighting: list[float]) -> dict[str, Any]:
    tag = weight_tag(weighting)
    return {
        "tag": tag,
        "weights": weighting,
        "trainer_weights": recipe.trainer_weights(weighting),
        "status": "pending",
        "adapter": tag,
        "metrics": {},
        "fingerprints": {},
        "started": None,
        "finished": None,
        "error": None,
        "resumed_from": None,
    }


def _register(recipe: Recipe) -> Callable[[dict[str, Any]], None]:
    """Writes the manifest header and a `pending` entry for every weighting it does not know yet."""

    def change(data: dict[str, Any]) -> None:
        data.update(
            run_name=recipe.run_name,
            method=recipe.method,
            base_model=recipe.model.path,
            objectives=recipe.objective_names,
            target=recipe.objective_names[recipe.target_index],
            recipe=as_dict(recipe),
        )
        runs = data.setdefault("runs", {})
        for weighting in recipe.weightings():
            runs.setdefault(weight_tag(weighting), _new_entry(recipe, weighting))

    return change


def complete_checkpoints(folder: Path) -> list[Path]:
    """`checkpoint-<step>` folders of `folder`, oldest first, that were completely written.

    `Trainer` writes a checkpoint in place and its `trainer_state.json` last, so a process killed while saving
    leaves a folder without one, which `transformers.trainer_utils.get_last_checkpoint` would pick.
    """
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / "trainer_state.json").is_file()
    ]
    return [p for _, p in sorted(found)]


def is_done(entry: dict[str, Any] | None, run_dir: Path) -> bool:
    return bool(entry) and entry["status"] == "done" and (run_dir / entry["adapter"]).is_dir()


def plan(recipe: Recipe) -> list[dict[str, Any]]:
    """Every weighting with its status in the manifest (if any) and what a sweep would do with it now."""
    run_dir = recipe.run_dir
    runs = Manifest(run_dir).read().get("runs", {})
    rows = []
    for index, weighting in enumerate(recipe.weightings()):
        tag = weight_tag(weighting)
        entry = runs.get(tag)
        status = entry["status"] if entry else "pending"
        if entry and status == "done" and not is_done(entry, run_dir):
            status = "done, adapter folder missing"
        checkpoints = complete_checkpoints(run_dir / f".{tag}.tmp")
        if checkpoints and not is_done(entry, run_dir):
            status += f", resumable from {checkpoints[-1].name}"
        selected = recipe.sweep.index in (None, index)
        action = ("skip (done)" if is_done(entry, run_dir) else "train") if selected else "-"
        rows.append({"index": index, "tag": tag, "weights": weighting, "status": status, "action": action})
    return rows


def _main_decides(fn: Callable[[], Any]) -> Any:
    """Runs `fn` on the main process only and gives its result to every process, so all ranks of a
    distributed launch take the same branch."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    result = [fn() if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(result, from_process=0)
    return result[0]


def training_args(recipe: Recipe, weighting: list[float], output_dir: Path):
    """The `MODPOConfig` of one weighting; a bad `training` value is reported as a recipe error."""
    from .modpo_config import MODPOConfig

    others = [n for i, n in enumerate(recipe.objective_names) if i != recipe.target_index]
    try:
        return MODPOConfig(
            **recipe.training,
            weights=recipe.trainer_weights(weighting),
            objective_names=[recipe.objective_names[recipe.target_index], *others],
            output_dir=str(output_dir),
            run_name=f"{recipe.run_name}/{weight_tag(weighting)}",
        )
    except (TypeError, ValueError) as e:
        raise RecipeError(f"training: {e}") from e


def margin_sources(recipe: Recipe) -> list:
    """One reward source per non-target objective, in recipe order; reward models with a `train:` section
    that are not trained yet are trained first."""
    from .models import check_loadable

    sources = []
    for i, objective in enumerate(recipe.objectives):
        if i == recipe.target_index:
            continue
        key = f"objectives[{i}] ({objective.name}).reward"
        reward = objective.reward
        if reward.type == "reward_model" and reward.train:
            _train_reward_model_if_needed(reward.train, reward.path, key)
        # e.g. the adapter of a DPO stage not run yet: found now, not after loading the policy
        if reward.path:
            hint = "; train it first, e.g. with the recipe of its DPO stage (recipes/<task>/dpo_*.yaml)"
            check_loadable(reward.path, f"{key}.path", hint)
        sources.append(build_reward(reward, objective.name, key))
    return sources


def _train_reward_model_if_needed(train: dict[str, Any], path: str, key: str) -> None:
    import inspect

    from accelerate import PartialState

    try:
        from .reward_modeling import is_trained, train_reward_model
    except ImportError as e:
        raise RecipeError(
            f"{key}.train needs modpo_trl.reward_modeling, which cannot be imported: {e}"
        ) from e
    try:
        inspect.signature(train_reward_model).bind(**train, output_dir=path)
    except TypeError as e:
        raise RecipeError(
            f"{key}.train={train}: {e} (see modpo_trl.reward_modeling.train_reward_model)"
        ) from e
    if not is_trained(path):
        _log(f"{key}: training the reward model into {path} first ...")
        train_reward_model(**train, output_dir=path)  # every process takes part, as in any Trainer run
    PartialState().wait_for_everyone()


def _on_disk(dataset, folder: Path):
    """`dataset` saved to (or found in) `folder` and memory-mapped from there, for distributed runs.

    TRL hands precomputed reference log-probs from the main process to the others through a cache file next to
    the data set's own files; an in-memory data set has none, so each process would look in its own temporary
    folder and all but the main one fail.
    """
    from accelerate import PartialState
    from datasets import load_from_disk

    state = PartialState()
    if state.is_main_process and not (folder / "dataset_info.json").exists():
        tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
        dataset.save_to_disk(str(tmp))
        try:
            os.replace(tmp, folder)
        except OSError:  # another sweep on this run directory saved the same data meanwhile
            shutil.rmtree(tmp)
    state.wait_for_everyone()
    return load_from_disk(str(folder))


def _log(message: str) -> None:
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(message, flush=True)


def run_sweep(recipe: Recipe) -> dict[str, Any]:
    """Trains every weighting of `recipe` (or only `sweep.index`) that is not done yet; returns the manifest.

    A weighting is done when its manifest status is `done` and its adapter folder exists; anything else is
    (re)trained, resuming from the last complete checkpoint of an interrupted run of the same recipe.
    """
    from .models import check_policy

    weightings = recipe.weightings()
    indices = [recipe.sweep.index] if recipe.sweep.index is not None else list(range(len(weightings)))
    run_dir = recipe.run_dir
    # Everything that can fail on the recipe fails here, before data or models are loaded.
    check_policy(recipe)
    args = {
        i: training_args(recipe, weightings[i], run_dir / f".{weight_tag(weightings[i])}.tmp")
        for i in indices
    }

    from accelerate import PartialState

    state = PartialState()
    manifest = Manifest(run_dir)
    recipe_fp = recipe_fingerprint(recipe)
    if state.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "recipe.yaml", resolved_yaml(recipe))
        manifest.update(_register(recipe))
    state.wait_for_everyone()

    def pending() -> list[int]:
        runs = manifest.read()["runs"]
        todo = []
        for i in indices:
            entry = runs[weight_tag(weightings[i])]
            if not is_done(entry, run_dir):
                todo.append(i)
            elif entry["fingerprints"].get("recipe") not in (None, recipe_fp):
                _log(
                    f"{entry['tag']}: done under a different recipe; kept. Delete {run_dir / entry['tag']} "
                    "(or use another run_name) to train it with this one."
                )
        return todo

    todo = _main_decides(pending)
    if not todo:
        _log(f"{run_dir}: all {len(indices)} selected weighting(s) done; nothing to train")
        return manifest.read()

    from .cache import content_fingerprint, path_fingerprint
    from .data import load_preference_data

    sources = margin_sources(recipe)
    target = recipe.objectives[recipe.target_index]
    train_data, eval_data = load_preference_data(target.data, key=f"objectives[{recipe.target_index}].data")
    data_fp = content_fingerprint(train_data, TRAIN_COLUMNS)
    if state.num_processes > 1:
        train_data = _on_disk(train_data, run_dir / ".data" / f"train-{data_fp}")
        if eval_data is not None:
            eval_fp = content_fingerprint(eval_data, TRAIN_COLUMNS)
            eval_data = _on_disk(eval_data, run_dir / ".data" / f"eval-{eval_fp}")
    fingerprints = {
        "recipe": recipe_fp,
        "base_model": path_fingerprint(recipe.model.path),
        "train_data": data_fp,
        "rewards": {s.name: s.fingerprint() for s in sources},
    }
    for i in indices:
        tag = weight_tag(weightings[i])
        prefix = f"[{i + 1}/{len(weightings)}] {tag}"
        if i not in todo:
            _log(f"{prefix}: done, skipped")
            continue
        lock = FileLock(run_dir / f".{tag}.lock")

        def claim(tag=tag, lock=lock) -> str:
            try:
                lock.acquire(timeout=0)
            except Timeout:
                return "busy"
            if is_done(manifest.read()["runs"][tag], run_dir):  # finished by another process meanwhile
                lock.release()
                return "done"
            return "train"

        decision = _main_decides(claim)
        if decision != "train":
            _log(f"{prefix}: {'done' if decision == 'done' else 'being trained by another process'}, skipped")
            continue
        try:
            _train_one(recipe, args[i], weightings[i], train_data, eval_data, sources, fingerprints, prefix)
        finally:
            if state.is_main_process:
                lock.release()
    return manifest.read()


def _train_one(recipe, args, weighting, train_data, eval_data, sources, fingerprints, prefix) -> None:
    import gc

    import torch
    from accelerate import PartialState

    from .models import load_policy, lora_config
    from .modpo_trainer import MODPOTrainer

    state = PartialState()
    run_dir, tag = recipe.run_dir, weight_tag(weighting)
    manifest = Manifest(run_dir)
    tmp_dir, partial_dir, final_dir = Path(args.output_dir), run_dir / f".{tag}.partial", run_dir / tag

    def resume_point() -> str | None:
        entry = manifest.read()["runs"][tag]
        if entry["fingerprints"].get("recipe") not in (None, fingerprints["recipe"]) and tmp_dir.exists():
            print(
                f"{prefix}: checkpoints in {tmp_dir} are from a different recipe; starting over", flush=True
            )
            shutil.rmtree(tmp_dir)
        checkpoints = complete_checkpoints(tmp_dir)
        resume = str(checkpoints[-1]) if checkpoints else None
        manifest.update_run(
            tag,
            status="running",
            started=_now(),
            finished=None,
            error=None,
            metrics={},
            fingerprints=fingerprints,
            resumed_from=Path(resume).name if resume else None,
        )
        return resume

    resume = _main_decides(resume_point)
    _log(f"{prefix}: training{f' (resuming from {Path(resume).name})' if resume else ''} ...")
    started = time.monotonic()
    try:
        model, tokenizer = load_policy(recipe)
        trainer = MODPOTrainer(
            model=model,
            args=args,
            train_dataset=train_data,
            eval_dataset=eval_data,
            processing_class=tokenizer,
            margin_rewards=sources,
            peft_config=lora_config(recipe),
        )
        output = trainer.train(resume_from_checkpoint=resume)
        if state.is_main_process and partial_dir.exists():  # left by a run killed while saving
            shutil.rmtree(partial_dir)
        state.wait_for_everyone()
        trainer.save_model(str(partial_dir))  # every process: DeepSpeed ZeRO-3 / FSDP gather the weights
        state.wait_for_everyone()
        if state.is_main_process:
            if final_dir.exists():  # a stale folder without a `done` status (e.g. copied, or a crash)
                shutil.rmtree(final_dir)
            os.replace(partial_dir, final_dir)
            shutil.rmtree(tmp_dir, ignore_errors=True)
            logs = [e for e in trainer.state.log_history if "loss" in e]
            metrics = {**(logs[-1] if logs else {}), "train_loss": output.training_loss}
            manifest.update_run(tag, status="done", finished=_now(), metrics=metrics)
        state.wait_for_everyone()
    except Exception as e:
        if state.is_main_process:
            manifest.update_run(tag, status="failed", finished=_now(), error=f"{type(e).__name__}: {e}")
        raise
    finally:
        trainer = model = None  # free the policy before the next weighting loads its own
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    _log(
        f"{prefix}: done in {time.monotonic() - started:.0f}s (train_loss {output.training_loss:.4f}) -> {final_dir}"
    )
