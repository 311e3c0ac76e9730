"""The policy a recipe trains: base model, tokenizer, LoRA and QLoRA settings (`model:` and `lora:` sections),
mapped onto TRL's `ModelConfig` and built by TRL's `get_peft_config` / `get_quantization_config`."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from accelerate import PartialState, init_empty_weights
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from trl import ModelConfig as TRLModelConfig
from trl import get_peft_config, get_quantization_config

from ..loading import load_tokenizer
from ..offline import ensure_offline_model
from .recipe import Recipe, RecipeError

HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # org/name, or a legacy name such as gpt2


def check_loadable(path: str, key: str, hint: str = "") -> None:
    """A path that is neither an existing local file/folder nor a hub id `org/name` cannot load: say so now.

    An offline model's folder (`${offline:smollm2}`) is made first: SmolLM2 is converted on first use.
    """
    try:
        ensure_offline_model(path)
    except OSError as e:
        raise RecipeError(f"{key}={path!r}: {e}") from None
    local = Path(path).expanduser()
    if not local.exists() and not HUB_ID.fullmatch(path):
        raise RecipeError(f"{key}={path!r} does not exist (and is not a hub id such as 'org/name'){hint}")
    if local.is_dir() and not any((local / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise RecipeError(
            f"{key}={path!r} is a folder with no config.json (nor adapter_config.json); valid: a folder written "
            f"by save_pretrained, or a hub id{hint}"
        )
    if (
        not local.exists()
        and hub_constants.HF_HUB_OFFLINE
        and not isinstance(try_to_load_from_cache(path, "config.json"), str)
    ):
        raise RecipeError(
            f"{key}={path!r} is not a local folder and not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 "
            "forbids downloading it; valid: a local model folder, or a hub id downloaded before (or unset "
            "HF_HUB_OFFLINE)"
        )


def check_policy(recipe: Recipe) -> None:
    """Fails before anything is loaded when the policy cannot load here: 4/8-bit without CUDA, a missing path."""
    model = recipe.model
    bits = "load_in_4bit" if model.load_in_4bit else "load_in_8bit" if model.load_in_8bit else None
    if bits and not torch.cuda.is_available():
        raise RecipeError(
            f"model.{bits}=true needs a CUDA GPU (bitsandbytes {bits[8]}-bit quantisation) and none is visible here; run on a GPU "
            f"machine, or set model.{bits}=false to train the LoRA adapter on the unquantised model {model.path!r}"
        )
    check_loadable(model.path, "model.path")
    load_tokenizer(model.tokenizer or model.path)  # a missing tokenizer is an error now, not later
    try:
        config = AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    except Exception:  # e.g. a LoRA adapter folder as the policy: loading it will tell what is wrong
        return
    _check_context(recipe, config)
    _check_target_modules(recipe, config)


def _check_context(recipe: Recipe, config: PretrainedConfig) -> None:
    """`training.max_length` within the positions the model was built for."""
    context = getattr(config, "max_position_embeddings", None)
    scaling = getattr(config, "rope_scaling", None) or {}
    # a context extended by RoPE scaling
    factor = scaling.get("factor", 1) if isinstance(scaling, dict) else 1
    max_length = recipe.training.get("max_length")
    if isinstance(context, int) and isinstance(max_length, int) and max_length > context * factor:
        limit = int(context * factor)
        raise RecipeError(
            f"training.max_length={max_length} exceeds the policy's context (max_position_embeddings={context}"
            f"{f' x rope_scaling factor {factor}' if factor != 1 else ''} in the config of {recipe.model.path!r}); "
            f"valid: 1..{limit}"
        )


def _check_target_modules(recipe: Recipe, config: PretrainedConfig) -> None:
    """Every `lora.target_modules` entry names modules of the policy (found on a weightless copy of it)."""
    lora = recipe.lora
    if not lora.enabled or isinstance(lora.target_modules, str):  # 'all-linear' or a regex: peft resolves it
        return
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    except Exception:  # an architecture not buildable without its weights: peft checks when loading
        return
    names = [name for name, _ in model.named_modules()]
    leaves = sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if not list(module.children())}
    )
    # peft's rule: a target is a module name or the end of one after a dot
    unknown = [t for t in lora.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unknown:
        raise RecipeError(
            f"lora.target_modules has {unknown}, which name(s) no module of {recipe.model.path!r}; valid: "
            f"names of its modules, e.g. {leaves}"
        )


def torch_dtype(name: str):
    """`"bfloat16"` -> `torch.bfloat16`; `"auto"` stays `"auto"` (the checkpoint's own dtype)."""
    return name if name == "auto" else getattr(torch, name)


def trl_model_config(recipe: Recipe) -> TRLModelConfig:
    """The recipe's `model:` and `lora:` sections as TRL's `ModelConfig` (what TRL's scripts hand to
    `get_peft_config` and `get_quantization_config`)."""
    model, lora = recipe.model, recipe.lora
    config = TRLModelConfig(
        model_name_or_path=model.path,
        model_revision=model.revision or "main",
        dtype=model.dtype,
        attn_implementation=model.attn_implementation,
        use_peft=lora.enabled,
        lora_r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        lora_target_parameters=lora.target_parameters,
        lora_modules_to_save=lora.modules_to_save,
        lora_task_type=lora.task_type,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        load_in_8bit=model.load_in_8bit,
        load_in_4bit=model.load_in_4bit,
        bnb_4bit_quant_type=model.bnb_4bit_quant_type,
        use_bnb_nested_quant=model.bnb_4bit_use_double_quant,
        bnb_4bit_quant_storage=model.bnb_4bit_quant_storage,
    )
    # Set after __post_init__, which turns a one-name list into a string: peft reads a string as a regular
    # expression over full module names, so ["q_proj"] would match nothing.
    config.lora_target_modules = lora.target_modules
    return config


def lora_config(recipe: Recipe) -> LoraConfig | None:
    """The recipe's `lora:` section as TRL's `get_peft_config` builds it, or `None` when `lora.enabled` is false."""
    config = get_peft_config(trl_model_config(recipe))
    if config is not None and recipe.model.revision:
        config.revision = (
            recipe.model.revision
        )  # the base model's revision, when the adapter is loaded by path
    return config


def quantization_config(recipe: Recipe) -> BitsAndBytesConfig | None:
    """TRL's `get_quantization_config` for the recipe (None when it loads unquantised); the 4-bit compute dtype
    is `model.bnb_4bit_compute_dtype` (TRL takes it from `dtype`, which may be "auto")."""
    config = trl_model_config(recipe)
    config.dtype = recipe.model.bnb_4bit_compute_dtype
    return get_quantization_config(config)


def load_policy(recipe: Recipe) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads the base model and tokenizer of `recipe.model` (QLoRA-ready when quantised to 4 or 8 bits).

    Without quantisation the model stays where it is loaded and `Trainer` places it (one GPU, DDP, DeepSpeed,
    FSDP). A quantised model cannot be moved after loading, so each process loads it onto its own GPU.
    """
    check_policy(recipe)
    cfg = recipe.model
    kwargs = {"dtype": torch_dtype(cfg.dtype), "trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    quantization = quantization_config(recipe)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": PartialState().local_process_index}
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs)
    except Exception as e:
        raise OSError(f"could not load the policy from model.path={cfg.path!r}: {e}") from e
    if quantization is not None:
        # Freezes the quantised weights and upcasts the rest (norms) to fp32; the Trainer itself turns on
        # gradient checkpointing when `training.activation_checkpointing` asks for it.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # pad token = eos when the tokenizer has none; the policy's own tokenizer comes from the same revision
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.path, revision=None if cfg.tokenizer else cfg.revision)
    return model, tokenizer
