"""The dry run's estimate of the peak training memory of one process, from the policy's `config.json` alone: a
weightless copy of the model on the meta device gives exact parameter counts (LoRA's through peft), nothing is
loaded or downloaded.

    weights       every parameter at its precision: `model.dtype` (auto: the config's); quantised, the decoder's
                  `nn.Linear` weights at 4 bits (+ one fp32 absmax per 64 weights, or an 8-bit one with double
                  quantisation) or at 8 bits, and every other parameter at fp32 (`prepare_model_for_kbit_training`
                  upcasts them)
    trainable     LoRA's parameters (fp32: peft upcasts adapters of 16-bit models) with their gradients and the
                  optimizer's state (AdamW: two fp32 moments; 8-bit optimizers 2 bytes; Lion 4; SGD, Adafactor
                  none); without LoRA every parameter, its gradient at its precision, and for the pair methods a
                  reference copy of the weights unless `precompute_ref_log_probs`
    activations   per token, what each decoder layer keeps for the backward pass: 4h + 2q + 2kv + 4i values
                  (norm inputs and outputs, q/k/v, the attention output, the gated MLP's four intermediates;
                  memory-efficient attention, no s x s scores), and the logits: V values plus their fp32
                  log-softmax. With activation checkpointing each layer keeps only its input (h), plus one layer's
                  values while it is recomputed. Tokens: per_device_train_batch_size x max_length, twice for the
                  pair methods (chosen and rejected go through the model together).

Not counted: the CUDA context and allocator slack, reward models (scored before training), DPA's generation
phase, sharding by DeepSpeed / FSDP (the estimate is for data parallelism, where every process holds it all).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import init_empty_weights
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from trl import DPOConfig

from .models import lora_config
from .recipe import Recipe

GB = 1e9
ABSMAX_BLOCK, NESTED_BLOCK = 64, 256  # bitsandbytes' 4-bit block sizes (weights per absmax, absmax per scale)


@dataclass
class MemoryEstimate:
    """Bytes of one training process (see the module docstring for what each part counts)."""

    parameters: int
    trainable: int
    weights: float
    trainable_state: float
    reference: float
    activations: float  # without activation checkpointing
    activations_checkpointed: float
    checkpointing: bool
    dtype: str  # of the stored weights (before any quantisation)
    optimizer: str
    sequences: int
    length: int

    @property
    def total(self) -> float:
        used = self.activations_checkpointed if self.checkpointing else self.activations
        return self.weights + self.trainable_state + self.reference + used


def policy_config(recipe: Recipe) -> PretrainedConfig:
    """The policy's config from its local folder or the local Hugging Face cache; OSError when it is not there
    (a dry run downloads nothing)."""
    model = recipe.model
    try:
        return AutoConfig.from_pretrained(
            model.path,
            revision=model.revision,
            trust_remote_code=model.trust_remote_code,
            local_files_only=True,
        )
    except (
        Exception
    ) as e:  # transformers raises OSError, ValueError or KeyError, depending on what is missing
        raise OSError(f"no config.json for model.path={model.path!r} here ({type(e).__name__})") from e


def dtype_bytes(name: Any) -> int:
    """Bytes of one value of a dtype given as `torch.dtype` or its name; 4 (fp32) when unknown."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else name
    return torch.finfo(dtype).bits // 8 if isinstance(dtype, torch.dtype) else 4


def optimizer_bytes(optim: str) -> int:
    """Optimizer state per trainable parameter for a `TrainingArguments.optim` name."""
    if "8bit" in optim:
        return 2
    if optim.startswith(("sgd", "adafactor")):
        return 0
    return 4 if "lion" in optim else 8


def estimate_memory(recipe: Recipe, args: Any, config: PretrainedConfig) -> MemoryEstimate:
    """The estimate for `recipe` trained with the trainer config `args`, its policy described by `config`."""
    model_cfg, training = recipe.model, recipe.training
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls transformers' deprecated names
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
        model.tie_weights()  # not done inside init_empty_weights; tied embeddings are one parameter
        parameters = sum(p.numel() for p in model.parameters())
        output = model.get_output_embeddings()
        linear = sum(
            m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not output
        )
        peft = lora_config(recipe)
        with init_empty_weights():
            trainable = get_peft_model(model, peft).get_nb_trainable_parameters()[0] if peft else parameters

    dtype = (
        str(config.dtype or "float32").removeprefix("torch.")
        if model_cfg.dtype == "auto"
        else model_cfg.dtype
    )
    stored = dtype_bytes(dtype)
    if model_cfg.load_in_4bit:
        absmax = (1 + 4 / NESTED_BLOCK if model_cfg.bnb_4bit_use_double_quant else 4) / ABSMAX_BLOCK
        weights = linear * (0.5 + absmax) + (parameters - linear) * 4
    elif model_cfg.load_in_8bit:
        weights = linear * 1 + (parameters - linear) * 4
    else:
        weights = parameters * stored
    optim = str(getattr(args.optim, "value", args.optim))  # an OptimizerNames member once the config is built
    optimizer = optimizer_bytes(optim)
    pairs = isinstance(args, DPOConfig)
    if peft:
        trainable_state, reference = trainable * (4 + 4 + optimizer), 0.0
    else:
        trainable_state = parameters * (stored + optimizer)
        reference = weights if pairs and not args.precompute_ref_log_probs else 0.0

    text = config.get_text_config()
    h, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    q, kv = heads * head_dim, (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    per_layer = 4 * h + 2 * q + 2 * kv + 4 * (getattr(text, "intermediate_size", None) or 4 * h)
    mixed = training.get("bf16", not training.get("fp16", False)) or training.get("fp16", False)
    compute = dtype_bytes(model_cfg.bnb_4bit_compute_dtype) if model_cfg.quantized else stored
    act = 2 if mixed else compute
    length = args.max_length or text.max_position_embeddings
    sequences = args.per_device_train_batch_size * (2 if pairs else 1)
    tokens = sequences * length
    logits = vocab * (act + 4)
    return MemoryEstimate(
        parameters=parameters,
        trainable=trainable,
        weights=weights,
        trainable_state=trainable_state,
        reference=reference,
        activations=tokens * (layers * per_layer * act + logits),
        activations_checkpointed=tokens * ((layers * h + per_layer) * act + logits),
        checkpointing=bool(args.activation_checkpointing),
        dtype=dtype,
        optimizer=optim,
        sequences=sequences,
        length=length,
    )


def memory_lines(recipe: Recipe, args: Any) -> list[str]:
    """The dry run's lines on the estimate (or on why there is none)."""
    try:
        config = policy_config(recipe)
    except OSError as e:
        return [f"# peak memory per process: cannot estimate: {e}; the dry run downloads nothing"]
    try:
        m = estimate_memory(recipe, args, config)
    except (
        AttributeError,
        ImportError,
        KeyError,
        TypeError,
        ValueError,
    ) as e:  # an architecture it cannot read
        return [
            f"# peak memory per process: cannot estimate for {type(config).__name__}: {type(e).__name__}: {e}"
        ]
    quantised = "4-bit" if recipe.model.load_in_4bit else "8-bit" if recipe.model.load_in_8bit else None
    lines = [
        "# peak memory per process, estimated from the policy's config.json (nothing loaded):",
        f"#   base weights   {size(m.weights):>10}  ({m.parameters / 1e6:,.1f}M parameters, {quantised or m.dtype})",
        f"#   trainable      {size(m.trainable_state):>10}  ({m.trainable / 1e6:,.2f}M parameters with gradients "
        f"and {m.optimizer} state)",
    ]
    if m.reference:
        lines.append(f"#   reference copy {size(m.reference):>10}")
    used = m.activations_checkpointed if m.checkpointing else m.activations
    lines += [
        f"#   activations    {size(used):>10}  ({m.sequences} sequences x {m.length} tokens; "
        f"{size(m.activations_checkpointed)} with activation checkpointing, {size(m.activations)} without)",
        f"#   total          {size(m.total):>10}  (+ the CUDA context, ~0.5 GB; compare `make bench-gpu`)",
    ]
    return lines


def size(n: float) -> str:
    """Bytes as `12.34 GB`, or `5.6 MB` below 0.1 GB."""
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"
