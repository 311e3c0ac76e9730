"""Recipes: omegaconf structured configs (typed dataclasses) loaded from YAML plus dotted CLI overrides.

Everything a run needs is validated at load, before any model is touched: unknown keys, wrong types,
missing local files, weight vectors of the wrong length, unknown `training` fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

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
BNB_4BIT_TYPES = ("nf4", "fp4")
# Sections that decide what an adapter is; `sweep`, `eval` and paths only say which/where.
TRAINED_SECTIONS = ("method", "model", "lora", "objectives", "target", "training")


class RecipeError(ValueError):
    """A recipe problem, reported with the offending key and what would be valid."""


def is_user_error(error: Exception) -> bool:
    """A bad recipe, or a model / data set / file that cannot be loaded: a message is enough. An OSError with an
    errno comes from the system inside some library (a lost cache file, a full disk): its traceback is kept."""
    return isinstance(error, RecipeError) or (isinstance(error, OSError) and error.errno is None)


@dataclass
class ModelConfig:
    """The policy's base model.

    TRL's `ModelConfig` names are accepted too (see `TRL_NAMES`): `model_name_or_path`, `model_revision`,
    `torch_dtype`, `use_bnb_nested_quant`, and its LoRA fields (`use_peft`, `lora_r`, ...), which set `lora:`.
    """

    path: str = MISSING  # hub id or local folder
    tokenizer: str | None = None  # defaults to `path`
    revision: str | None = None  # hub ids only: a branch, tag or commit (default: the main branch)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    attn_implementation: str | None = None  # e.g. sdpa, flash_attention_2
    load_in_4bit: bool = False  # QLoRA: NF4 weights through bitsandbytes (CUDA only)
    load_in_8bit: bool = False  # LLM.int8() weights through bitsandbytes (CUDA only)
    bnb_4bit_quant_type: str = "nf4"  # nf4 | fp4
    bnb_4bit_compute_dtype: str = "bfloat16"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_quant_storage: str | None = None  # e.g. bfloat16, for FSDP over 4-bit weights
    trust_remote_code: bool = False

    @property
    def quantized(self) -> bool:
        """Loaded in 4 or 8 bits: placed on its GPU when loaded, and cannot move."""
        return self.load_in_4bit or self.load_in_8bit


@dataclass
class LoraSettings:
    """The LoRA adapter trained for every weighting: a `peft.LoraConfig` built by TRL's `get_peft_config`."""

    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # module names, or one string: "all-linear" or a regular expression over module names (peft's rules)
    target_modules: Any = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    target_parameters: list[str] | None = None  # parameters to adapt directly (e.g. MoE experts)
    modules_to_save: list[str] | None = None  # trained in full and saved with the adapter (e.g. lm_head)
    task_type: str = "CAUSAL_LM"
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    use_dora: bool = False  # weight-decomposed LoRA


# TRL's `ModelConfig` field -> the recipe key it sets. Recipes may use either name (in `model:`, as TRL's flat
# ModelConfig has them, and the `lora_*` ones in `lora:` too); the resolved recipe shows the recipe's name.
TRL_NAMES = {
    "model_name_or_path": "model.path",
    "model_revision": "model.revision",
    "torch_dtype": "model.dtype",
    "use_bnb_nested_quant": "model.bnb_4bit_use_double_quant",
    "use_peft": "lora.enabled",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "lora_target_parameters": "lora.target_parameters",
    "lora_modules_to_save": "lora.modules_to_save",
    "lora_task_type": "lora.task_type",
    "use_rslora": "lora.use_rslora",
    "use_dora": "lora.use_dora",
}


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
    # function only: cache its scores under this version instead of reading its code and state (bump it whenever
    # the function's behaviour changes; needed for functions whose state cannot be read, e.g. API clients)
    version: str | None = None
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
    seed: int = 0  # sampling (do_sample: true) and bootstrap seed
    backend: str = "auto"  # auto (vLLM when installed), transformers, vllm
    reference_point: list[float] | None = (
        None  # hypervolume reference; default: see pareto.default_reference_point
    )
    # Intervals: every mean gets its Student-t interval; every difference between candidates, hypervolume and
    # rank correlation a paired bootstrap interval over prompts (`bootstrap_resamples` draws, seeded by `seed`).
    confidence: float = 0.95
    bootstrap_resamples: int = 2000
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
    # Dotted key -> the `${oc.env:...}` text of every value read from the environment (tokens, private paths):
    # set by `load_recipe`, and written in their place wherever the recipe is written (`as_dict`, `resolved_yaml`).
    from_environment: ClassVar[dict[str, str]] = {}

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


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 floats, as omegaconf reads recipe files: `1e-4` is a number, not the string PyYAML makes of it."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
        r"|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _read_yaml(path: Path) -> Any:
    try:
        content = yaml.load(path.read_text(encoding="utf-8"), Loader=_YamlLoader)
    except UnicodeDecodeError as e:
        raise RecipeError(
            f"recipe file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe file {str(path)!r} is not valid YAML: {e}") from None
    if content is None:
        content = {}
    if not isinstance(content, dict):
        raise RecipeError(
            f"recipe file {str(path)!r} must be a mapping of sections (run_name:, model:, objectives:, ...); "
            f"got a {type(content).__name__}"
        )
    return content


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Loads a YAML recipe, applies dotted `key=value` overrides and validates the result.

    Override values are read as OmegaConf reads a dotlist and the recipe file itself (`1e-4` and `5E-5` are
    numbers, `{path: x}` a mapping, `'1e-4'` a string); any dotted key can be set, also a field of an optional
    section that is empty (`eval.prompts.path=...`). TRL's `ModelConfig` names are accepted (`TRL_NAMES`).
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    register_resolvers()
    content = _read_yaml(path)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Recipe), _with_recipe_names(content, str(path)))
    except OmegaConfBaseException as e:
        raise RecipeError(_explain(e, path)) from None
    given: dict[str, tuple[str, Any]] = {}  # recipe key -> (override, value), to catch the same key set twice
    for override in overrides or []:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {override!r} is not of the form key=value (e.g. training.beta=0.2)")
        key, value = _recipe_key(key.strip()), _override_value(override, text)
        earlier = given.get(key)
        if earlier and earlier[0].partition("=")[0] != override.partition("=")[0] and earlier[1] != value:
            raise RecipeError(f"overrides {earlier[0]!r} and {override!r} both set {key}; keep one")
        given[key] = (override, value)
        try:
            _set(merged, key, value)
        except OmegaConfBaseException as e:
            raise RecipeError(_explain(e, f"override {override!r}", key)) from None
    try:
        recipe: Recipe = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise RecipeError(_explain(e, path)) from None
    unresolved = leaves(OmegaConf.to_container(merged, resolve=False))
    recipe.from_environment = {k: v for k, v in unresolved.items() if isinstance(v, str) and "oc.env" in v}
    validate(recipe, base_dir=path.parent)
    return recipe


def _override_value(override: str, text: str) -> Any:
    """`text` as OmegaConf parses a dotlist value, interpolations (`${offline:smollm2}`) kept for later."""
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]), resolve=False)["value"]
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        message = " ".join(str(e).split())
        raise RecipeError(
            f"override {override!r}: the value is not valid YAML ({message}); quote it"
        ) from None


def _set(merged: Any, key: str, value: Any) -> None:
    """`OmegaConf.update` (which, unlike from_dotlist, reaches into lists: `objectives.0.data.path=...`), after
    creating the empty optional sections on the way (`eval.prompts` when it is null)."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        section = _optional_section(prefix)
        if section is not None and OmegaConf.select(merged, prefix, default=0) is None:
            OmegaConf.update(merged, prefix, OmegaConf.structured(section), merge=False)
    OmegaConf.update(merged, key, value, merge=True)


def _optional_section(dotted: str) -> type | None:
    """The dataclass of an optional section (`eval.prompts`, `objectives.0.reward`), else None."""
    parent, _, name = dotted.rpartition(".")
    node = _schema_node(parent)
    if node is None or name.isdigit():
        return None
    hint = typing.get_type_hints(node).get(name)
    return next((t for t in typing.get_args(hint) if dataclasses.is_dataclass(t)), None)


def _recipe_key(key: str) -> str:
    """A dotted key with a TRL `ModelConfig` name (`model.lora_r`, `lora.lora_r`) -> the recipe's key (`lora.r`)."""
    section, _, name = key.partition(".")
    target = TRL_NAMES.get(name) if section in ("model", "lora") else None
    if target is None or (section == "lora" and not target.startswith("lora.")):
        return key
    return target


def _with_recipe_names(content: dict[str, Any], source: str) -> dict[str, Any]:
    """The recipe file's `model:` and `lora:` sections with TRL's names moved to the recipe's keys; the same
    setting given twice with different values is an error naming both."""
    content = dict(content)
    written: dict[str, tuple[str, Any]] = {}  # recipe key -> (key as written, value)
    sections: dict[str, dict[str, Any]] = {}
    for section in ("model", "lora"):
        block = content.get(section)
        if not isinstance(block, dict):  # absent, or not a mapping: the schema merge reports it
            continue
        for name, value in block.items():
            key = _recipe_key(f"{section}.{name}")
            if key in written and written[key][1] != value:
                raise RecipeError(
                    f"{source}: {written[key][0]}={written[key][1]!r} and {section}.{name}={value!r} both set "
                    f"{key}; keep one (TRL's ModelConfig names are aliases of the recipe's)"
                )
            written[key] = (f"{section}.{name}", value)
            target_section, _, target_name = key.partition(".")
            sections.setdefault(target_section, {})[target_name] = value
    content.update(sections)
    return content


def _explain(error: OmegaConfBaseException, where: str | Path, key: str | None = None) -> str:
    """The error as one line for `where` (the recipe file, or an override), naming the key and what is valid."""
    key = getattr(error, "full_key", None) or key or "?"
    message = str(error).splitlines()[0]
    if "Key '" in message and "not in" in message:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = _schema_node(parent)
        valid = sorted(f.name for f in fields(node)) if node else []
        leaf = key.rsplit(".", 1)[-1]
        hint = difflib.get_close_matches(leaf, valid, n=1)
        return (
            f"{where}: unknown key '{key}'"
            + (f" (did you mean '{hint[0]}'?)" if hint else "")
            + (f"; valid keys here: {valid}" if valid else "")
        )
    return f"{where}: invalid value for '{key}': {message}"


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
    _check_model(recipe.model)
    _check_run_name(recipe.run_name)
    _check_lora(recipe.lora)
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


def _check_run_name(name: str) -> None:
    """The run folder is `<output_dir>/<run_name>`: a path in the name would write elsewhere."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise RecipeError(
            f"run_name={name!r} is not valid; valid: a plain name without '/', '\\' or '..' "
            "(the run folder is <output_dir>/<run_name>; put the path in output_dir)"
        )


def _check_model(model: ModelConfig) -> None:
    choices = {
        "dtype": DTYPES,
        "bnb_4bit_quant_type": BNB_4BIT_TYPES,
        "bnb_4bit_compute_dtype": DTYPES[1:],
        "bnb_4bit_quant_storage": (None, "uint8", *DTYPES[1:]),
    }
    for name, valid in choices.items():
        if getattr(model, name) not in valid:
            raise RecipeError(f"model.{name}={getattr(model, name)!r} is not valid; valid: {list(valid)}")
    if model.load_in_4bit and model.load_in_8bit:
        raise RecipeError("model.load_in_4bit and model.load_in_8bit are both true; choose one (or neither)")
    if model.revision is not None and Path(model.path).expanduser().exists():
        raise RecipeError(
            f"model.revision={model.revision!r} applies to hub ids, but model.path={model.path!r} is a local "
            "folder; remove the revision (or check out that revision into the folder)"
        )


def _check_lora(lora: LoraSettings) -> None:
    """The fields peft would reject late (when the trainer wraps the model), named now."""
    if not lora.enabled:
        return
    if lora.r < 1:
        raise RecipeError(f"lora.r={lora.r} is not valid; valid: an integer >= 1 (the adapter's rank)")
    if not lora.alpha > 0:
        raise RecipeError(f"lora.alpha={lora.alpha} is not valid; valid: a number > 0")
    if not 0.0 <= lora.dropout < 1.0:
        raise RecipeError(f"lora.dropout={lora.dropout} is not valid; valid: 0 <= dropout < 1")
    modules = lora.target_modules
    if not (isinstance(modules, str) and modules) and not (
        isinstance(modules, list) and modules and all(isinstance(m, str) for m in modules)
    ):
        raise RecipeError(
            f"lora.target_modules={modules!r} is not valid; valid: a list of module names (e.g. [q_proj, v_proj]), "
            "'all-linear', or a regular expression over module names"
        )
    if lora.task_type != "CAUSAL_LM":
        raise RecipeError(
            f"lora.task_type={lora.task_type!r} is not valid; valid: ['CAUSAL_LM'] (every method trains a causal LM)"
        )


def _check_count(value: int | None, key: str) -> None:
    if value is not None and value < 1:
        raise RecipeError(f"{key}={value} is not valid; valid: an integer >= 1 (or unset)")


def _check_data(data: DataConfig, key: str, needs_pairs: bool = True) -> None:
    if data.format not in DATA_FORMATS:
        raise RecipeError(f"{key}.format={data.format!r} is not valid; valid: {list(DATA_FORMATS)}")
    if needs_pairs and data.format == "labelled_pairs" and not data.label_column:
        raise RecipeError(f"{key}.label_column is required with format=labelled_pairs")
    if needs_pairs and data.format == "ratings" and not data.rating_column:
        raise RecipeError(f"{key}.rating_column is required with format=ratings")
    if not 0.0 <= data.eval_fraction < 1.0:
        raise RecipeError(f"{key}.eval_fraction={data.eval_fraction} must be in [0, 1)")
    _check_count(data.max_samples, f"{key}.max_samples")
    _check_count(data.max_pairs_per_prompt, f"{key}.max_pairs_per_prompt")
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
    if reward.version is not None and reward.type != "function":
        raise RecipeError(f"{key}.version is only for type=function (got type={reward.type}); remove it")
    if reward.type == "function" and not re.fullmatch(r"[\w.]+:[\w.]+", reward.function):
        raise RecipeError(f"{key}.function={reward.function!r} must be 'package.module:function'")
    if reward.path and not reward.train:
        _check_path(reward.path, f"{key}.path")
    _check_count(reward.max_length, f"{key}.max_length")
    _check_count(reward.batch_size, f"{key}.batch_size")


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
    _check_training_values(training, config_class)


def _integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


# Ranges of the `training` fields whose bad values the trainer accepts silently or fails on after loading.
TRAINING_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "beta": (lambda x: _number(x) and x > 0, "a number > 0 (the strength of the KL penalty)"),
    "learning_rate": (lambda x: _number(x) and x >= 0, "a number >= 0"),
    "max_length": (
        lambda x: x is None or (_integer(x) and x >= 1),
        "an integer >= 1, or null (no truncation)",
    ),
    "max_steps": (_integer, "an integer (-1: train for num_train_epochs)"),
    "num_train_epochs": (lambda x: _number(x) and x > 0, "a number > 0"),
    **{
        f: (lambda x: _integer(x) and x >= 1, "an integer >= 1")
        for f in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
    },
    **{
        f: (lambda x: x is None or (_integer(x) and x >= 1), "an integer >= 1, or null")
        for f in ("margin_batch_size", "precompute_ref_batch_size")
    },
}


def _check_training_values(training: dict[str, Any], config_class: type) -> None:
    """Values of the wrong type for their field (a string for a number), and out of range for the fields in
    `TRAINING_RANGES`: what the trainer would accept silently, or fail on once the model is loaded."""
    hints = typing.get_type_hints(config_class)
    for key, value in training.items():
        check, valid = TRAINING_RANGES.get(key, (None, ""))
        if check is not None and not check(value):
            raise RecipeError(f"training.{key}={value!r} is not valid; valid: {valid}")
        if check is None and _expects_number(hints.get(key)) and not _matches_number(value, hints[key]):
            raise RecipeError(f"training.{key}={value!r} is not valid; valid: a number ({hints[key]})")


def _options(hint: Any) -> tuple:
    """The types a field accepts: the members of a union (`int | None`), else the annotation itself."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _expects_number(hint: Any) -> bool:
    """The field holds a number (possibly optional), not a string or anything else."""
    options = [a for a in _options(hint) if a is not type(None)]
    return bool(options) and all(a in (int, float) for a in options)


def _matches_number(value: Any, hint: Any) -> bool:
    options = _options(hint)
    if value is None:
        return type(None) in options
    return _number(value) if float in options else _integer(value)


def resolved_yaml(recipe: Recipe) -> str:
    """The recipe as it is written next to its runs: resolved, but values read from the environment as their
    `${oc.env:...}` text (see `as_dict`)."""
    return OmegaConf.to_yaml(OmegaConf.create(as_dict(recipe)))


def as_dict(recipe: Recipe, redact: bool = True) -> dict[str, Any]:
    """The recipe resolved, as plain values. With `redact` (what is written: manifests, model cards) every value
    read from the environment is its `${oc.env:...}` text, and so is that value wherever else it appears (e.g.
    an interpolation of it)."""
    data = OmegaConf.to_container(OmegaConf.structured(recipe), resolve=True)
    if not redact or not recipe.from_environment:
        return data  # type: ignore[return-value]
    values = leaves(data)
    secrets = {str(values[k]): text for k, text in recipe.from_environment.items() if str(values.get(k, ""))}

    def hide(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: hide(v) for k, v in value.items()}
        if isinstance(value, list):
            return [hide(v) for v in value]
        if isinstance(value, str):
            if value in secrets:
                return secrets[value]
            for secret, text in secrets.items():
                if len(secret) >= 4:  # inside a longer value; a short one would match by chance
                    value = value.replace(secret, text)
        return value

    return hide(data)


def leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """`{"training": {"beta": 0.1}}` -> `{"training.beta": 0.1}` (list items by index when any is a mapping or
    a list; a list of plain values is one leaf)."""
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in leaves(item, f"{prefix}{key}.").items()}
    if isinstance(value, list) and value and any(isinstance(v, dict | list) for v in value):
        return {k: v for i, item in enumerate(value) for k, v in leaves(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): value}
