"""The run engine: every method's runs trained the same way, resumable, safe for job arrays.

A recipe is resolved once into a `Plan` (its method, its runs with their trainer configs, the runs selected by
`sweep.index`); `execute(plan)` trains what is not done yet. Layout of `<output_dir>/<run_name>/` (the run
directory):

    manifest.json      every run: status, metrics, fingerprints, times (read by the evaluation and serving)
    .manifest.json.bak a copy of the last manifest written, which replaces a damaged manifest.json
    recipe.yaml        the resolved recipe, for provenance
    <tag>/             a finished adapter + tokenizer (`w-0.30-0.70/`, `moc/`, `dpa/`): exists under this name
                       only when complete
    .<tag>.tmp/        the work folder of a run being trained (checkpoints: the resume point), deleted once the
                       manifest says `done`
    .<tag>.partial/    the adapter being saved, renamed to `<tag>/` once written and checked
    .<tag>.lock        held by the process training that run, so concurrent sweeps skip it
    .data/             distributed runs only: the pairs on disk, shared by the processes (see `on_disk`)

A run's manifest status goes `pending` -> `running` -> `finishing` (its adapter is complete and checked, about to
take its final name) -> `done`; or `failed` / `interrupted` (SIGTERM, Ctrl-C). A process killed at any point loses
no training: a `finishing` run whose adapter folder exists is recorded `done` by the next run, any other resumes
from its last checkpoint.

Scores that depend only on the data (margin rewards, reference log-probs) are cached by content, so every run
after the first, in this process or another, trains without scoring them again.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from datasets import Dataset, load_from_disk
from filelock import FileLock, Timeout
from safetensors.torch import load_file

from ..rewards.cache import content_fingerprint, fingerprint
from ..storage import atomic_path, fault_point, remove_stale_temporaries, write_atomic
from .method import Method, Prepared, Run, trainer_config
from .models import check_policy
from .publish import check_outputs, finish_adapter
from .recipe import TRAINED_SECTIONS, Recipe, RecipeError, as_dict, leaves, resolved_yaml
from .signals import Interrupted, critical, interruptible

MANIFEST = "manifest.json"


class NonFiniteError(RecipeError):
    """Training diverged: a loss, gradient norm or adapter weight is NaN or infinite."""


class Manifest:
    """`<run_dir>/manifest.json`, changed by read-modify-write under a file lock and replaced atomically, so
    concurrent sweeps on one run directory (a job array) keep each other's entries and readers never see a
    half-written file. Each write is copied to `.manifest.json.bak`, which replaces a manifest found damaged."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / MANIFEST
        self.backup = Path(run_dir) / f".{MANIFEST}.bak"
        self.lock = FileLock(f"{self.path}.lock")

    def read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        try:
            return _parse(self.path)
        except ValueError as e:
            return self._restore(e)

    def _restore(self, error: ValueError) -> dict[str, Any]:
        with self.lock:
            try:
                return _parse(self.path)  # restored meanwhile by another process
            except ValueError:
                pass
            try:
                data = _parse(self.backup)
            except (OSError, ValueError):
                raise RecipeError(
                    f"{self.path} is damaged ({error}) and has no good copy in {self.backup.name}; move it away to "
                    "start a new manifest (finished adapters are then trained again)"
                ) from None
            write_atomic(self.path, self.backup.read_text())
        statuses = [entry.get("status") for entry in data.get("runs", {}).values()]
        counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses)) or "no runs"
        warn(f"{self.path} was damaged ({error}); restored its last copy ({counts})")
        return data

    def runs(self) -> dict[str, dict[str, Any]]:
        return self.read().get("runs", {})

    def update(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        with critical(), self.lock:
            data = self.read()
            change(data)
            text = json.dumps(data, indent=2) + "\n"
            with atomic_path(self.path) as tmp:
                tmp.write_text(text)
                fault_point("write:manifest")
            write_atomic(self.backup, text)
        return data

    def update_run(self, tag: str, **values: Any) -> dict[str, Any]:
        return self.update(lambda data: data["runs"][tag].update(values))


def _parse(path: Path) -> dict[str, Any]:
    """A manifest file's content; ValueError when it is not a JSON object (e.g. truncated)."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"not a JSON object but a {type(data).__name__}")
    return data


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


def trained_sections(recipe: Recipe, redact: bool = True) -> dict[str, Any]:
    """What the adapters depend on in the recipe (recorded with each run, compared on the next); values read from
    the environment as their `${oc.env:...}` text unless not `redact`."""
    resolved = as_dict(recipe, redact=redact)
    return {k: resolved[k] for k in TRAINED_SECTIONS}


def recipe_fingerprint(recipe: Recipe) -> str:
    return fingerprint(trained_sections(recipe, redact=False))


def recipe_changes(entry: dict[str, Any] | None, recipe: Recipe) -> list[str] | None:
    """How `recipe`'s trained sections differ from those a finished run was trained under: `["training.beta: 0.1 ->
    0.5", ...]`; None when they do not (or the run is not finished, or the only difference is a field added to the
    schema since, at a neutral value: None, false, empty); `[]` when only the fingerprint says so (a run recorded
    before its sections were)."""
    if not entry or entry["status"] != "done":
        return None
    recorded = entry["fingerprints"].get("recipe")
    if recorded in (None, recipe_fingerprint(recipe)):
        return None
    before, now = leaves(entry.get("trained_recipe") or {}), leaves(trained_sections(recipe))
    if not before:
        return []

    def shown(values: dict[str, Any], key: str) -> str:
        return repr(values[key]) if key in values else "(unset)"

    changes = [
        f"{key}: {shown(before, key)} -> {shown(now, key)}"
        for key in sorted(set(before) | set(now))
        if key not in before or key not in now or before[key] != now[key]
    ]
    # A field that a later modpo_trl added (absent from the record) at a neutral value trains as before it existed.
    added_unset = [k for k in set(now) - set(before) if now[k] in (None, False, [], {}, "")]
    return [c for c in changes if c.partition(":")[0] not in added_unset] or None


def describe_changes(changes: list[str]) -> str:
    return (
        "; ".join(changes)
        if changes
        else "which keys is not recorded for this run, or a value read from the environment changed"
    )


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


def pairs_on_disk(
    train: Dataset, evals: Dataset | None, run_dir: Path, columns: Sequence[str], prefix: str = ""
) -> tuple[Dataset, Dataset | None, str]:
    """The train and eval pairs `on_disk` under `<run_dir>/.data/<prefix>train-<fingerprint>` (and eval), with the
    train pairs' content fingerprint over `columns`."""
    data_fp = content_fingerprint(train, columns)
    train = on_disk(train, run_dir / ".data" / f"{prefix}train-{data_fp}")
    if evals is not None:
        evals = on_disk(evals, run_dir / ".data" / f"{prefix}eval-{content_fingerprint(evals, columns)}")
    return train, evals, data_fp


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

    A run is done when its manifest status is `done` and its adapter folder exists; a `finishing` one whose adapter
    folder exists is recorded done without training; anything else is (re)trained, resuming from the last complete
    checkpoint of an interrupted run of the same recipe. A done run whose trained sections changed since is kept
    with a warning naming the changes, or trained again when `plan.retrain_changed`. SIGTERM and SIGINT raise
    `Interrupted` at a safe point (`runs.signals`), after marking the run being trained `interrupted`.
    """
    with interruptible():
        return _execute(plan)


def _execute(plan: Plan) -> dict[str, Any]:
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
    if state.is_main_process and run_dir.is_dir():
        remove_litter(run_dir, plan.runs, manifest)
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
            if recover(run_dir, entry, recipe_fp, manifest):
                lock.release()
                return "recovered"
            return "train"

        decision = main_decides(claim)
        if decision != "train":
            log(
                f"{prefix}: "
                + {
                    "done": "done, skipped",
                    "busy": "being trained by another process, skipped",
                    "recovered": "its complete adapter (saved by a process stopped while finishing) is now "
                    "recorded done",
                }[decision]
            )
            continue
        try:
            _train_run(plan, run, prepared, fingerprints, sections, prefix)
        finally:
            if state.is_main_process:
                lock.release()
    return manifest.read()


def recover(run_dir: Path, entry: dict[str, Any], recipe_fp: str, manifest: Manifest) -> bool:
    """Records `done` a run of this recipe stopped while finishing (main process, holding its lock): its adapter
    was complete and checked when `finishing` was recorded, and only its renaming or recording may be missing."""
    tag = entry["tag"]
    final_dir, partial_dir = run_dir / entry["adapter"], run_dir / f".{tag}.partial"
    if entry["status"] != "finishing" or entry["fingerprints"].get("recipe") != recipe_fp:
        return False
    if not final_dir.is_dir() and partial_dir.is_dir():
        os.replace(partial_dir, final_dir)
    if not final_dir.is_dir():
        return False
    check_finite_adapter(final_dir)
    with critical():
        manifest.update_run(tag, status="done", finished=entry.get("finished") or _now())
        shutil.rmtree(work_dir(run_dir, tag), ignore_errors=True)
    return True


def remove_litter(run_dir: Path, runs: list[Run], manifest: Manifest) -> None:
    """What killed processes left in `run_dir` (main process): temporary files of dead processes, and the work
    folders of runs not being trained (their lock is free) that hold no file or belong to a done run."""
    remove_stale_temporaries(run_dir)
    entries = manifest.runs()
    for run in runs:
        folder = run.work_dir
        if not folder.is_dir():
            continue
        lock = FileLock(run_dir / f".{run.tag}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue
        try:
            if is_done(entries.get(run.tag), run_dir) or not any(p.is_file() for p in folder.rglob("*")):
                shutil.rmtree(folder, ignore_errors=True)
        finally:
            lock.release()


def check_finite_metrics(tag: str, metrics: dict[str, Any]) -> None:
    """A training whose loss or gradient norm ended non-finite: a `NonFiniteError` naming them."""
    bad = {
        k: v
        for k, v in metrics.items()
        if k in ("loss", "train_loss", "grad_norm") and isinstance(v, float) and not math.isfinite(v)
    }
    if bad:
        raise NonFiniteError(
            f"{tag}: training diverged ({', '.join(f'{k}={v}' for k, v in bad.items())}); it is not marked done. "
            "Check the data and reward scores, lower training.learning_rate or change training.beta"
        )


def check_finite_adapter(folder: Path) -> None:
    """Every tensor of the adapter's safetensors files is finite, else a `NonFiniteError` naming one."""
    for file in sorted(folder.glob("*.safetensors")):
        for name, tensor in load_file(file).items():
            if not torch.isfinite(tensor).all():
                raise NonFiniteError(
                    f"{file}: tensor {name!r} holds NaN or infinite values; the adapter is not marked done. Check "
                    "the data and reward scores, lower training.learning_rate or change training.beta"
                )


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

    started = time.monotonic()
    trained = None
    try:
        resume = main_decides(resume_point)
        log(f"{prefix}: training{f' (resuming from {Path(resume).name})' if resume else ''} ...")
        trained = plan.method.train(plan.recipe, run, prepared, resume)
        metrics = trained.metrics
        check_finite_metrics(run.tag, metrics)
        if state.is_main_process and partial_dir.exists():  # left by a run killed while saving
            shutil.rmtree(partial_dir)
        state.wait_for_everyone()
        trained.save(partial_dir)  # every process: DeepSpeed ZeRO-3 / FSDP gather the weights
        state.wait_for_everyone()
        if state.is_main_process:
            finish_adapter(partial_dir, plan.recipe, plan.method, run, trained)
            check_finite_adapter(partial_dir)
            fault_point("finish:saved")
            if final_dir.exists():  # a stale folder without a `done` status (e.g. copied, or a crash)
                shutil.rmtree(final_dir)
        state.wait_for_everyone()
    except Interrupted as e:
        if state.is_main_process:
            manifest.update_run(
                run.tag, status="interrupted", finished=_now(), error=f"interrupted by {e.name}"
            )
        raise
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
    if state.is_main_process:
        # Each step leaves a state the next run completes without training: `finishing` with the adapter under
        # either name is recorded done by `recover`; the checkpoints go only once the manifest says done.
        with critical():
            manifest.update_run(run.tag, status="finishing", finished=_now(), metrics=metrics)
            fault_point("finish:recorded")
            os.replace(partial_dir, final_dir)
            fault_point("finish:renamed")
            manifest.update_run(run.tag, status="done")
            fault_point("finish:done")
            shutil.rmtree(run.work_dir, ignore_errors=True)
    state.wait_for_everyone()
    loss = (
        f" (train_loss {metrics['train_loss']:.4f})" if isinstance(metrics.get("train_loss"), float) else ""
    )
    log(f"{prefix}: done in {time.monotonic() - started:.0f}s{loss} -> {final_dir}")
