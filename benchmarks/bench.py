"""What MODPO costs next to TRL's DPO, and what the score cache saves in a sweep.

    python benchmarks/bench.py --size {smoke,cpu,gpu} [--out benchmarks/results] [--parts step,sweep,scale]
                               [--threads N] [--checkpoint-dir DIR]

Sizes: ``smoke`` (the tiny models of ``modpo_trl.testing``, seconds; the test-suite runs it), ``cpu`` (a 7.4M
parameter Llama, seq 256, batch 4; a few minutes on 2 cores), ``gpu`` (``step`` and ``sweep`` on a 0.2B Llama at
seq 512, batch 8, bf16, plus the 7B ``scale`` part; needs CUDA and bitsandbytes, about 15 GB of disk for the
random 7B checkpoint, which is built once under ``--checkpoint-dir``; ``--parts`` splits a long run).

Parts (all measured in one process, same model, data, batch and sequence length for every variant):

* ``step``: per-step cost of (a) TRL's ``DPOTrainer`` with ``precompute_ref_log_probs=True``, (b) ``MODPOTrainer``
  with two margin objectives (a reward model and a rule-based function) scored once before training and
  precomputed reference log-probs, (c) ``OnTheFlyMODPOTrainer`` (below): margins and reference log-probs computed
  inside every step, as the reference MODPO code does; and ``MOCTrainer`` on the same pairs split between two
  objectives, (d) with the linear combination of the losses and (e) with the min-norm (MGDA) solver: (e)/(d)
  is the solver's overhead. The variants run in round-robin repetitions (the order
  rotating every repetition) after a warm-up repetition each, so machine noise hits all of them alike.
* ``sweep``: K weightings trained with a shared score cache (``use_score_cache=True``, one fresh cache
  directory) and without (every run rescoring margins and reference log-probs), cached and uncached runs
  alternating. Each run's wall time is split into model building, trainer construction (= scoring: margin
  rewards, reference log-probs, plus TRL's tokenisation) and training (one epoch). Uncached runs also turn
  ``datasets`` caching off, so that TRL's own per-process cache of reference log-probs misses as it does when
  every run is a separate process. The cache can only remove scoring, so with scoring ``S`` and the rest ``T`` of
  a run the ratio cannot go below ``(S + K T) / (K (S + T))``; the report gives that bound next to the ratio.
* ``scale`` (``--size gpu`` only): a Llama-2-7B-shaped model with random weights, QLoRA (NF4, LoRA r=64 on
  q/k/v/o, gradient checkpointing) at sequence length 1024: MODPO's peak memory and step time at batch
  1, 2, 4, ... up to the first OOM or the first batch over 48 GiB, then (a) and (b) at one batch for the ratio.

Timing: a ``TrainerCallback`` stamps ``on_step_begin``/``on_step_end`` (after ``torch.cuda.synchronize`` on GPU).
``step_s`` is begin->end (forward, backward, optimizer); ``interval_s`` is end->end of consecutive steps and
also holds what the Trainer does between steps (fetching and collating the next batch, logging), so it is the
full cost of a step and the number the ratios use. The first step of every repetition is dropped.

Peak memory, every variant measured alone (so no variant's tensors count towards another's):
* GPU: ``torch.cuda.max_memory_allocated()`` over the training steps, the peak statistics reset (and nothing
  else allocated) right before them: weights, gradients, optimizer state, activations.
* CPU: the process's peak resident set (``VmHWM``) over the training steps, reset right before them through
  ``/proc/self/clear_refs`` after returning freed heap pages to the OS (``malloc_trim``), in a fresh
  subprocess per variant (``--size smoke``: in-process, to stay fast). ``ru_maxrss`` cannot be reset and would
  report trainer construction (scoring) instead. It counts everything resident: interpreter, libraries,
  weights, optimizer state, activations and the dataset.
"""

from __future__ import annotations

import os

# Library progress bars (scoring, precompute) read this when tqdm is imported; the benchmark shows its own.
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerBase,
    TrainerCallback,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils import logging as transformers_logging
from trl import DPOConfig, DPOTrainer

import modpo_trl
from modpo_trl import FunctionReward, MODPOConfig, MODPOTrainer, RewardModel
from modpo_trl.storage import default_cache_dir
from modpo_trl.testing import WORDS, tiny_causal_lm, tiny_reward_model, tiny_tokenizer
from modpo_trl.trainers.margins import CHOSEN_MARGINS, REJECTED_MARGINS
from modpo_trl.trainers.moc_config import MOCConfig
from modpo_trl.trainers.moc_trainer import MOCTrainer, objective_pairs

GIB = 2**30
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
STEP_WEIGHTS = [0.5, 0.25, 0.25]  # target, reward model, rule-based function
TARGETS = {  # name: (limit, description)
    "modpo_vs_dpo_step_time": (1.03, "(b)/(a) median s/step <= 1.03"),
    "modpo_vs_dpo_peak_memory": (1.02, "(b)/(a) peak memory <= 1.02"),
    "sweep_cached_vs_uncached": (0.6, "sweep wall time cached/uncached <= 0.6 at K=5"),
    "qlora_7b_peak_gib": (24.0, "7B QLoRA MODPO, seq 1024, batch 1: peak memory < 24 GiB"),
}
SCALE_STOP_GIB = 48.0
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# ------------------------------------------------------------------------------------------------ sizes
@dataclass(frozen=True)
class Dims:
    """Llama dimensions; the tokenizer's vocabulary is a prefix of `vocab` (the rest gives a realistic LM head)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class Spec:
    name: str
    dims: Dims | None  # None: the tiny models of modpo_trl.testing
    seq_len: int
    batch: int
    reps: int  # measured repetitions per variant (after one warm-up repetition)
    steps_per_rep: int  # the first one of each repetition is dropped
    sweep_k: int
    sweep_pairs: int  # one epoch over these per sweep run
    device: str = "cpu"
    bf16: bool = False
    isolate_memory: bool = True  # CPU: measure each variant's memory in a fresh subprocess
    threads: int | None = None  # torch CPU threads; None: torch's default
    scale: ScaleSpec | None = None


@dataclass(frozen=True)
class ScaleSpec:
    dims: Dims
    seq_len: int = 1024
    lora_r: int = 64
    lora_alpha: int = 16
    load_in_4bit: bool = True  # False only to exercise this part on a CPU (the test-suite)
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    steps: int = 4  # per batch size, the first one dropped
    ratio_batch: int = 4  # (a) vs (b) at this batch (or the largest that fits, if smaller)
    reps: int = 4
    steps_per_rep: int = 4


LLAMA2_7B = Dims(hidden=4096, layers=32, heads=32, intermediate=11008, vocab=32000)
SIZES = {
    "smoke": Spec(
        "smoke",
        None,
        seq_len=48,
        batch=2,
        reps=1,
        steps_per_rep=2,
        sweep_k=2,
        sweep_pairs=4,
        isolate_memory=False,
        threads=1,  # tiny ops on 2 threads stall whenever another process holds a core
    ),
    "cpu": Spec(
        "cpu",
        Dims(hidden=256, layers=4, heads=4, intermediate=688, vocab=8192),
        seq_len=256,
        batch=4,
        reps=7,
        steps_per_rep=4,
        sweep_k=5,
        sweep_pairs=16,
    ),
    "gpu": Spec(
        "gpu",
        Dims(hidden=1024, layers=12, heads=16, intermediate=2816, vocab=32000),
        seq_len=512,
        batch=8,
        reps=7,
        steps_per_rep=5,
        sweep_k=5,
        sweep_pairs=128,
        device="cuda",
        bf16=True,
        isolate_memory=False,  # CUDA statistics are exact per allocation; a subprocess would add nothing
        scale=ScaleSpec(LLAMA2_7B),
    ),
}
PARTS = ("step", "sweep", "scale")


# ------------------------------------------------------------------------------------------ data, models
def preference_rows(n: int, seq_len: int, seed: int = 0) -> list[dict[str, str]]:
    """Random pairs long enough that prompt + response fills `seq_len` tokens (one token per word)."""
    rng = random.Random(seed)
    quarter = seq_len // 4

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [
        {
            "prompt": words(rng.randint(quarter // 2, quarter)),
            "chosen": " " + words(rng.randint(seq_len - quarter, seq_len)),
            "rejected": " " + words(rng.randint(seq_len - quarter, seq_len)),
        }
        for _ in range(n)
    ]


# A tuple, not a frozenset: the function's fingerprint pickles this global, and frozenset order changes per process.
POLITE = ("please", "thanks", "kind", "help", "safe")


def politeness(prompts: list, responses: list) -> list[float]:
    """The rule-based margin objective: share of polite words in the response."""
    return [sum(w in POLITE for w in r.split()) / max(1, len(r.split())) for r in responses]


def llama_config(dims: Dims, tokenizer: PreTrainedTokenizerBase, seq_len: int, **kwargs) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=max(dims.vocab, len(tokenizer)),
        hidden_size=dims.hidden,
        intermediate_size=dims.intermediate,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.heads,
        max_position_embeddings=max(seq_len, 256),
        rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **kwargs,
    )


def n_params(dims: Dims) -> int:
    layer = 4 * dims.hidden**2 + 3 * dims.hidden * dims.intermediate + 2 * dims.hidden
    return dims.layers * layer + 2 * dims.vocab * dims.hidden + dims.hidden


@dataclass
class Context:
    """What every part shares: the spec, tokenizer, a scratch directory and the saved reward model."""

    spec: Spec
    workdir: Path
    tokenizer: PreTrainedTokenizerBase = field(default_factory=tiny_tokenizer)

    @property
    def reward_path(self) -> Path:
        return self.workdir / "reward_model"

    @property
    def score_cache(self) -> Path:
        """The `step` and `scale` parts' cache; the sweep uses a fresh one of its own."""
        return self.workdir / "score_cache"

    def policy(self, seed: int = 0):
        if self.spec.dims is None:
            return tiny_causal_lm(self.tokenizer, seed)
        torch.manual_seed(seed)
        return LlamaForCausalLM(llama_config(self.spec.dims, self.tokenizer, self.spec.seq_len))

    def save_reward_model(self) -> None:
        """The margin reward model (same size as the policy), saved so that scoring loads and releases it."""
        if self.spec.dims is None:
            model = tiny_reward_model(self.tokenizer, seed=1)
        else:
            torch.manual_seed(1)
            config = llama_config(self.spec.dims, self.tokenizer, self.spec.seq_len, num_labels=1)
            model = LlamaForSequenceClassification(config)
        model.save_pretrained(self.reward_path)
        self.tokenizer.save_pretrained(self.reward_path)

    def margin_sources(self) -> list:
        kwargs = {"dtype": torch.bfloat16} if self.spec.bf16 else {}
        reward = RewardModel(
            self.reward_path,
            tokenizer=self.tokenizer,
            max_length=self.spec.seq_len,
            batch_size=2 * self.spec.batch,
            name="reward_model",
            model_kwargs=kwargs,
        )
        return [reward, FunctionReward(politeness)]

    def rows(self, n: int) -> list[dict[str, str]]:
        return preference_rows(n, self.spec.seq_len)

    def args(self, cls=DPOConfig, **overrides) -> DPOConfig:
        spec = self.spec
        kwargs = dict(
            output_dir=str(self.workdir / "trainer"),
            per_device_train_batch_size=spec.batch,
            per_device_eval_batch_size=spec.batch,
            max_length=spec.seq_len,
            max_steps=spec.steps_per_rep,
            learning_rate=1e-5,
            logging_steps=1,  # every step pays for its metrics, so the median includes them
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            use_cpu=spec.device == "cpu",
            bf16=spec.bf16,
            activation_checkpointing=False,
            include_num_input_tokens_seen="non_padding",
            dataloader_num_workers=0,
            seed=0,
        )
        return cls(**{**kwargs, **overrides})


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


for _method in ("_with_margins", "_precompute_ref_logps"):  # the sweep's scoring clock hooks these two
    if not hasattr(MODPOTrainer, _method):
        raise ImportError(f"MODPOTrainer has no {_method}: update TimedMODPOTrainer in benchmarks/bench.py")


class TimedMODPOTrainer(MODPOTrainer):
    """`MODPOTrainer` that clocks its two scoring passes: margin rewards and reference log-probs."""

    def __init__(self, *args, **kwargs):
        self.clock = {"margins_s": 0.0, "ref_logps_s": 0.0}
        super().__init__(*args, **kwargs)

    def _with_margins(self, *args, **kwargs):
        with clocked(self.clock, "margins_s"):
            return super()._with_margins(*args, **kwargs)

    def _precompute_ref_logps(self, *args, **kwargs):
        with clocked(self.clock, "ref_logps_s"):
            return super()._precompute_ref_logps(*args, **kwargs)


def build_variant(ctx: Context, variant: str):
    """One of (a)-(e) on a fresh policy (same seed, so same weights) and the same data."""
    dataset = Dataset.from_list(ctx.rows(ctx.spec.batch * ctx.spec.steps_per_rep))
    model = ctx.policy()
    common = dict(train_dataset=dataset, processing_class=ctx.tokenizer)
    if variant == "dpo":
        return DPOTrainer(model, args=ctx.args(precompute_ref_log_probs=True), **common)
    modpo = dict(weights=STEP_WEIGHTS, use_score_cache=True, score_cache_dir=str(ctx.score_cache))
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


# ----------------------------------------------------------------------------------- timing and memory
@contextlib.contextmanager
def clocked(clock: dict[str, float], key: str) -> Iterator[None]:
    sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        sync()
        clock[key] += time.perf_counter() - start


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Per-step wall times and token counts of the steps of one `train()` call."""

    def __init__(self):
        self.step_s: list[float] = []
        self.interval_s: list[float] = []
        self.tokens: list[int] = []
        self._begin = self._last_end = None
        self._tokens_before = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.step_s, self.interval_s, self.tokens, self._last_end = [], [], [], None

    def on_step_begin(self, args, state, control, **kwargs):
        sync()
        self._begin, self._tokens_before = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        now = time.perf_counter()
        self.step_s.append(now - self._begin)
        self.tokens.append(int(state.num_input_tokens_seen - self._tokens_before))
        if self._last_end is not None:
            self.interval_s.append(now - self._last_end)
        self._last_end = now

    def measured(self) -> dict[str, list]:
        """This run's steps without its first (warm-up) step."""
        return {"step_s": self.step_s[1:], "interval_s": self.interval_s, "tokens": self.tokens[1:]}


def quiet(trainer):
    """Adds a `StepTimer` and drops the per-step printing."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    timer = StepTimer()
    trainer.add_callback(timer)
    return timer


def _status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


class PeakMemory:
    """Peak memory of a block: CUDA allocated bytes on GPU, resident set (VmHWM) on CPU (Linux)."""

    def __init__(self, device: str):
        self.device = device
        self.before = self.peak = None

    def __enter__(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        elif Path("/proc/self/clear_refs").exists():
            # Freed heap pages still resident would otherwise absorb new allocations unseen.
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
            self.before = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif self.before is not None:
            self.peak = _status_kib("VmHWM") * 1024
        return False

    def as_dict(self) -> dict[str, Any]:
        return {"peak_bytes": self.peak, "before_training_bytes": self.before}


def release_memory() -> None:
    """Collects what the caller has just dropped (trainers hold reference cycles) and empties the CUDA cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def probe_memory(ctx: Context, variant: str) -> dict[str, Any]:
    """Builds `variant` alone and measures the peak memory of its training steps."""
    trainer = build_variant(ctx, variant)
    quiet(trainer)
    with PeakMemory(ctx.spec.device) as memory:
        trainer.train()
    del trainer
    release_memory()
    return memory.as_dict()


def probe_memory_isolated(ctx: Context, variant: str) -> dict[str, Any]:
    """`probe_memory` in a fresh interpreter, so that no other variant's pages are resident."""
    out = ctx.workdir / f"memory-{variant}.json"
    flags = {
        "--size": ctx.spec.name,
        "--probe": variant,
        "--workdir": ctx.workdir,
        "--threads": torch.get_num_threads(),
    }
    cmd = [sys.executable, __file__, *(str(x) for flag in flags.items() for x in flag)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe of {variant} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def summarize(samples: dict[str, list]) -> dict[str, Any]:
    interval, step, tokens = samples["interval_s"], samples["step_s"], samples["tokens"]
    return {
        "median_interval_s": statistics.median(interval),
        "median_step_s": statistics.median(step),
        "iqr_interval_s": quartiles(interval),
        "tokens_per_step": statistics.median(tokens),
        "tokens_per_s": statistics.median(tokens) / statistics.median(interval),
        "measured_steps": len(interval),
    }


def quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# --------------------------------------------------------------------------------------------- part 1
def step_cost(ctx: Context) -> dict[str, Any]:
    spec = ctx.spec
    memory = {}
    for variant in tqdm(VARIANTS, desc="memory, one variant at a time", disable=False):
        probe = probe_memory_isolated if spec.isolate_memory else probe_memory
        memory[variant] = probe(ctx, variant)

    trainers = {v: build_variant(ctx, v) for v in VARIANTS}
    timers = {v: quiet(t) for v, t in trainers.items()}
    samples = {v: {"step_s": [], "interval_s": [], "tokens": []} for v in VARIANTS}
    per_rep = {v: [] for v in VARIANTS}
    with tqdm(total=(spec.reps + 1) * len(VARIANTS), desc="step cost, round-robin", disable=False) as bar:
        for rep in range(-1, spec.reps):  # rep -1 warms every variant up and is not recorded
            order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
            for variant in order:
                trainers[variant].train()
                if rep >= 0:
                    measured = timers[variant].measured()
                    for key, values in measured.items():
                        samples[variant][key] += values
                    per_rep[variant].append(statistics.median(measured["interval_s"]))
                bar.update()
    del trainers, timers
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
    return {"weights": STEP_WEIGHTS, "variants": results, "ratios": ratios}


# --------------------------------------------------------------------------------------------- part 2
@contextlib.contextmanager
def datasets_caching_disabled() -> Iterator[None]:
    """Random dataset fingerprints, so that TRL's own per-process cache of reference log-probs (keyed by the
    dataset fingerprint) misses too, as it does when every run of a sweep is a separate process."""
    enabled = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_caching()


def sweep_weightings(k: int) -> list[list[float]]:
    """`k` weightings from mostly-margin to pure target: w = [t, (1 - t) / 2, (1 - t) / 2]."""
    return [
        [t, round((1 - t) / 2, 9), round((1 - t) / 2, 9)] for t in (round((i + 1) / k, 9) for i in range(k))
    ]


def sweep_run(ctx: Context, weights: list[float], cached: bool, cache_dir: Path) -> dict[str, Any]:
    """One run of a sweep, from building the policy to the end of its epoch, timed part by part."""
    clock = {"model_s": 0.0, "construction_s": 0.0, "training_s": 0.0}
    with clocked(clock, "model_s"):
        model = ctx.policy()
    dataset = Dataset.from_list(ctx.rows(ctx.spec.sweep_pairs))  # as a fresh process would load it
    args = ctx.args(
        MODPOConfig,
        weights=weights,
        max_steps=-1,
        num_train_epochs=1,
        precompute_ref_log_probs=True,
        use_score_cache=cached,
        score_cache_dir=str(cache_dir),
    )
    with clocked(clock, "construction_s"), contextlib.ExitStack() as stack:
        if not cached:
            stack.enter_context(datasets_caching_disabled())
        trainer = TimedMODPOTrainer(
            model,
            args=args,
            train_dataset=dataset,
            processing_class=ctx.tokenizer,
            margin_rewards=ctx.margin_sources(),
        )
    quiet(trainer)
    with clocked(clock, "training_s"):
        trainer.train()
    result = {
        "weights": weights,
        "cached": cached,
        **clock,
        **trainer.clock,
        "steps": trainer.state.global_step,
    }
    result["total_s"] = clock["model_s"] + clock["construction_s"] + clock["training_s"]
    del trainer, model
    release_memory()
    return result


def sweep_cost(ctx: Context) -> dict[str, Any]:
    spec = ctx.spec
    cache_dir = ctx.workdir / "sweep_cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    runs = []
    weightings = sweep_weightings(spec.sweep_k)
    with tqdm(total=2 * len(weightings), desc="sweep, cached and uncached alternating", disable=False) as bar:
        for i, weights in enumerate(weightings):
            for cached in (True, False) if i % 2 == 0 else (False, True):
                runs.append(sweep_run(ctx, weights, cached, cache_dir))
                bar.update()
    # Scored once means one cache entry per cacheable margin source and one for the reference log-probs.
    entries = {kind: len(list((cache_dir / kind).glob("*.npz"))) for kind in ("margins", "ref_logps")}
    expected = {"margins": sum(source.cacheable for source in ctx.margin_sources()), "ref_logps": 1}
    keys = ("model_s", "construction_s", "margins_s", "ref_logps_s", "training_s", "total_s")
    totals = {
        mode: {key: sum(r[key] for r in runs if r["cached"] == (mode == "cached")) for key in keys}
        for mode in ("cached", "uncached")
    }
    uncached = [r for r in runs if not r["cached"]]
    scoring = statistics.mean(r["margins_s"] + r["ref_logps_s"] for r in uncached)
    rest = statistics.mean(r["total_s"] for r in uncached) - scoring
    k = len(weightings)
    return {
        "k": k,
        "weightings": weightings,
        "pairs": spec.sweep_pairs,
        "epochs": 1,
        "runs": runs,
        "totals": totals,
        "cache_entries": entries,
        "expected_cache_entries": expected,
        "scored_once": entries == expected,
        "ratio_cached_uncached": ratio(totals["cached"]["total_s"], totals["uncached"]["total_s"]),
        "ratio_construction": ratio(totals["cached"]["construction_s"], totals["uncached"]["construction_s"]),
        # Only scoring is saved, once per run after the first: the best ratio this sweep could reach.
        "scoring_share_of_uncached_run": scoring / (scoring + rest),
        "ratio_bound_if_scoring_were_free": (scoring + k * rest) / (k * (scoring + rest)),
    }


# --------------------------------------------------------------------------------------------- part 3
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


def scale_trainer(ctx: Context, checkpoint: Path, variant: str, batch: int, steps: int):
    """(a) or (b) with LoRA on the checkpoint, loaded (4-bit) through modpo_trl's own `load_policy`."""
    from modpo_trl.runs.models import load_policy, lora_config
    from modpo_trl.runs.recipe import LoraSettings, ModelConfig, Recipe

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
    args = ctx.args(MODPOConfig, weights=STEP_WEIGHTS, score_cache_dir=str(ctx.score_cache), **overrides)
    return MODPOTrainer(model, args=args, margin_rewards=margins, **common)


def response_length(prompts: list, responses: list) -> list[float]:
    return [len(r.split()) / 100 for r in responses]


def scale_point(ctx: Context, checkpoint: Path, variant: str, batch: int) -> dict[str, Any]:
    """One variant alone at one batch size: peak memory and step time, or the OOM."""
    oom = trainer = None
    try:
        trainer = scale_trainer(ctx, checkpoint, variant, batch, ctx.spec.scale.steps)
        timer = quiet(trainer)
        with PeakMemory(ctx.spec.device) as memory:
            trainer.train()
    except torch.cuda.OutOfMemoryError as e:  # leaving this block drops the traceback and its frames' tensors
        oom = str(e).splitlines()[0]
    del trainer
    release_memory()
    if oom is not None:
        return {"batch": batch, "oom": True, "error": oom}
    return {"batch": batch, "oom": False, **memory.as_dict(), **summarize(timer.measured())}


def scale_cost(ctx: Context, checkpoint_dir: Path) -> dict[str, Any]:
    scale = ctx.spec.scale
    name = "llama-{hidden}x{layers}-random".format(**asdict(scale.dims))
    checkpoint = ensure_random_checkpoint(checkpoint_dir / name, scale.dims, ctx.tokenizer, ctx.spec.device)
    ladder = []
    for batch in tqdm(scale.batches, desc="QLoRA MODPO, batch ladder", disable=False):
        ladder.append(scale_point(ctx, checkpoint, "modpo", batch))
        if ladder[-1]["oom"] or ladder[-1]["peak_bytes"] > SCALE_STOP_GIB * GIB:
            break
    fits = [p["batch"] for p in ladder if not p["oom"] and p["peak_bytes"] <= SCALE_STOP_GIB * GIB]
    limit = TARGETS["qlora_7b_peak_gib"][0] * GIB
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
        result["comparison"] = {"batch": batch, **compare_scale(ctx, checkpoint, batch)}
        result["comparison"]["memory"] = {"dpo": dpo_alone, "modpo": modpo_alone}
        result["comparison"]["ratios"]["peak_memory"] = ratio(
            modpo_alone.get("peak_bytes"), dpo_alone.get("peak_bytes")
        )
    return result


def compare_scale(ctx: Context, checkpoint: Path, batch: int) -> dict[str, Any]:
    """(a) and (b) at scale, both loaded, in alternating repetitions like the `step` part."""
    scale = ctx.spec.scale
    samples = {v: {"step_s": [], "interval_s": [], "tokens": []} for v in ("dpo", "modpo")}
    trainers = timers = None
    try:
        trainers = {v: scale_trainer(ctx, checkpoint, v, batch, scale.steps_per_rep) for v in samples}
        timers = {v: quiet(t) for v, t in trainers.items()}
        for rep in tqdm(range(-1, scale.reps), desc="QLoRA (a) vs (b)", disable=False):
            for variant in ("dpo", "modpo") if rep % 2 == 0 else ("modpo", "dpo"):
                trainers[variant].train()
                if rep >= 0:
                    for key, values in timers[variant].measured().items():
                        samples[variant][key] += values
        error = None
    except torch.cuda.OutOfMemoryError as e:  # two models loaded at once may not fit where one did
        error = str(e).splitlines()[0]
    del trainers, timers
    release_memory()
    if error is not None:
        return {"error": f"both variants loaded at batch {batch}: {error}", "ratios": {}}
    results = {v: summarize(s) for v, s in samples.items()}
    ratios = {
        "interval_time": ratio(results["modpo"]["median_interval_s"], results["dpo"]["median_interval_s"]),
        "step_time": ratio(results["modpo"]["median_step_s"], results["dpo"]["median_step_s"]),
    }
    return {"variants": results, "ratios": ratios}


# ------------------------------------------------------------------------------------------------ report
def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    model = platform.processor()
    if cpuinfo.exists():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        model = found.group(1) if found else model
    info = {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": None,
        "load_average_at_start": load_average(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name} ({props.total_memory / GIB:.0f} GiB)"
    return info


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other jobs on the machine show up here."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def versions() -> dict[str, str | None]:
    import peft
    import transformers
    import trl

    found = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "datasets": datasets.__version__,
        "modpo_trl": modpo_trl.__version__,
        "bitsandbytes": None,
    }
    with contextlib.suppress(Exception):
        import bitsandbytes

        found["bitsandbytes"] = bitsandbytes.__version__
    return found


def targets(results: dict[str, Any]) -> dict[str, Any]:
    step = results.get("step", {}).get("ratios", {}).get("modpo/dpo", {})
    sweep = results.get("sweep", {})
    scale = results.get("scale", {})
    full_size = (
        scale.get("dims") == asdict(LLAMA2_7B) and scale.get("load_in_4bit") and scale.get("seq_len") == 1024
    )
    batch_one = next((p for p in scale.get("ladder", []) if p["batch"] == 1), None) if full_size else None
    values = {
        "modpo_vs_dpo_step_time": step.get("interval_time"),
        "modpo_vs_dpo_peak_memory": step.get("peak_memory"),
        "sweep_cached_vs_uncached": sweep.get("ratio_cached_uncached") if sweep.get("k") == 5 else None,
        "qlora_7b_peak_gib": None if not batch_one or batch_one["oom"] else batch_one["peak_bytes"] / GIB,
    }
    out = {}
    for name, (limit, description) in TARGETS.items():
        value = values[name]
        met = None if value is None else (value < limit if name == "qlora_7b_peak_gib" else value <= limit)
        out[name] = {"value": value, "limit": limit, "met": met, "target": description}
    return out


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: dict[str, Any]) -> str:
    settings, results = report["settings"], report["results"]
    lines = [
        f"# modpo_trl benchmark: `--size {report['size']}` ({report['timestamp']})",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores ({settings.get('threads')} torch "
        f"threads), GPU: {report['machine']['gpu']}, load average {report['machine'].get('load_average_at_start')} "
        f"at start, {report['machine'].get('load_average_at_end')} at end. "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
        "",
        f"Settings: {json.dumps({k: v for k, v in settings.items() if k != 'scale'})}",
        "",
        f"Memory: {report['methods']['memory']}",
        "",
    ]
    if "step" in results:
        step = results["step"]
        lines += [
            "## Per-step cost",
            "",
            "| variant | s/step (full) | s/step (fwd+bwd+opt) | IQR s/step (full) | tokens/s | peak memory (MiB) |",
            "|---|---|---|---|---|---|",
        ]
        for variant, r in step["variants"].items():
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
        for name, r in step["ratios"].items():
            low, high = r["per_rep_interval_ratio_range"]
            lines.append(
                f"| {name} | {fmt(r['interval_time'])} | {fmt(r['step_time'])} | {fmt(low)}-{fmt(high)} | "
                f"{fmt(r['peak_memory'])} |"
            )
        lines.append("")
    if "sweep" in results:
        sweep = results["sweep"]
        lines += [
            f"## Sweep cost (K={sweep['k']}, {sweep['pairs']} pairs, {sweep['epochs']} epoch per run)",
            "",
            "| | total s | model s | construction s | of which margins s | of which ref log-probs s | training s |",
            "|---|---|---|---|---|---|---|",
        ]
        for mode, t in sweep["totals"].items():
            lines.append(
                f"| {mode} | {fmt(t['total_s'], 1)} | {fmt(t['model_s'], 1)} | {fmt(t['construction_s'], 1)} | "
                f"{fmt(t['margins_s'], 1)} | {fmt(t['ref_logps_s'], 1)} | {fmt(t['training_s'], 1)} |"
            )
        lines += [
            "",
            f"cached/uncached: total {fmt(sweep['ratio_cached_uncached'])}, construction "
            f"{fmt(sweep['ratio_construction'])}; scoring is {fmt(100 * sweep['scoring_share_of_uncached_run'], 0)}% "
            f"of an uncached run, so even free scoring after the first run bounds the ratio at "
            f"{fmt(sweep['ratio_bound_if_scoring_were_free'])}.",
            "",
            "Scoring per run in sweep order (margins + reference log-probs, s): "
            + "; ".join(
                f"{mode}: "
                + ", ".join(
                    fmt(r["margins_s"] + r["ref_logps_s"], 2) for r in sweep["runs"] if r["cached"] == c
                )
                for mode, c in (("cached", True), ("uncached", False))
            )
            + f". Cache entries after the sweep: {sweep['cache_entries']} (scored once: "
            f"{fmt(sweep['scored_once'])}, expected {sweep['expected_cache_entries']}).",
            "",
        ]
    if "scale" in results:
        scale = results["scale"]
        lines += [
            f"## {'QLoRA (NF4)' if scale['load_in_4bit'] else 'LoRA'} MODPO on a random Llama of "
            f"{scale['params'] / 1e9:.2f}B parameters, seq {scale['seq_len']}",
            "",
            "| batch | peak GiB | s/step | tokens/s |",
            "|---|---|---|---|",
        ]
        for p in scale["ladder"]:
            if p["oom"]:
                lines.append(f"| {p['batch']} | OOM | | |")
            else:
                lines.append(
                    f"| {p['batch']} | {fmt(p['peak_bytes'] / GIB, 2)} | {fmt(p['median_interval_s'])} | "
                    f"{fmt(p['tokens_per_s'], 0)} |"
                )
        lines += [
            "",
            f"Largest batch under 48 GiB: {scale['largest_batch_under_48gib']}; under 24 GiB: "
            f"{scale['largest_batch_under_24gib']}.",
        ]
        if "comparison" in scale:
            c = scale["comparison"]
            lines.append(
                f"(b)/(a) at batch {c['batch']}: s/step {fmt(c['ratios'].get('interval_time'))}, "
                f"peak memory {fmt(c['ratios'].get('peak_memory'))}. {c.get('error', '')}"
            )
        lines.append("")
    lines += ["## Targets", "", "| target | value | met |", "|---|---|---|"]
    for t in report["targets"].values():
        lines.append(f"| {t['target']} | {fmt(t['value'])} | {fmt(t['met'])} |")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; results are for everyone to read
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--parts", default=None, help=f"comma-separated subset of {list(PARTS)} (default: all)"
    )
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=default_cache_dir() / "bench",
        help="where --size gpu keeps its random 7B bf16 checkpoint (~14 GB, made once; default: "
        "$MODPO_TRL_CACHE/bench, else ~/.cache/modpo_trl/bench)",
    )
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: the size's setting, else torch's)"
    )
    parser.add_argument("--probe", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one memory probe
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    spec = SIZES[args.size]
    valid = [p for p in PARTS if p != "scale" or spec.scale is not None]
    args.parts = valid if args.parts is None else [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in args.parts if p not in valid]
    if bad or not args.parts:
        parser.error(f"--parts {bad or args.parts} is not valid for --size {args.size}; valid: {valid}")
    if spec.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--size {args.size} needs a CUDA GPU (4-bit QLoRA through bitsandbytes) and torch.cuda.is_available() "
            "is False here; run --size cpu on this machine"
        )
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or SIZES[args.size].threads or threads)
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    try:
        return run(args)
    finally:  # main() may run inside another program (the test-suite)
        torch.set_num_threads(threads)
        transformers_logging.enable_progress_bar()
        datasets.enable_progress_bars()


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = SIZES[args.size]
    if args.probe:  # a child of probe_memory_isolated
        ctx = Context(spec, args.workdir)
        result = probe_memory(ctx, args.probe)
        write_atomic(ctx.workdir / f"memory-{args.probe}.json", json.dumps(result))
        return result

    args.out.mkdir(parents=True, exist_ok=True)
    timestamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    started = time.perf_counter()
    report = {"size": spec.name, "timestamp": timestamp, "machine": machine(), "versions": versions()}
    with tempfile.TemporaryDirectory(prefix="modpo-bench-") as workdir:
        ctx = Context(spec, Path(workdir))
        ctx.save_reward_model()
        results = {}
        if "step" in args.parts:
            results["step"] = step_cost(ctx)
        if "sweep" in args.parts:
            results["sweep"] = sweep_cost(ctx)
        if "scale" in args.parts:
            results["scale"] = scale_cost(ctx, args.checkpoint_dir)
    settings = {k: v for k, v in asdict(spec).items() if k not in ("name", "isolate_memory")}
    settings["threads"] = torch.get_num_threads()
    settings["params"] = (
        n_params(spec.dims) if spec.dims else sum(p.numel() for p in ctx.policy().parameters())
    )
    settings["reward_model"] = "same dims as the policy (a LlamaForSequenceClassification), loaded from disk"
    settings["margin_objectives"] = ["reward_model", "politeness (rule-based function)"]
    report.update(
        settings=settings,
        methods={
            "timing": "TrainerCallback on_step_begin/on_step_end (cuda synchronize); 'full' = step end to step end, "
            "incl. batch fetch/collation and logging; first step of each repetition and a warm-up repetition dropped",
            "memory": (
                "CUDA max_memory_allocated over the training steps, each variant alone"
                if spec.device == "cuda"
                else "peak RSS (VmHWM, reset via /proc/self/clear_refs after malloc_trim) over the training steps, "
                + (
                    "each variant in a fresh subprocess"
                    if spec.isolate_memory
                    else "each variant alone, in-process"
                )
            ),
        },
        results=results,
        wall_s=time.perf_counter() - started,
    )
    report["machine"]["load_average_at_end"] = load_average()
    report["targets"] = targets(results)
    text = json.dumps(report, indent=2, default=str)
    write_atomic(args.out / f"{spec.name}-{timestamp}.json", text)
    write_atomic(args.out / f"{spec.name}-latest.json", text)
    write_atomic(args.out / f"{spec.name}-latest.md", markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
