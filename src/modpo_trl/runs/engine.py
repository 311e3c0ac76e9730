"""The run engine: every method's runs trained the same way, resumable, safe for job arrays.

A recipe is resolved once into a `Plan` (its method, its runs with their trainer configs, the runs selected by
`sweep.index`); `execute(plan)` trains what is not done yet. Layout of `<output_dir>/<run_name>/` (the run
directory):

    manifest.json      every run: status, metrics, fingerprints, times (read by the evaluation and serving)
    recipe.yaml        the resolved recipe, for provenance
    <tag>/             a finished adapter + tokenizer (`w-0.30-0.70/`, `moc/`, `dpa/`): exists under this name
                       only when complete
    .<tag>.tmp/        the work folder of a run being trained (checkpoints: the resume point), deleted when done
    .<tag>.partial/    the adapter being saved, renamed to `<tag>/` once written
    .<tag>.lock        held by the process training that run, so concurrent sweeps skip it
    .data/             distributed runs only: the pairs on disk, shared by the processes (see `on_disk`)

Scores that depend only on the data (margin rewards, reference log-probs) are cached by content, so every run
after the first, in this process or another, trains without scoring them again.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from datasets import Dataset, load_from_disk
from filelock import FileLock, Timeout

from ..rewards.cache import fingerprint
from ..storage import write_atomic
from .method import Method, Prepared, Run, trainer_config
from .models import check_policy
from .publish import check_outputs, finish_adapter
from .recipe import TRAINED_SECTIONS, Recipe, RecipeError, as_dict, resolved_yaml

MANIFEST = "manifest.json"


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

    def runs(self) -> dict[str, dict[str, Any]]:
        return self.read().get("runs", {})

    def update(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        with self.lock:
            data = self.read()
            change(data)
            write_atomic(self.path, json.dumps(data, indent=2) + "\n")
        return data

    def update_run(self, tag: str, **values: Any) -> dict[str, Any]:
        return self.update(lambda data: data["runs"][tag].update(values))


@dataclass
class Plan:
    """A recipe resolved for training: its method, every run it asks for, the indices `sweep.index` selects (all
    of them without it), and whether finished runs trained under other trained sections are trained again."""

    recipe: Recipe
    method: Method
    runs: list[Run]
    selected: list[int]
    retrain_changed: bool = False

    @property
    def run_dir(self) -> Path:
        return self.recipe.run_dir


def make_plan(recipe: Recipe, method: Method, dry_run: bool = False, retrain_changed: bool = False) -> Plan:
    """Resolves `recipe` for `method`: every check that needs no model or data runs here."""
    method.check(recipe)
    runs = method.runs(recipe, dry_run=dry_run)
    check_outputs(recipe, runs)
    index = recipe.sweep.index
    if index is not None and not 0 <= index < len(runs):
        raise RecipeError(f"sweep.index={index} is out of range; valid: 0..{len(runs) - 1}")
    selected = [index] if index is not None else list(range(len(runs)))
    return Plan(recipe, method, runs, selected, retrain_changed)


def work_dir(run_dir: Path, tag: str) -> Path:
    """Where a run keeps its checkpoints until it is done."""
    return run_dir / f".{tag}.tmp"


def conditioned_run(config_class: type, recipe: Recipe, tag: str, dry_run: bool, **fields: Any) -> Run:
    """The single run of a method that trains one model for every preference (MOC, DPA)."""
    args = trainer_config(
        config_class,
        recipe,
        dry_run,
        **fields,
        output_dir=str(work_dir(recipe.run_dir, tag)),
        run_name=f"{recipe.run_name}/{tag}",
    )
    return Run(tag, 0, args)


def check_output_dir(recipe: Recipe) -> None:
    """The run folder can be created: its nearest existing parent is a folder this process can write in. Probed
    with a temporary folder, removed at once, so that nothing is left behind by a recipe that fails later."""
    parent = recipe.run_dir.absolute()
    while not parent.exists():
        parent = parent.parent
    try:
        tempfile.TemporaryDirectory(dir=parent, prefix=".modpo_trl-probe-").cleanup()
    except OSError as e:
        where = "" if parent == recipe.run_dir.absolute() else f" (inside {str(parent)!r})"
        raise RecipeError(
            f"output_dir={recipe.output_dir!r} cannot be created{where}: {e.strerror or e}; valid: a folder you "
            "can write in"
        ) from None


def is_done(entry: dict[str, Any] | None, run_dir: Path) -> bool:
    return bool(entry) and entry["status"] == "done" and (run_dir / entry["adapter"]).is_dir()


def trained_sections(recipe: Recipe) -> dict[str, Any]:
    """What the adapters depend on in the recipe (recorded with each run, compared on the next)."""
    resolved = as_dict(recipe)
    return {k: resolved[k] for k in TRAINED_SECTIONS}


def recipe_fingerprint(recipe: Recipe) -> str:
    return fingerprint(trained_sections(recipe))


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """`{"training": {"beta": 0.1}}` -> `{"training.beta": 0.1}` (list items by index)."""
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _leaves(item, f"{prefix}{key}.").items()}
    if isinstance(value, list) and value and any(isinstance(v, dict | list) for v in value):
        return {k: v for i, item in enumerate(value) for k, v in _leaves(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): value}


def recipe_changes(entry: dict[str, Any] | None, recipe: Recipe) -> list[str] | None:
    """How `recipe`'s trained sections differ from those a finished run was trained under: `["training.beta: 0.1 ->
    0.5", ...]`; None when they do not (or the run is not finished); `[]` when only the fingerprint says so (a run
    recorded before its sections were)."""
    if not entry or entry["status"] != "done":
        return None
    recorded = entry["fingerprints"].get("recipe")
    if recorded in (None, recipe_fingerprint(recipe)):
        return None
    before, now = _leaves(entry.get("trained_recipe") or {}), _leaves(trained_sections(recipe))
    if not before:
        return []

    def shown(values: dict[str, Any], key: str) -> str:
        return repr(values[key]) if key in values else "(unset)"

    return [
        f"{key}: {shown(before, key)} -> {shown(now, key)}"
        for key in sorted(set(before) | set(now))
        if key not in before or key not in now or before[key] != now[key]
    ]


def describe_changes(changes: list[str]) -> str:
    return "; ".join(changes) if changes else "which keys is not recorded for this run"


def status_rows(plan: Plan) -> list[dict[str, Any]]:
    """Every run with its status in the manifest (if any) and what `execute` would do with it now."""
    entries = Manifest(plan.run_dir).runs()
    rows = []
    for run in plan.runs:
        entry, done = entries.get(run.tag), is_done(entries.get(run.tag), plan.run_dir)
        status = entry["status"] if entry else "pending"
        if entry and status == "done" and not done:
            status = "done, adapter folder missing"
        changed = recipe_changes(entry, plan.recipe) if done else None
        if changed is not None:
            status += f", under another recipe ({describe_changes(changed)})"
        resume = plan.method.resume_point(run)
        if resume and not done:
            status += f", resumable from {Path(resume).name}"
        if changed is not None:
            action = (
                "retrain (recipe changed)" if plan.retrain_changed else "skip (--retrain-changed retrains)"
            )
        else:
            action = "skip (done)" if done else "train"
        action = action if run.index in plan.selected else "-"
        rows.append(
            {"index": run.index, "tag": run.tag, "weights": run.weights, "status": status, "action": action}
        )
    return rows


def print_plan(plan: Plan) -> None:
    recipe = plan.recipe
    rows = status_rows(plan)
    target = f" (target {recipe.objective_names[recipe.target_index]!r})" if plan.method.has_target else ""
    print(
        f"# runs in {plan.run_dir}: {len(rows)} run(s) of method {plan.method.name} over {recipe.objective_names}{target}"
    )
    header = {"index": "index", "tag": "tag", "weights": "weights", "status": "status", "action": "action"}
    cells = [header] + [
        {
            **r,
            "weights": "all (conditioned)"
            if r["weights"] is None
            else str([round(w, 4) for w in r["weights"]]),
        }
        for r in rows
    ]
    widths = {k: max(len(str(c[k])) for c in cells) for k in header}
    for c in cells:
        print("  ".join(str(c[k]).ljust(widths[k]) for k in header).rstrip())
    for line in plan.method.describe(recipe, plan.runs):
        print(line)


def log(message: str) -> None:
    """Prints on the main process only (one line per event in a distributed launch)."""
    if PartialState().is_main_process:
        print(message, flush=True)


def warn(message: str) -> None:
    """A warning that must not scroll by unseen: on stderr, main process only."""
    if PartialState().is_main_process:
        print(f"modpo_trl.train: WARNING: {message}", file=sys.stderr, flush=True)


def main_decides(fn: Callable[[], Any]) -> Any:
    """Runs `fn` on the main process only and gives its result to every process, so all ranks of a
    distributed launch take the same branch."""
    state = PartialState()
    result = [fn() if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(result, from_process=0)
    return result[0]


def on_disk(dataset: Dataset, folder: Path) -> Dataset:
    """`dataset` saved to (or found in) `folder` and memory-mapped from there, for distributed runs.

    TRL hands precomputed reference log-probs from the main process to the others through a cache file next to
    the data set's own files; an in-memory data set has none, so each process would look in its own temporary
    folder and all but the main one fail.
    """
    state = PartialState()
    if state.num_processes == 1:
        return dataset
    if state.is_main_process and not (folder / "dataset_info.json").exists():
        tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
        dataset.save_to_disk(str(tmp))
        try:
            os.replace(tmp, folder)
        except OSError:  # another sweep on this run directory saved the same data meanwhile
            shutil.rmtree(tmp)
    state.wait_for_everyone()
    return load_from_disk(str(folder))


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")  # local time, with its UTC offset


def _register(plan: Plan) -> Callable[[dict[str, Any]], None]:
    """Writes the manifest header and a `pending` entry for every run it does not know yet."""
    recipe = plan.recipe

    def change(data: dict[str, Any]) -> None:
        if data.get("method", recipe.method) != recipe.method:
            raise RecipeError(
                f"{plan.run_dir} holds a method={data['method']!r} run; give the {recipe.method} recipe its own "
                "run_name"
            )
        data.update(
            run_name=recipe.run_name,
            method=recipe.method,
            base_model=recipe.model.path,
            objectives=recipe.objective_names,
            target=recipe.objective_names[recipe.target_index] if plan.method.has_target else None,
            recipe=as_dict(recipe),
        )
        entries = data.setdefault("runs", {})
        for run in plan.runs:
            entries.setdefault(
                run.tag,
                {
                    "tag": run.tag,
                    "method": recipe.method,
                    "weights": run.weights,
                    "trainer_weights": run.trainer_weights,
                    "status": "pending",
                    "adapter": run.tag,
                    "metrics": {},
                    "fingerprints": {},
                    "started": None,
                    "finished": None,
                    "error": None,
                    "resumed_from": None,
                },
            )

    return change


def execute(plan: Plan) -> dict[str, Any]:
    """Trains every selected run of `plan` that is not done yet; returns the manifest.

    A run is done when its manifest status is `done` and its adapter folder exists; anything else is
    (re)trained, resuming from the last complete checkpoint of an interrupted run of the same recipe. A done run
    whose trained sections changed since is kept with a warning naming the changes, or trained again when
    `plan.retrain_changed`.
    """
    recipe, run_dir = plan.recipe, plan.run_dir
    check_policy(recipe)  # fails before anything is written or loaded
    check_output_dir(recipe)
    state = PartialState()
    manifest = Manifest(run_dir)
    recipe_fp = recipe_fingerprint(recipe)
    selected = [plan.runs[i] for i in plan.selected]

    def pending() -> list[str]:
        entries = manifest.runs()
        todo = []
        for run in selected:
            entry = entries.get(run.tag)
            changes = recipe_changes(entry, recipe)
            if not is_done(entry, run_dir) or (changes is not None and plan.retrain_changed):
                todo.append(run.tag)
            elif changes is not None:
                warn(
                    f"{run.tag} was trained under a different recipe ({describe_changes(changes)}); it is kept and "
                    "NOT trained again. Run with --retrain-changed to train it under this recipe (its adapter is "
                    "replaced once the new one is complete), or give this recipe another run_name."
                )
        return todo

    todo = main_decides(pending)
    if not todo:
        log(f"{run_dir}: all {len(selected)} selected run(s) done; nothing to train")
        return manifest.read()

    # Data and rewards are loaded and checked before the run folder is written: bad input leaves nothing behind.
    prepared = plan.method.prepare(recipe)
    if state.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "recipe.yaml", resolved_yaml(recipe))
        manifest.update(_register(plan))
    state.wait_for_everyone()
    fingerprints = {"recipe": recipe_fp, **prepared.fingerprints}
    sections = trained_sections(recipe)
    for run in selected:
        prefix = f"[{run.index + 1}/{len(plan.runs)}] {run.tag}"
        if run.tag not in todo:
            log(f"{prefix}: done, skipped")
            continue
        lock = FileLock(run_dir / f".{run.tag}.lock")

        def claim(tag: str = run.tag, lock: FileLock = lock) -> str:
            try:
                lock.acquire(timeout=0)
            except Timeout:
                return "busy"
            entry = manifest.runs()[tag]
            if is_done(entry, run_dir) and recipe_changes(entry, recipe) is None:  # finished meanwhile
                lock.release()
                return "done"
            return "train"

        decision = main_decides(claim)
        if decision != "train":
            log(f"{prefix}: {'done' if decision == 'done' else 'being trained by another process'}, skipped")
            continue
        try:
            _train_run(plan, run, prepared, fingerprints, sections, prefix)
        finally:
            if state.is_main_process:
                lock.release()
    return manifest.read()


def _train_run(
    plan: Plan,
    run: Run,
    prepared: Prepared,
    fingerprints: dict[str, Any],
    sections: dict[str, Any],
    prefix: str,
) -> None:
    state = PartialState()
    run_dir = plan.run_dir
    manifest = Manifest(run_dir)
    partial_dir, final_dir = run_dir / f".{run.tag}.partial", run_dir / run.tag

    def resume_point() -> str | None:
        entry = manifest.runs()[run.tag]
        if (
            entry["fingerprints"].get("recipe") not in (None, fingerprints["recipe"])
            and run.work_dir.exists()
        ):
            print(f"{prefix}: work in {run.work_dir} is from a different recipe; starting over", flush=True)
            shutil.rmtree(run.work_dir)
        resume = plan.method.resume_point(run)
        manifest.update_run(
            run.tag,
            status="running",
            started=_now(),
            finished=None,
            error=None,
            metrics={},
            fingerprints=fingerprints,
            trained_recipe=sections,
            resumed_from=Path(resume).name if resume else None,
        )
        return resume

    resume = main_decides(resume_point)
    log(f"{prefix}: training{f' (resuming from {Path(resume).name})' if resume else ''} ...")
    started = time.monotonic()
    trained = None
    try:
        trained = plan.method.train(plan.recipe, run, prepared, resume)
        metrics = trained.metrics
        if state.is_main_process and partial_dir.exists():  # left by a run killed while saving
            shutil.rmtree(partial_dir)
        state.wait_for_everyone()
        trained.save(partial_dir)  # every process: DeepSpeed ZeRO-3 / FSDP gather the weights
        state.wait_for_everyone()
        if state.is_main_process:
            finish_adapter(partial_dir, plan.recipe, plan.method, run, trained)
            if final_dir.exists():  # a stale folder without a `done` status (e.g. copied, or a crash)
                shutil.rmtree(final_dir)
            os.replace(partial_dir, final_dir)
            shutil.rmtree(run.work_dir, ignore_errors=True)
            manifest.update_run(run.tag, status="done", finished=_now(), metrics=trained.metrics)
        state.wait_for_everyone()
    except Exception as e:
        if state.is_main_process:
            manifest.update_run(run.tag, status="failed", finished=_now(), error=f"{type(e).__name__}: {e}")
            if run.work_dir.is_dir() and not any(p.is_file() for p in run.work_dir.rglob("*")):
                shutil.rmtree(run.work_dir)  # nothing to resume from: no empty `.<tag>.tmp/` is left behind
        raise
    finally:
        trained = None  # frees the trainer before the next run loads its own policy
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    loss = (
        f" (train_loss {metrics['train_loss']:.4f})" if isinstance(metrics.get("train_loss"), float) else ""
    )
    log(f"{prefix}: done in {time.monotonic() - started:.0f}s{loss} -> {final_dir}")
