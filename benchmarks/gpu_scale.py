"""Part ``scale`` (``--size gpu`` only): MODPO with QLoRA on a Llama-2-7B-shaped model.

A Llama-2-7B-shaped model with random weights, QLoRA (NF4, LoRA r=64 on q/k/v/o, gradient checkpointing) at
sequence length 1024: MODPO's peak memory and step time at batch 1, 2, 4, ... up to the first OOM or the first
batch over 48 GiB, then (a) TRL's DPO and (b) MODPO at one batch for the ratio, as in the ``step`` part. Needs
CUDA and bitsandbytes, and about 15 GB of disk for the random 7B checkpoint, which is built once under
``--checkpoint-dir``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase, Trainer
from trl import DPOTrainer

from harness import (
    GIB,
    LLAMA2_7B,
    WEIGHTS,
    Context,
    Dims,
    Target,
    fmt,
    llama_config,
    n_params,
    politeness,
    preference_rows,
    ratio,
    release_memory,
    round_robin,
    summarize,
    train_alone,
)
from modpo_trl import FunctionReward, MODPOConfig, MODPOTrainer
from modpo_trl.runs.models import load_policy, lora_config
from modpo_trl.runs.recipe import LoraSettings, ModelConfig, Recipe

TARGETS = {
    "qlora_7b_peak_gib": Target(24.0, "7B QLoRA MODPO, seq 1024, batch 1: peak memory < 24 GiB", strict=True)
}
STOP_GIB = 48.0  # the batch ladder ends at the first batch over this
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def ensure_random_checkpoint(path: Path, dims: Dims, tokenizer: PreTrainedTokenizerBase, device: str) -> Path:
    """A random-init bf16 Llama checkpoint at `path`, made once.

    Built in bf16 directly on `device` (the GPU: never as fp32, never on the CPU) and saved as safetensors with
    the tokenizer, so that loading it 4-bit is exactly a user's QLoRA path. The folder gets its name only once
    complete, so an interrupted build is redone rather than read.
    """
    if (path / "config.json").exists():
        return path
    need = 2 * n_params(dims) * 1.1
    path.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(path.parent).free < need:
        raise SystemExit(
            f"--checkpoint-dir {path.parent}: the random checkpoint needs {need / 1e9:.1f} GB of free disk, there "
            f"are {shutil.disk_usage(path.parent).free / 1e9:.1f} GB; pass another --checkpoint-dir"
        )
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(dims, tokenizer, 4096), dtype=torch.bfloat16)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    release_memory()
    os.replace(tmp, path)
    return path


def scale_trainer(ctx: Context, checkpoint: Path, variant: str, batch: int, steps: int) -> Trainer:
    """(a) or (b) with LoRA on the checkpoint, loaded (4-bit) through modpo_trl's own `load_policy`."""
    scale = ctx.spec.scale
    recipe = Recipe(
        run_name="bench",
        model=ModelConfig(path=str(checkpoint), dtype="bfloat16", load_in_4bit=scale.load_in_4bit),
        lora=LoraSettings(r=scale.lora_r, alpha=scale.lora_alpha, target_modules=LORA_TARGETS),
    )
    model, tokenizer = load_policy(recipe)
    overrides = dict(
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch,
        max_length=scale.seq_len,
        max_steps=steps,
        precompute_ref_log_probs=True,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False},
    )
    common = dict(
        train_dataset=Dataset.from_list(preference_rows(batch * steps, scale.seq_len)),
        processing_class=tokenizer,
        peft_config=lora_config(recipe),
    )
    if variant == "dpo":
        return DPOTrainer(model, args=ctx.args(**overrides), **common)
    # Function margins keep the 7B run about the policy: a step reads margins from the batch either way.
    margins = [FunctionReward(politeness), FunctionReward(response_length)]
    args = ctx.args(MODPOConfig, weights=WEIGHTS, score_cache_dir=str(ctx.score_cache), **overrides)
    return MODPOTrainer(model, args=args, margin_rewards=margins, **common)


def response_length(prompts: list, responses: list) -> list[float]:
    return [len(r.split()) / 100 for r in responses]


def scale_point(ctx: Context, checkpoint: Path, variant: str, batch: int) -> dict[str, Any]:
    """One variant alone at one batch size: peak memory and step time, or the OOM."""
    try:
        memory, measured = train_alone(
            lambda: scale_trainer(ctx, checkpoint, variant, batch, ctx.spec.scale.steps), ctx.spec.device
        )
    except torch.cuda.OutOfMemoryError as e:  # leaving this block drops the traceback and its frames' tensors
        oom = str(e).splitlines()[0]
    else:
        return {"batch": batch, "oom": False, **memory, **summarize(measured)}
    release_memory()
    return {"batch": batch, "oom": True, "error": oom}


def measure(ctx: Context, checkpoint_dir: Path) -> dict[str, Any]:
    scale = ctx.spec.scale
    name = "llama-{hidden}x{layers}-random".format(**asdict(scale.dims))
    checkpoint = ensure_random_checkpoint(checkpoint_dir / name, scale.dims, ctx.tokenizer, ctx.spec.device)
    ladder = []
    for batch in tqdm(scale.batches, desc="QLoRA MODPO, batch ladder", disable=False):
        ladder.append(scale_point(ctx, checkpoint, "modpo", batch))
        if ladder[-1]["oom"] or ladder[-1]["peak_bytes"] > STOP_GIB * GIB:
            break
    fits = [p["batch"] for p in ladder if not p["oom"] and p["peak_bytes"] <= STOP_GIB * GIB]
    limit = TARGETS["qlora_7b_peak_gib"].limit * GIB
    result = {
        "dims": asdict(scale.dims),
        "params": n_params(scale.dims),
        "seq_len": scale.seq_len,
        "load_in_4bit": scale.load_in_4bit,
        "lora": {"r": scale.lora_r, "alpha": scale.lora_alpha, "target_modules": LORA_TARGETS},
        "ladder": ladder,
        "largest_batch_under_48gib": max(fits, default=None),
        "largest_batch_under_24gib": max(
            (p["batch"] for p in ladder if not p["oom"] and p["peak_bytes"] < limit), default=None
        ),
    }
    if fits:
        batch = max(b for b in fits if b <= scale.ratio_batch)
        modpo_alone = next(p for p in ladder if p["batch"] == batch)
        dpo_alone = scale_point(ctx, checkpoint, "dpo", batch)
        result["comparison"] = {"batch": batch, **compare(ctx, checkpoint, batch)}
        result["comparison"]["memory"] = {"dpo": dpo_alone, "modpo": modpo_alone}
        result["comparison"]["ratios"]["peak_memory"] = ratio(
            modpo_alone.get("peak_bytes"), dpo_alone.get("peak_bytes")
        )
    return result


def compare(ctx: Context, checkpoint: Path, batch: int) -> dict[str, Any]:
    """(a) and (b) at scale, both loaded, in alternating repetitions like the `step` part."""
    scale = ctx.spec.scale
    trainers = None
    try:
        trainers = {
            v: scale_trainer(ctx, checkpoint, v, batch, scale.steps_per_rep) for v in ("dpo", "modpo")
        }
        samples, _ = round_robin(trainers, scale.reps, "QLoRA (a) vs (b)")
        error = None
    except torch.cuda.OutOfMemoryError as e:  # two models loaded at once may not fit where one did
        error = str(e).splitlines()[0]
    del trainers
    release_memory()
    if error is not None:
        return {"error": f"both variants loaded at batch {batch}: {error}", "ratios": {}}
    results = {v: summarize(s) for v, s in samples.items()}
    ratios = {
        "interval_time": ratio(results["modpo"]["median_interval_s"], results["dpo"]["median_interval_s"]),
        "step_time": ratio(results["modpo"]["median_step_s"], results["dpo"]["median_step_s"]),
    }
    return {"variants": results, "ratios": ratios}


def target_values(result: dict[str, Any]) -> dict[str, float | None]:
    """The 7B target counts only at the full size: the Llama-2-7B shape, 4-bit, seq 1024, batch 1."""
    full_size = (
        result.get("dims") == asdict(LLAMA2_7B)
        and result.get("load_in_4bit")
        and result.get("seq_len") == 1024
    )
    batch_one = next((p for p in result.get("ladder", []) if p["batch"] == 1), None) if full_size else None
    return {"qlora_7b_peak_gib": None if not batch_one or batch_one["oom"] else batch_one["peak_bytes"] / GIB}


def markdown(result: dict[str, Any]) -> list[str]:
    lines = [
        f"## {'QLoRA (NF4)' if result['load_in_4bit'] else 'LoRA'} MODPO on a random Llama of "
        f"{result['params'] / 1e9:.2f}B parameters, seq {result['seq_len']}",
        "",
        "| batch | peak GiB | s/step | tokens/s |",
        "|---|---|---|---|",
    ]
    for p in result["ladder"]:
        if p["oom"]:
            lines.append(f"| {p['batch']} | OOM | | |")
        else:
            lines.append(
                f"| {p['batch']} | {fmt(p['peak_bytes'] / GIB, 2)} | {fmt(p['median_interval_s'])} | "
                f"{fmt(p['tokens_per_s'], 0)} |"
            )
    lines += [
        "",
        f"Largest batch under 48 GiB: {result['largest_batch_under_48gib']}; under 24 GiB: "
        f"{result['largest_batch_under_24gib']}.",
    ]
    if "comparison" in result:
        c = result["comparison"]
        lines.append(
            f"(b)/(a) at batch {c['batch']}: s/step {fmt(c['ratios'].get('interval_time'))}, "
            f"peak memory {fmt(c['ratios'].get('peak_memory'))}. {c.get('error', '')}"
        )
    return [*lines, ""]
