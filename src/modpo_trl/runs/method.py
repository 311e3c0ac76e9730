"""The per-method interface of the run engine, and what a method hands to the evaluation.

A method (MODPO, MOC, DPA, ...) says which runs a recipe asks for and how one of them is trained; the engine
(`modpo_trl.runs.engine`) does everything around it: the manifest, locks, resume, atomic adapters. The
evaluation and serving layers ask the same method for its `Candidate`s: the trained models at the preferences
they answer for.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .recipe import Recipe, RecipeError


@dataclass
class Run:
    """One unit of training with one adapter as its result: a MODPO weighting, or a conditioned method's model.

    `weights` is the weighting in recipe order (`None` for a model conditioned on every preference); `args` the
    trainer config it trains with, its `output_dir` the run's work folder (checkpoints, the resume point).
    """

    tag: str
    index: int
    args: Any
    weights: list[float] | None = None
    trainer_weights: list[float] | None = None

    @property
    def work_dir(self) -> Path:
        return Path(self.args.output_dir)


@dataclass
class Prepared:
    """What every run of a plan shares, loaded once (data sets, reward sources), and the fingerprints of those
    inputs, recorded in the manifest."""

    fingerprints: dict[str, Any]
    inputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trained:
    """A finished training: `save(folder)` writes the adapter (every process calls it: sharded weights are
    gathered), `metrics` go into the manifest."""

    save: Callable[[Path], None]
    metrics: dict[str, Any]


@dataclass
class Candidate:
    """A model to evaluate or serve: the base model (`adapter` None), a LoRA adapter, or a soup of adapters.

    Conditioned methods (one model for every preference) set `preference` and a `prompt_fn` that puts it into
    the prompt (`render_preference`, `render_direction`; scorers still see the original prompt), and/or
    `adapter_preference`, the `w` a preference-gated adapter runs at (`modpo_trl.conditioning.svd_lora`), which the
    generator sets before generating.
    """

    method: str
    label: str
    weights: list[float] | None = None  # the requested weighting, in the order of `objectives`
    adapter: str | None = None
    preference: list[float] | None = None
    prompt_fn: Callable[[Any], Any] | None = field(default=None, repr=False)
    soup: list[tuple[str, float]] | None = None  # Rewarded Soups: (adapter folder, coefficient)
    extreme: str | None = None  # the objective this MODPO adapter is the soups' extreme of
    held_out: bool = False  # a preference the conditioned model never trained on (generalisation)
    adapter_preference: list[float] | None = None  # the w of a preference-gated adapter (svd_lora)

    @property
    def key(self) -> str:
        return f"{self.method}-{self.label}"

    def adapters(self) -> list[str]:
        return [p for p, _ in self.soup] if self.soup else [self.adapter] if self.adapter else []

    def describe(self, run_dir: Path) -> dict[str, Any]:
        def short(path: str) -> str:  # relative to the run directory when inside it
            p = Path(path)
            return str(p.relative_to(run_dir)) if p.is_relative_to(run_dir) else str(p)

        return {
            "method": self.method,
            "label": self.label,
            "weights": self.weights,
            "preference": self.preference,
            "adapter": short(self.adapter) if self.adapter else None,
            "soup": [{"adapter": short(p), "coefficient": c} for p, c in self.soup] if self.soup else None,
            "extreme": self.extreme,
            "held_out": self.held_out,
            "adapter_preference": self.adapter_preference,
        }


class Method(ABC):
    """A training method as the engine runs it. Subclasses live in `modpo_trl.runs.<name>`."""

    name: ClassVar[str]
    # The manifest's `target`: the objective whose pairs are trained on (None: every objective is alike).
    has_target: ClassVar[bool] = True

    def check(self, recipe: Recipe) -> None:
        """Recipe problems only this method has, found without loading anything."""

    @abstractmethod
    def runs(self, recipe: Recipe, dry_run: bool = False) -> list[Run]:
        """Every run the recipe asks for, each with its trainer config (built without the hardware checks when
        `dry_run`, so that a GPU recipe can be checked on any machine)."""

    def describe(self, recipe: Recipe, runs: list[Run]) -> list[str]:
        """Lines the dry run prints after the table of runs."""
        return []

    @abstractmethod
    def prepare(self, recipe: Recipe) -> Prepared:
        """Loads what every run shares (data, reward sources; trains reward models a recipe asks for)."""

    @abstractmethod
    def train(self, recipe: Recipe, run: Run, prepared: Prepared, resume: str | None) -> Trained:
        """Trains `run` (from the checkpoint `resume` when given) and returns how to save its adapter."""

    def resume_point(self, run: Run) -> str | None:
        """The checkpoint an interrupted `run` continues from: its work folder's last complete one."""
        checkpoints = complete_checkpoints(run.work_dir)
        return str(checkpoints[-1]) if checkpoints else None

    @abstractmethod
    def candidates(
        self, recipe: Recipe, run_dir: Path, entries: dict[str, dict[str, Any]]
    ) -> list[Candidate]:
        """The models to evaluate, from the finished runs' manifest `entries` (tag -> entry)."""


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


def trainer_config(config_class: type, recipe: Recipe, dry_run: bool, **fields: Any) -> Any:
    """`config_class(**recipe.training, **fields)`; a bad value is a recipe error naming `training`. With
    `dry_run` the precision and device flags are switched off first: a bf16 recipe checks on a CPU machine."""
    training = dict(recipe.training)
    if dry_run:
        training.update(bf16=False, fp16=False, use_cpu=True)
    try:
        return config_class(**training, **fields)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"training: {e}") from e
