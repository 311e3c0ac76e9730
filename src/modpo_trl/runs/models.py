"""The policy a recipe trains: base model, tokenizer, LoRA and QLoRA settings (`model:` and `lora:` sections)."""

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
    """Fails before anything is loaded when the policy cannot load here: 4-bit without CUDA, a missing path."""
    if recipe.model.load_in_4bit and not torch.cuda.is_available():
        raise RecipeError(
            "model.load_in_4bit=true needs a CUDA GPU (bitsandbytes 4-bit quantisation) and none is visible here; "
            "run on a GPU machine, or set model.load_in_4bit=false to train the LoRA adapter on the unquantised "
            f"model {recipe.model.path!r}"
        )
    check_loadable(recipe.model.path, "model.path")
    load_tokenizer(
        recipe.model.tokenizer or recipe.model.path
    )  # a missing tokenizer is an error now, not later
    try:
        config = AutoConfig.from_pretrained(
            recipe.model.path, trust_remote_code=recipe.model.trust_remote_code
        )
    except Exception:  # e.g. a LoRA adapter folder as the policy: loading it will tell what is wrong
        return
    _check_context(recipe, config)
    _check_target_modules(recipe, config)


def _check_context(recipe: Recipe, config: PretrainedConfig) -> None:
    """`training.max_length` within the positions the model was built for."""
    context = getattr(config, "max_position_embeddings", None)
    scaling = getattr(config, "rope_scaling", None) or {}
    factor = (
        scaling.get("factor", 1) if isinstance(scaling, dict) else 1
    )  # a context extended by RoPE scaling
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
    if not lora.enabled:
        return
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    except (
        Exception
    ):  # an architecture that cannot be built without its weights: peft will check when loading
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
