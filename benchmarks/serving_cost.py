"""Part ``serve``: what answering at a preference costs, MOD decoding with K adapters against one adapter, and
building a Rewarded Soup.

On the size's policy with K LoRA adapters (r=8 on q/k/v/o, as the quickstart's), a batch of ``batch`` prompts of
``seq_len / 4`` random tokens decodes ``new_tokens`` tokens greedily (end-of-sequence off, so every variant
decodes the same number): (a) one adapter through ``model.generate``, (b) MOD (``modpo_trl.serving.mod``) with
K = 1, 2, 3 adapters, all in one batched forward per token. Each variant also decodes one token (the prefill);
the per-token cost is ``(time(new_tokens) - time(1)) / (new_tokens - 1)``, the median over round-robin
repetitions (the order rotating every repetition, after a warm-up). A soup's construction is the time of
``add_weighted_adapter(combination_type="cat")`` over 2 adapters plus switching to eval mode and deleting it
again, as ``TransformersGenerator`` builds one; it is also given in per-token decoding times of (a).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import GenerationConfig

from harness import Context, Target, fmt, ratio, sync
from modpo_trl.generation import hf_generate
from modpo_trl.serving.mod import MODDecoder

TARGETS = {"mod_k2_vs_one_adapter_per_token": Target(1.5, "MOD K=2 / one adapter, s per token <= 1.5")}
KS = (1, 2, 3)
NEW_TOKENS = {"smoke": 4}  # other sizes: 32


def lora_model(ctx: Context, k: int):
    """The size's policy with `k` random LoRA adapters `a0..a{k-1}`, in eval mode."""
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(ctx.policy(), config, adapter_name="a0")
    for i in range(1, k):
        model.add_adapter(f"a{i}", config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; a trained adapter's is not
                param.normal_(0.0, 0.02)
    return model.to(ctx.spec.device).eval()


def timed(fn: Callable[[], Any]) -> float:
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        fn()
    sync()
    return time.perf_counter() - start


def measure(ctx: Context) -> dict[str, Any]:
    spec = ctx.spec
    new_tokens = NEW_TOKENS.get(spec.name, 32)
    model = lora_model(ctx, max(KS))
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (spec.batch, spec.seq_len // 4), generator=generator).to(spec.device)
    mask = torch.ones_like(ids)
    pad = ctx.tokenizer.pad_token_id

    def config(n: int) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=pad, eos_token_id=None)

    def one_adapter(n: int) -> Callable[[], Any]:
        model.set_adapter("a0")
        return lambda: hf_generate(model, ids, mask, config(n))

    def mod(k: int, n: int) -> Callable[[], Any]:
        decoder = MODDecoder([f"a{i}" for i in range(k)], [1 / k] * k)
        return lambda: decoder(model, ids, mask, config(n))

    variants = {"one_adapter": one_adapter, **{f"mod_k{k}": (lambda n, k=k: mod(k, n)) for k in KS}}
    times = {name: {"full": [], "prefill": []} for name in variants}
    names = list(variants)
    with tqdm(total=(spec.reps + 1) * len(names), desc="serve: decoding", disable=False) as bar:
        for rep in range(-1, spec.reps):  # rep -1 warms every variant up
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                full, prefill = timed(variants[name](new_tokens)), timed(variants[name](1))
                if rep >= 0:
                    times[name]["full"].append(full)
                    times[name]["prefill"].append(prefill)
                bar.update()
    per_token = {
        name: statistics.median(
            (f - p) / (new_tokens - 1) for f, p in zip(t["full"], t["prefill"], strict=True)
        )
        for name, t in times.items()
    }
    soup_s = soup_construction(model, spec.reps)
    result = {
        "batch": spec.batch,
        "prompt_tokens": ids.shape[1],
        "new_tokens": new_tokens,
        "lora": "r=8, alpha=16, q/k/v/o",
        "reps": spec.reps,
        "per_token_s": per_token,
        "prefill_s": {name: statistics.median(t["prefill"]) for name, t in times.items()},
        "ratios": {
            f"mod_k{k}/one_adapter": ratio(per_token[f"mod_k{k}"], per_token["one_adapter"]) for k in KS
        },
        "soup_construction_s": soup_s,
        "soup_construction_in_tokens": ratio(soup_s, per_token["one_adapter"]),
    }
    return result


def soup_construction(model, reps: int) -> float:
    """Median seconds to build (and drop) the soup of adapters a0 and a1, as `TransformersGenerator` builds one."""
    samples = []
    for rep in range(reps + 1):
        start = time.perf_counter()
        model.add_weighted_adapter(["a0", "a1"], [0.5, 0.5], "soup", combination_type="cat")
        model.eval()
        sync()
        if rep:  # the first one warms up
            samples.append(time.perf_counter() - start)
        model.delete_adapter("soup")
    return statistics.median(samples)


def target_values(result: dict[str, Any]) -> dict[str, float | None]:
    return {"mod_k2_vs_one_adapter_per_token": result.get("ratios", {}).get("mod_k2/one_adapter")}


def markdown(result: dict[str, Any]) -> list[str]:
    per_token, prefill = result["per_token_s"], result["prefill_s"]
    lines = [
        f"## Serving cost (batch {result['batch']}, {result['prompt_tokens']} prompt tokens, "
        f"{result['new_tokens']} new tokens, LoRA {result['lora']})",
        "",
        "| variant | s/token (decode) | relative to one adapter | prefill s |",
        "|---|---|---|---|",
    ]
    for name in per_token:
        relative = ratio(per_token[name], per_token["one_adapter"])
        lines.append(f"| {name} | {fmt(per_token[name], 4)} | {fmt(relative)} | {fmt(prefill[name], 4)} |")
    return [
        *lines,
        "",
        f"Rewarded Soup of 2 adapters: built in {fmt(result['soup_construction_s'], 4)} s, the time of "
        f"{fmt(result['soup_construction_in_tokens'], 1)} decoded tokens with one adapter.",
        "",
    ]
