"""The per-method interface of the run engine, and what a method hands to the evaluation.

A method (MODPO, MOC, DPA, ...) says which runs a recipe asks for and how one of them is trained; the engine
(`modpo_trl.runs.engine`) does everything around it: the manifest, locks, resume, atomic adapters. The
evaluation and serving layers ask the same method for its `Candidate`s: the trained models at the preferences
they answer for.
"""

from __future__ import annotations

import dataclasses
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

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
    """A model to evaluate or serve: the base model (`adapter` None), a LoRA adapter, a soup of adapters, or a
    MOD mixture of adapters (decoded together, `modpo_trl.serving.mod`).

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
    mixture: list[tuple[str, float]] | None = (
        None  # MOD: (adapter folder, weight of its next-token log-probs)
    )
    extreme: str | None = None  # the objective this MODPO adapter is the soups' extreme of
    held_out: bool = False  # a preference the conditioned model never trained on (generalisation)
    # The preference's own coordinates when its weights are not them (DPA: {"angle": t} in degrees, since
    # v = (cos t, sin t) folds +t and -t together in cos t): evaluation interpolates over them (generalisation);
    # controllability is measured against `weights`.
    parameter: dict[str, float] | None = None
    adapter_preference: list[float] | None = None  # the w of a preference-gated adapter (svd_lora)

    @property
    def key(self) -> str:
        return f"{self.method}-{self.label}"

    def adapters(self) -> list[str]:
        parts = self.soup or self.mixture
        return [p for p, _ in parts] if parts else [self.adapter] if self.adapter else []

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
            "mixture": [{"adapter": short(p), "weight": w} for p, w in self.mixture]
            if self.mixture
            else None,
            "extreme": self.extreme,
            "held_out": self.held_out,
            "parameter": self.parameter,
            "adapter_preference": self.adapter_preference,
        }


class Method(ABC):
    """A training method as the engine runs it. Subclasses live in `modpo_trl.runs.<name>`."""

    name: ClassVar[str]
    # The trainer class whose name, paper and tags go into each adapter's model card (`_name`, `_paper`,
    # `_tag_names`, TRL's convention).
    trainer_class: ClassVar[type | None] = None
    # The manifest's `target`: the objective whose pairs are trained on (None: every objective is alike).
    has_target: ClassVar[bool] = True
    # What a preference is: "simplex" (weights >= 0 that sum to 1) or "direction" (a unit vector in reward space).
    preference_space: ClassVar[str] = "simplex"

    def check(self, recipe: Recipe) -> None:
        """Recipe problems only this method has, found without loading anything."""

    @abstractmethod
    def runs(self, recipe: Recipe, dry_run: bool = False) -> list[Run]:
        """Every run the recipe asks for, each with its trainer config (built without the hardware checks when
        `dry_run`, so that a GPU recipe can be checked on any machine)."""

    def describe(self, recipe: Recipe, runs: list[Run]) -> list[str]:
        """Lines the dry run prints after the table of runs."""
        return []

    def card_notes(self, recipe: Recipe, run: Run) -> list[str]:
        """Lines of the adapter's model card on how to use it (e.g. how to condition prompts)."""
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

    def candidate_at(
        self, recipe: Recipe, run_dir: Path, entries: dict[str, dict[str, Any]], weights: list[float]
    ) -> Candidate | None:
        """The finished model asked for the preference `weights` (a checked point of `preference_space`), for a
        method whose one model is conditioned on every preference; None for a method that trains one adapter per
        weighting, or while the model is not trained."""
        return None


def usage_notes(intro: str, import_line: str, call: str) -> list[str]:
    """Model card lines: `intro`, then a Python snippet (`import_line`, a blank line, `call`)."""
    return [intro, "", "```python", import_line, "", call, "```"]


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
    """`config_class(**recipe.training, **fields)`, checked as the trainer checks it when it starts; a bad value is
    a recipe error naming its `training` key. With `dry_run` the precision and device flags are switched off
    first: a bf16 recipe checks on a CPU machine.

    The trainer never pushes (`push_to_hub=False`): the engine pushes each finished adapter (`runs.publish`).
    """
    training = dict(recipe.training)
    if dry_run:
        training.update(bf16=False, fp16=False, use_cpu=True)
    training["push_to_hub"] = False
    # Defaults a user could not act on otherwise: pinned memory only helps copies to a GPU (torch warns on every
    # DataLoader without one), and TRL's default `gradient_checkpointing=True` is transformers' deprecated name.
    training.setdefault("dataloader_pin_memory", torch.cuda.is_available() and not training.get("use_cpu"))
    if "gradient_checkpointing" not in training:
        defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
        training.setdefault("activation_checkpointing", defaults.get("gradient_checkpointing"))
    try:
        args = config_class(**training, **fields)
    except (TypeError, ValueError) as e:
        raise RecipeError(_naming_key(str(e), config_class, training, recipe.training, fields)) from e
    return args


def _naming_key(
    message: str, config_class: type, training: dict[str, Any], given: dict[str, Any], fields: dict[str, Any]
) -> str:
    """The config's error with the `training` key it is about: the first key of the recipe without which the
    config builds (`training.lr_scheduler_type='bogus': ...`), else `training: ...` (the runner's fields)."""
    for key in given:
        try:
            config_class(**{k: v for k, v in training.items() if k != key}, **fields)
        except (TypeError, ValueError):
            continue
        if message.startswith(f"{key}="):  # the message already shows the value
            return f"training.{message}"
        return f"training.{key}={training[key]!r}: {message}"
    return f"training: {message}"
