"""The policy a recipe trains: base model, tokenizer, LoRA and QLoRA settings (`model:` and `lora:` sections),
mapped onto TRL's `ModelConfig` and built by TRL's `get_peft_config` / `get_quantization_config`."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from accelerate import PartialState
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase
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
    if not Path(path).expanduser().exists() and not HUB_ID.fullmatch(path):
        raise RecipeError(f"{key}={path!r} does not exist (and is not a hub id such as 'org/name'){hint}")


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
