"""Part ``step``: what one training step costs, MODPO against TRL's DPO and MOC's solver against its linear loss.

Per-step cost of (a) TRL's ``DPOTrainer`` with ``precompute_ref_log_probs=True``, (b) ``MODPOTrainer`` with two
margin objectives (a reward model and a rule-based function) scored once before training and precomputed
reference log-probs, (c) ``OnTheFlyMODPOTrainer`` (below): margins and reference log-probs computed inside every
step, as the reference MODPO code does; and ``MOCTrainer`` on the same pairs split between two objectives,
(d) with the linear combination of the losses and (e) with the min-norm (MGDA) solver: (e)/(d) is the solver's
overhead. All on the same model, data, batch and sequence length; the variants run in round-robin repetitions
(the order rotating every repetition) after a warm-up repetition each, and each one's peak memory is measured
alone first (see the harness).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, Trainer
from trl import DPOTrainer

from harness import (
    WEIGHTS,
    Context,
    Target,
    fmt,
    ratio,
    release_memory,
    round_robin,
    summarize,
    train_alone,
)
from modpo_trl import MODPOConfig, MODPOTrainer
from modpo_trl.trainers.margins import CHOSEN_MARGINS, REJECTED_MARGINS
from modpo_trl.trainers.moc_config import MOCConfig
from modpo_trl.trainers.moc_trainer import MOCTrainer, objective_pairs

VARIANTS = ("dpo", "modpo", "modpo_on_the_fly", "moc_linear", "moc_mgda")
LABELS = {
    "dpo": "(a) TRL DPO, precomputed ref",
    "modpo": "(b) MODPO, cached margins + precomputed ref",
    "modpo_on_the_fly": "(c) MODPO, margins + ref on the fly",
    "moc_linear": "(d) MOC, linear combination, precomputed ref",
    "moc_mgda": "(e) MOC, MGDA at the policy level, precomputed ref",
}
RATIOS = {  # name: (numerator, denominator)
    "modpo/dpo": ("modpo", "dpo"),
    "on_the_fly/modpo": ("modpo_on_the_fly", "modpo"),
    "moc_mgda/moc_linear": ("moc_mgda", "moc_linear"),
}
TARGETS = {
    "modpo_vs_dpo_step_time": Target(1.03, "(b)/(a) median s/step <= 1.03"),
    "modpo_vs_dpo_peak_memory": Target(1.02, "(b)/(a) peak memory <= 1.02"),
}
ENTRY = Path(__file__).resolve().with_name("bench.py")  # its hidden --probe runs one memory probe


class OnTheFlyMODPOTrainer(MODPOTrainer):
    """Variant (c): MODPO the way the reference code runs it, scoring inside every training step.

    Every step decodes the batch back to text, scores it with every margin source and computes the reference
    log-probs with the reference model (`precompute_ref_log_probs=False`). The margins the constructor scored
    are overwritten, so none of the library's precomputation is used in a step.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        prompts, responses = decode_pairs(self.processing_class, inputs)
        with torch.no_grad():
            scores = torch.stack(
                [
                    torch.as_tensor(s.score(prompts, responses), dtype=torch.float32)
                    for s in self.margin_sources
                ],
                1,
            ).to(inputs["input_ids"].device)
        n = len(scores) // 2  # the batch is [chosen rows, rejected rows]
        inputs = {**inputs, CHOSEN_MARGINS: scores[:n], REJECTED_MARGINS: scores[n:]}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def decode_pairs(tokenizer: PreTrainedTokenizerBase, inputs: dict) -> tuple[list[str], list[str]]:
    """(prompts, responses) of every row of a DPO batch: the completion mask separates the two."""
    ids = inputs["input_ids"].cpu()
    completion = inputs["completion_mask"].cpu().bool()
    prompt = inputs["attention_mask"].cpu().bool() & ~completion
    prompts = tokenizer.batch_decode(
        [r[m].tolist() for r, m in zip(ids, prompt, strict=True)], skip_special_tokens=True
    )
    responses = tokenizer.batch_decode(
        [r[m].tolist() for r, m in zip(ids, completion, strict=True)], skip_special_tokens=True
    )
    return prompts, responses


def build_variant(ctx: Context, variant: str) -> Trainer:
    """One of (a)-(e) on a fresh policy (same seed, so same weights) and the same data."""
    dataset = Dataset.from_list(ctx.rows(ctx.spec.batch * ctx.spec.steps_per_rep))
    model = ctx.policy()
    common = dict(train_dataset=dataset, processing_class=ctx.tokenizer)
    if variant == "dpo":
        return DPOTrainer(model, args=ctx.args(precompute_ref_log_probs=True), **common)
    modpo = dict(weights=WEIGHTS, use_score_cache=True, score_cache_dir=str(ctx.score_cache))
    if variant == "modpo":
        args = ctx.args(MODPOConfig, precompute_ref_log_probs=True, **modpo)
        return MODPOTrainer(model, args=args, margin_rewards=ctx.margin_sources(), **common)
    if variant == "modpo_on_the_fly":
        args = ctx.args(MODPOConfig, precompute_ref_log_probs=False, **modpo)
        return OnTheFlyMODPOTrainer(
            model, ref_model=copy.deepcopy(model), args=args, margin_rewards=ctx.margin_sources(), **common
        )
    # MOC: the same pairs, half labelled by each of two objectives, one preference per pair; the solver's
    # overhead is (e) against (d).
    half = len(dataset) // 2
    pairs = objective_pairs(
        {"kind": dataset.select(range(half)), "polite": dataset.select(range(half, len(dataset)))}
    )
    args = ctx.args(
        MOCConfig,
        objective_names=["kind", "polite"],
        moo_solver=variant.removeprefix("moc_"),
        precompute_ref_log_probs=True,
        use_score_cache=True,
        score_cache_dir=str(ctx.score_cache),
    )
    return MOCTrainer(model, args=args, train_dataset=pairs, processing_class=ctx.tokenizer)


def probe_memory(ctx: Context, variant: str) -> dict[str, Any]:
    """Builds `variant` alone and measures the peak memory of its training steps."""
    memory, _ = train_alone(lambda: build_variant(ctx, variant), ctx.spec.device)
    return memory


def probe_memory_isolated(ctx: Context, variant: str) -> dict[str, Any]:
    """`probe_memory` in a fresh interpreter, so that no other variant's pages are resident."""
    out = ctx.workdir / f"memory-{variant}.json"
    flags = {
        "--size": ctx.spec.name,
        "--probe": variant,
        "--workdir": ctx.workdir,
        "--threads": torch.get_num_threads(),
    }
    cmd = [sys.executable, str(ENTRY), *(str(x) for flag in flags.items() for x in flag)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe of {variant} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def measure(ctx: Context) -> dict[str, Any]:
    spec = ctx.spec
    memory = {}
    for variant in tqdm(VARIANTS, desc="memory, one variant at a time", disable=False):
        probe = probe_memory_isolated if spec.isolate_memory else probe_memory
        memory[variant] = probe(ctx, variant)

    trainers = {v: build_variant(ctx, v) for v in VARIANTS}
    samples, per_rep = round_robin(trainers, spec.reps, "step cost, round-robin")
    del trainers
    release_memory()

    results = {v: {**summarize(samples[v]), "memory": memory[v], "samples": samples[v]} for v in VARIANTS}
    ratios = {}
    for name, (num, den) in RATIOS.items():
        rep_ratios = [a / b for a, b in zip(per_rep[num], per_rep[den], strict=True)]
        ratios[name] = {
            "interval_time": ratio(results[num]["median_interval_s"], results[den]["median_interval_s"]),
            "step_time": ratio(results[num]["median_step_s"], results[den]["median_step_s"]),
            "peak_memory": ratio(memory[num]["peak_bytes"], memory[den]["peak_bytes"]),
            "per_rep_interval_ratio_range": [min(rep_ratios), max(rep_ratios)],
        }
    return {"weights": WEIGHTS, "variants": results, "ratios": ratios}


def target_values(result: dict[str, Any]) -> dict[str, float | None]:
    modpo_dpo = result.get("ratios", {}).get("modpo/dpo", {})
    return {
        "modpo_vs_dpo_step_time": modpo_dpo.get("interval_time"),
        "modpo_vs_dpo_peak_memory": modpo_dpo.get("peak_memory"),
    }


def markdown(result: dict[str, Any]) -> list[str]:
    lines = [
        "## Per-step cost",
        "",
        "| variant | s/step (full) | s/step (fwd+bwd+opt) | IQR s/step (full) | tokens/s | peak memory (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for variant, r in result["variants"].items():
        peak = r["memory"]["peak_bytes"]
        lines.append(
            f"| {LABELS[variant]} | {fmt(r['median_interval_s'])} | {fmt(r['median_step_s'])} | "
            f"{fmt(r['iqr_interval_s'][0])}-{fmt(r['iqr_interval_s'][1])} | {fmt(r['tokens_per_s'], 0)} | "
            f"{fmt(peak / 2**20 if peak else None, 0)} |"
        )
    lines += [
        "",
        "| ratio | s/step (full) | s/step (fwd+bwd+opt) | per-repetition range | peak memory |",
        "|---|---|---|---|---|",
    ]
    for name, r in result["ratios"].items():
        low, high = r["per_rep_interval_ratio_range"]
        lines.append(
            f"| {name} | {fmt(r['interval_time'])} | {fmt(r['step_time'])} | {fmt(low)}-{fmt(high)} | "
            f"{fmt(r['peak_memory'])} |"
        )
    return [*lines, ""]
