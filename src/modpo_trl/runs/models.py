"""The policy a recipe trains: base model, tokenizer, LoRA and QLoRA settings (`model:` and `lora:` sections)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from accelerate import PartialState
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

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
    """Fails before anything is loaded when the policy cannot load here: 4-bit without CUDA, a missing path."""
    if recipe.model.load_in_4bit and not torch.cuda.is_available():
        raise RecipeError(
            "model.load_in_4bit=true needs a CUDA GPU (bitsandbytes 4-bit quantisation) and none is visible here; "
            "run on a GPU machine, or set model.load_in_4bit=false to train the LoRA adapter on the unquantised "
            f"model {recipe.model.path!r}"
        )
    check_loadable(recipe.model.path, "model.path")


def torch_dtype(name: str):
    """`"bfloat16"` -> `torch.bfloat16`; `"auto"` stays `"auto"` (the checkpoint's own dtype)."""
    return name if name == "auto" else getattr(torch, name)


def lora_config(recipe: Recipe) -> LoraConfig | None:
    """The recipe's `lora:` section as a `peft.LoraConfig`, or `None` when `lora.enabled` is false."""
    lora = recipe.lora
    if not lora.enabled:
        return None
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
    )


def load_policy(recipe: Recipe) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads the base model and tokenizer of `recipe.model` (QLoRA-ready when `load_in_4bit`).

    Without quantisation the model stays where it is loaded and `Trainer` places it (one GPU, DDP, DeepSpeed,
    FSDP). A 4-bit model cannot be moved after loading, so each process loads it onto its own GPU.
    """
    check_policy(recipe)
    cfg = recipe.model
    kwargs = {"dtype": torch_dtype(cfg.dtype), "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=torch_dtype(cfg.bnb_4bit_compute_dtype),
            bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        )
        kwargs["device_map"] = {"": PartialState().local_process_index}
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs)
    except Exception as e:
        raise OSError(f"could not load the policy from model.path={cfg.path!r}: {e}") from e
    if cfg.load_in_4bit:
        # Freezes the quantised weights and upcasts the rest (norms) to fp32; the Trainer itself turns on
        # gradient checkpointing when `training.activation_checkpointing` asks for it.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.path)  # pad token = eos when the tokenizer has none
    return model, tokenizer
