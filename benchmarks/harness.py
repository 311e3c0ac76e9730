"""What every part of the benchmark shares: sizes, models and data, timing, memory, summaries and the report.

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

import contextlib
import ctypes
import gc
import json
import os
import platform
import random
import re
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import peft
import torch
import transformers
import trl
from tqdm.auto import tqdm
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import DPOConfig

import modpo_trl
from modpo_trl import FunctionReward, RewardModel
from modpo_trl.storage import write_atomic
from modpo_trl.testing import WORDS, tiny_causal_lm, tiny_reward_model, tiny_tokenizer

GIB = 2**30
WEIGHTS = [0.5, 0.25, 0.25]  # MODPO in the step and scale parts: the target, then the two margin objectives


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


# ------------------------------------------------------------------------------------------------ timing
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


def quiet(trainer: Trainer) -> StepTimer:
    """Adds a `StepTimer` and drops the per-step printing."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    timer = StepTimer()
    trainer.add_callback(timer)
    return timer


def round_robin(
    trainers: dict[str, Trainer], reps: int, desc: str
) -> tuple[dict[str, dict[str, list]], dict[str, list[float]]]:
    """Trains every trainer once per repetition, the order rotating every repetition, after one warm-up
    repetition that is not recorded, so that machine noise hits all of them alike.

    Returns each trainer's measured steps (see `StepTimer.measured`) and its median interval per repetition.
    """
    names = list(trainers)
    timers = {name: quiet(trainer) for name, trainer in trainers.items()}
    samples = {name: {"step_s": [], "interval_s": [], "tokens": []} for name in names}
    per_rep = {name: [] for name in names}
    with tqdm(total=(reps + 1) * len(names), desc=desc, disable=False) as bar:
        for rep in range(-1, reps):  # rep -1 warms every trainer up
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                trainers[name].train()
                if rep >= 0:
                    measured = timers[name].measured()
                    for key, values in measured.items():
                        samples[name][key] += values
                    per_rep[name].append(statistics.median(measured["interval_s"]))
                bar.update()
    return samples, per_rep


# ------------------------------------------------------------------------------------------------ memory
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


def train_alone(build: Callable[[], Trainer], device: str) -> tuple[dict[str, Any], dict[str, list]]:
    """Builds one trainer, trains it with nothing else loaded and drops it: the peak memory of its training
    steps (`PeakMemory.as_dict`) and its measured steps (`StepTimer.measured`)."""
    trainer = build()
    timer = quiet(trainer)
    with PeakMemory(device) as memory:
        trainer.train()
    del trainer
    release_memory()
    return memory.as_dict(), timer.measured()


# --------------------------------------------------------------------------------------------- summaries
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


@dataclass(frozen=True)
class Target:
    limit: float
    description: str
    strict: bool = False  # value < limit instead of value <= limit


def check_targets(targets: dict[str, Target], values: dict[str, float | None]) -> dict[str, Any]:
    """Each target with its measured value (None: not measured at this size or with these parts)."""
    out = {}
    for name, target in targets.items():
        value = values[name]
        met = None if value is None else (value < target.limit if target.strict else value <= target.limit)
        out[name] = {"value": value, "limit": target.limit, "met": met, "target": target.description}
    return out


# ---------------------------------------------------------------------------------- machine and settings
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
    found = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "datasets": datasets.__version__,
        "modpo_trl": modpo_trl.__version__,
        "bitsandbytes": None,
    }
    with contextlib.suppress(Exception):  # optional: only the GPU sizes quantise
        import bitsandbytes

        found["bitsandbytes"] = bitsandbytes.__version__
    return found


def settings(ctx: Context) -> dict[str, Any]:
    spec = ctx.spec
    out = {k: v for k, v in asdict(spec).items() if k not in ("name", "isolate_memory")}
    out["threads"] = torch.get_num_threads()
    out["params"] = n_params(spec.dims) if spec.dims else sum(p.numel() for p in ctx.policy().parameters())
    out["reward_model"] = "same dims as the policy (a LlamaForSequenceClassification), loaded from disk"
    out["margin_objectives"] = ["reward_model", "politeness (rule-based function)"]
    return out


def methods(spec: Spec) -> dict[str, str]:
    return {
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
    }


# ------------------------------------------------------------------------------------------------ report
def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: dict[str, Any], sections: list[str]) -> str:
    """The report as markdown: machine and settings, the parts' `sections` (lines), then the targets."""
    settings, machine = report["settings"], report["machine"]
    lines = [
        f"# modpo_trl benchmark: `--size {report['size']}` ({report['timestamp']})",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({settings.get('threads')} torch "
        f"threads), GPU: {machine['gpu']}, load average {machine.get('load_average_at_start')} "
        f"at start, {machine.get('load_average_at_end')} at end. "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
        "",
        f"Settings: {json.dumps({k: v for k, v in settings.items() if k != 'scale'})}",
        "",
        f"Memory: {report['methods']['memory']}",
        "",
        *sections,
        "## Targets",
        "",
        "| target | value | met |",
        "|---|---|---|",
    ]
    for t in report["targets"].values():
        lines.append(f"| {t['target']} | {fmt(t['value'])} | {fmt(t['met'])} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict[str, Any], text: str) -> None:
    """`<size>-<timestamp>.json`, `<size>-latest.json` and the markdown `text` as `<size>-latest.md`."""
    data = json.dumps(report, indent=2, default=str)
    write_atomic(out / f"{report['size']}-{report['timestamp']}.json", data)
    write_atomic(out / f"{report['size']}-latest.json", data)
    write_atomic(out / f"{report['size']}-latest.md", text)
