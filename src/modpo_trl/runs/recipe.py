"""Recipes: omegaconf structured configs (typed dataclasses) loaded from YAML plus dotted CLI overrides.

Everything a run needs is validated at load, before any model is touched: unknown keys, wrong types,
missing local files, weight vectors of the wrong length, unknown `training` fields.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..conditioning.preference import check_preference, simplex_grid
from ..offline import offline_path
from ..trainers.dpa_config import DPAConfig
from ..trainers.moc_config import MOCConfig
from ..trainers.modpo_config import MODPOConfig, check_weights

METHODS = ("modpo", "moc", "dpa")
DATA_FORMATS = ("pairs", "labelled_pairs", "ratings", "implicit_prompt")
REWARD_TYPES = ("reward_model", "implicit", "function", "columns")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class RecipeError(ValueError):
    """A recipe problem, reported with the offending key and what would be valid."""


def is_user_error(error: Exception) -> bool:
    """A bad recipe, or a model / data set / file that cannot be loaded: a message is enough. An OSError with an
    errno comes from the system inside some library (a lost cache file, a full disk): its traceback is kept."""
    return isinstance(error, RecipeError) or (isinstance(error, OSError) and error.errno is None)


@dataclass
class ModelConfig:
    """The policy's base model."""

    path: str = MISSING  # hub id or local folder
    tokenizer: str | None = None  # defaults to `path`
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    attn_implementation: str | None = None  # e.g. sdpa, flash_attention_2
    load_in_4bit: bool = False  # QLoRA: NF4 weights through bitsandbytes (CUDA only)
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_compute_dtype: str = "bfloat16"
    bnb_4bit_use_double_quant: bool = True
    trust_remote_code: bool = False


@dataclass
class LoraSettings:
    """The LoRA adapter trained for every weighting (peft.LoraConfig)."""

    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class DataConfig:
    """A preference data set and how its columns become `prompt`/`chosen`/`rejected`.

    `format`:
      - `pairs`: `prompt_column`, `chosen_column`, `rejected_column` hold the pair (TRL's format).
      - `labelled_pairs`: two responses in `response_columns` and the index (0/1) of the preferred one in
        `label_column` (PKU-SafeRLHF's `better_response_id` / `safer_response_id`).
      - `ratings`: one response per row (`response_column`) with a numeric `rating_column`; responses to the
        same prompt with different ratings become pairs (HelpSteer-style).
      - `implicit_prompt`: `chosen_column` / `rejected_column` hold whole conversations with the prompt inside
        (HH-RLHF); the prompt is their shared beginning (`trl.extract_prompt`), cut back to the end of the last
        `prompt_delimiter` in it when one is given (HH-RLHF: "\\n\\nAssistant:"), so that responses starting with
        the same words keep them.
    """

    path: str = MISSING  # hub id, local json/jsonl/csv/parquet file, or a save_to_disk folder
    name: str | None = None  # hub data set configuration
    data_dir: str | None = None  # hub data set sub-folder (e.g. HH-RLHF's helpful-base)
    split: str = "train"
    format: str = "pairs"
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    response_columns: list[str] = field(default_factory=lambda: ["response_0", "response_1"])
    label_column: str | None = None
    response_column: str = "response"
    rating_column: str | None = None
    prompt_delimiter: str | None = None  # implicit_prompt: the prompt ends after its last occurrence
    max_pairs_per_prompt: int = 1  # ratings: best-vs-worst first, then next-best pairs
    max_samples: int | None = None
    eval_split: str | None = None  # a split of the same data set for eval; else eval_fraction of `split`
    eval_fraction: float = 0.0
    prompt_template: str | None = None  # e.g. "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
    conversational: bool = False  # wrap prompt/responses as chat messages (the tokenizer's chat template)
    seed: int = 0


@dataclass
class RewardConfig:
    """A frozen reward source (see modpo_trl.rewards.sources).

    `type`: `reward_model` (sequence classifier at `path`), `implicit` (DPO model or LoRA adapter at `path`,
    reference `ref_path` or the adapter's base), `function` (`module:function` of `fn(prompts, responses)`),
    `columns` (precomputed `chosen_column` / `rejected_column`).
    """

    type: str = MISSING
    path: str | None = None
    tokenizer: str | None = None
    ref_path: str | None = None
    beta: float = 0.1
    output: str | None = None  # reward_model with several outputs: the label to use
    function: str | None = None
    chosen_column: str | None = None
    rejected_column: str | None = None
    max_length: int = 1024
    batch_size: int = 8
    # reward_model only: train it first when `path` holds no finished model (see reward_modeling.py)
    train: dict[str, Any] | None = None


@dataclass
class ObjectiveConfig:
    """One objective: its preference pairs (the target needs them), its frozen reward (every other objective
    needs one, as MODPO's margin) and its evaluation scorer (defaults to `reward`)."""

    name: str = MISSING
    data: DataConfig | None = None
    reward: RewardConfig | None = None
    scorer: RewardConfig | None = None


@dataclass
class SweepConfig:
    """The weightings to train, in the order of `objectives`.

    `weights` is a list of weight vectors, or `simplex(steps=N)`: every vector with entries in {0, 1/N, ..., 1}
    summing to 1 whose target weight is > 0 (MODPO divides by it).
    """

    weights: Any = "simplex(steps=4)"
    index: int | None = None  # train only this weighting (job arrays, one `accelerate launch` per point)


@dataclass
class EvalConfig:
    """Held-out generation and scoring (modpo_trl.evaluate)."""

    prompts: DataConfig | None = None  # prompt_column is used; responses are generated
    num_prompts: int = 64
    max_new_tokens: int = 64
    do_sample: bool = True
    temperature: float = 0.7
    top_p: float = 0.9
    batch_size: int = 16
    seed: int = 0
    backend: str = "auto"  # auto (vLLM when installed), transformers, vllm
    reference_point: list[float] | None = (
        None  # hypervolume reference; default: see pareto.default_reference_point
    )
    baselines: list[str] = field(default_factory=lambda: ["reference", "rewarded_soups"])
    # Other runs' folders whose eval/results.json join this report and plot (e.g. a MOC run compared with the
    # MODPO sweep); only results made on the same prompts, objectives and sampling settings are compared.
    compare: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    method: str = "modpo"
    run_name: str = MISSING
    output_dir: str = "outputs"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    objectives: list[ObjectiveConfig] = MISSING
    target: str | None = None  # the objective whose pairs are trained on; default: the first
    sweep: SweepConfig = field(default_factory=SweepConfig)
    training: dict[str, Any] = field(default_factory=dict)  # MODPOConfig / DPOConfig fields
    eval: EvalConfig = field(default_factory=EvalConfig)

    # ------------------------------------------------------------------ derived views
    @property
    def objective_names(self) -> list[str]:
        return [o.name for o in self.objectives]

    @property
    def target_index(self) -> int:
        return self.objective_names.index(self.target) if self.target else 0

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def weightings(self) -> list[list[float]]:
        """The sweep's weightings; for a conditioned method (one model, evaluated at these preferences) every
        point of the simplex, vertices included; for MODPO the target's weight must be > 0 (it divides the loss)."""
        target = self.target_index if self.method == "modpo" else None
        return parse_weights(self.sweep.weights, len(self.objectives), target)

    def trainer_weights(self, weighting: list[float]) -> list[float]:
        """Recipe order -> MODPO order (target first, then the margin objectives in recipe order)."""
        t = self.target_index
        return [weighting[t]] + [w for i, w in enumerate(weighting) if i != t]


def weight_tag(weighting: list[float]) -> str:
    """`[0.3, 0.7]` -> `w-0.30-0.70`: the folder name of that weighting's adapter."""
    return "w-" + "-".join(f"{w:.2f}" for w in weighting)


def parse_weights(spec: Any, n: int, target_index: int | None = 0) -> list[list[float]]:
    """Resolves `sweep.weights` (list of vectors or `simplex(steps=N)`) and validates every vector: on the simplex,
    with the target's weight > 0 unless `target_index` is None."""
    if isinstance(spec, str):
        match = re.fullmatch(r"\s*simplex\(\s*steps\s*=\s*(\d+)\s*\)\s*", spec)
        if not match or int(match.group(1)) < 1:
            raise RecipeError(
                f"sweep.weights={spec!r} is not valid; valid: a list of weight vectors, or 'simplex(steps=N)' with N >= 1"
            )
        grid = simplex_grid(n, int(match.group(1)))
        return grid if target_index is None else [w for w in grid if w[target_index] > 0]
    if not isinstance(spec, list | tuple) or not spec:
        raise RecipeError(
            f"sweep.weights={spec!r} must be a non-empty list of weight vectors or 'simplex(steps=N)'"
        )
    out = []
    for i, vector in enumerate(spec):
        key = f"sweep.weights[{i}]"
        if not isinstance(vector, list | tuple) or len(vector) != n:
            raise RecipeError(
                f"{key}={vector!r} must have {n} entries, one per objective (in the order of `objectives`)"
            )
        try:
            if target_index is None:
                check_preference(vector, n, key)
            else:  # check_weights wants the target's weight first (it divides the loss), as MODPOConfig has it
                ordered = [vector[target_index], *(w for i, w in enumerate(vector) if i != target_index)]
                check_weights(ordered, key if target_index == 0 else f"{key} (target first)")
        except ValueError as e:
            raise RecipeError(str(e)) from None
        out.append([float(w) for w in vector])
    return out


def register_resolvers() -> None:
    """Registers `${offline:smollm2}` / `${offline:minilm}` with omegaconf (idempotent)."""
    if not OmegaConf.has_resolver("offline"):
        # register_resolver is omegaconf >= 2.4's name; register_new_resolver (2.3) is deprecated there
        register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
        register("offline", offline_path)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Loads a YAML recipe, applies dotted `key=value` overrides and validates the result."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    register_resolvers()
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Recipe), OmegaConf.load(path))
        for override in overrides or []:
            key, sep, value = override.partition("=")
            if not sep or not key:
                raise RecipeError(
                    f"override {override!r} is not of the form key=value (e.g. training.beta=0.2)"
                )
            # update() (unlike from_dotlist) reaches into lists: objectives.0.data.path=...
            OmegaConf.update(merged, key.strip(), yaml.safe_load(value), merge=True)
        recipe: Recipe = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise RecipeError(_explain(e, path)) from None
    validate(recipe, base_dir=path.parent)
    return recipe


def _explain(error: OmegaConfBaseException, path: Path) -> str:
    key = getattr(error, "full_key", None) or "?"
    message = str(error).splitlines()[0]
    if "Key '" in message and "not in" in message:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = _schema_node(parent)
        valid = sorted(f.name for f in fields(node)) if node else []
        leaf = key.rsplit(".", 1)[-1]
        hint = difflib.get_close_matches(leaf, valid, n=1)
        return (
            f"{path}: unknown key '{key}'"
            + (f" (did you mean '{hint[0]}'?)" if hint else "")
            + (f"; valid keys here: {valid}" if valid else "")
        )
    return f"{path}: invalid value for '{key}': {message}"


def _schema_node(dotted: str):
    node: Any = Recipe
    for part in filter(None, re.sub(r"\[\d+\]", "", dotted).split(".")):
        if part.isdigit():
            continue
        hints = {f.name: f for f in fields(node)}
        if part not in hints:
            return None
        node = {
            "model": ModelConfig,
            "lora": LoraSettings,
            "objectives": ObjectiveConfig,
            "data": DataConfig,
            "prompts": DataConfig,
            "reward": RewardConfig,
            "scorer": RewardConfig,
            "sweep": SweepConfig,
            "eval": EvalConfig,
        }.get(part)
        if node is None:
            return None
    return node


def validate(recipe: Recipe, base_dir: Path | None = None) -> None:
    """Checks everything that can be checked without loading a model. Raises RecipeError."""
    if recipe.method not in METHODS:
        raise RecipeError(f"method={recipe.method!r} is not valid; valid: {list(METHODS)}")
    if recipe.model.dtype not in DTYPES:
        raise RecipeError(f"model.dtype={recipe.model.dtype!r} is not valid; valid: {list(DTYPES)}")
    names = recipe.objective_names
    # One objective is plain DPO (weights [[1.0]]): how a margin model for a later MODPO run is trained.
    fewest = 1 if recipe.method == "modpo" else 2
    if len(names) < fewest:
        raise RecipeError(
            f"objectives has {len(names)} entries; method={recipe.method} needs at least {fewest}"
        )
    if len(set(names)) != len(names):
        raise RecipeError(f"objectives: names must be unique, got {names}")
    if recipe.target is not None and recipe.target not in names:
        raise RecipeError(f"target={recipe.target!r} is not an objective; valid: {names}")
    for i, objective in enumerate(recipe.objectives):
        key = f"objectives[{i}] ({objective.name})"
        if objective.data is not None:
            _check_data(objective.data, f"{key}.data")
        for kind in ("reward", "scorer"):
            reward = getattr(objective, kind)
            if reward is not None:
                _check_reward(reward, f"{key}.{kind}")
    if recipe.method == "modpo":
        target = recipe.objectives[recipe.target_index]
        if target.data is None:
            raise RecipeError(
                f"objectives[{recipe.target_index}] ({target.name}) is the target: it needs `data`"
            )
        for i, objective in enumerate(recipe.objectives):
            if i != recipe.target_index and objective.reward is None:
                raise RecipeError(
                    f"objectives[{i}] ({objective.name}) needs a `reward`: MODPO uses it as the margin "
                    f"(valid types: {list(REWARD_TYPES)})"
                )
    recipe.weightings()  # raises on bad weights
    if recipe.sweep.index is not None and not 0 <= recipe.sweep.index < len(recipe.weightings()):
        raise RecipeError(
            f"sweep.index={recipe.sweep.index} is out of range; valid: 0..{len(recipe.weightings()) - 1}"
        )
    _check_training(recipe.training, recipe.method)
    if recipe.eval.prompts is not None:
        _check_data(recipe.eval.prompts, "eval.prompts", needs_pairs=False)


def _check_data(data: DataConfig, key: str, needs_pairs: bool = True) -> None:
    if data.format not in DATA_FORMATS:
        raise RecipeError(f"{key}.format={data.format!r} is not valid; valid: {list(DATA_FORMATS)}")
    if needs_pairs and data.format == "labelled_pairs" and not data.label_column:
        raise RecipeError(f"{key}.label_column is required with format=labelled_pairs")
    if needs_pairs and data.format == "ratings" and not data.rating_column:
        raise RecipeError(f"{key}.rating_column is required with format=ratings")
    if not 0.0 <= data.eval_fraction < 1.0:
        raise RecipeError(f"{key}.eval_fraction={data.eval_fraction} must be in [0, 1)")
    _check_path(data.path, f"{key}.path")


def _check_reward(reward: RewardConfig, key: str) -> None:
    if reward.type not in REWARD_TYPES:
        raise RecipeError(f"{key}.type={reward.type!r} is not valid; valid: {list(REWARD_TYPES)}")
    needs = {
        "reward_model": ["path"],
        "implicit": ["path"],
        "function": ["function"],
        "columns": ["chosen_column", "rejected_column"],
    }[reward.type]
    for name in needs:
        if not getattr(reward, name):
            raise RecipeError(f"{key}.{name} is required for type={reward.type}")
    if reward.type == "function" and not re.fullmatch(r"[\w.]+:[\w.]+", reward.function):
        raise RecipeError(f"{key}.function={reward.function!r} must be 'package.module:function'")
    if reward.path and not reward.train:
        _check_path(reward.path, f"{key}.path")


def _check_path(value: str, key: str) -> None:
    """Local-looking paths must exist; anything else is taken as a hub id (checked when loaded)."""
    looks_local = value.startswith((".", "/", "~")) or Path(value).suffix in {
        ".json",
        ".jsonl",
        ".csv",
        ".parquet",
    }
    if looks_local and not Path(value).expanduser().exists():
        raise RecipeError(f"{key}={value!r} does not exist")


# Each method's trainer config: `training:` holds its fields.
METHOD_CONFIGS = {"modpo": MODPOConfig, "moc": MOCConfig, "dpa": DPAConfig}


def _check_training(training: dict[str, Any], method: str = "modpo") -> None:
    config_class = METHOD_CONFIGS[method]
    name = config_class.__name__
    valid = {f.name for f in fields(config_class)}
    managed = {"output_dir", "weights", "objective_names", "run_name"}  # set per run by the runner
    for key in training:
        if key in managed:
            raise RecipeError(
                f"training.{key} is set by the sweep; use `sweep.weights` / `output_dir` / `run_name`"
            )
        if key not in valid:
            hint = difflib.get_close_matches(key, valid, n=1)
            raise RecipeError(
                f"training.{key} is not a {name} field" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            )


def resolved_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def as_dict(recipe: Recipe) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(recipe), resolve=True)  # type: ignore[return-value]
