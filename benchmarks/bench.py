"""What MODPO costs next to TRL's DPO, and what the score cache saves in a sweep.

    python benchmarks/bench.py --size {smoke,cpu,gpu} [--out benchmarks/results] [--parts step,sweep,scale]
                               [--threads N] [--checkpoint-dir DIR]

Sizes: ``smoke`` (the tiny models of ``modpo_trl.testing``, seconds; the test-suite runs it), ``cpu`` (a 7.4M
parameter Llama, seq 256, batch 4; a few minutes on 2 cores), ``gpu`` (``step`` and ``sweep`` on a 0.2B Llama at
seq 512, batch 8, bf16, plus the 7B ``scale`` part; needs CUDA and bitsandbytes, about 15 GB of disk for the
random 7B checkpoint, which is built once under ``--checkpoint-dir``; ``--parts`` splits a long run).

Parts, all measured in one process over the shared harness (``harness.py``: sizes, models and data, timing,
memory, the report), each in its own module:

* ``step`` (``step_cost.py``): per-step time and peak memory of (a) TRL's DPO, (b) MODPO with cached margins,
  (c) MODPO scoring inside every step, (d) MOC with the linear loss and (e) MOC with the MGDA solver.
* ``sweep`` (``sweep_cost.py``): a K-weighting sweep with the shared score cache against one without.
* ``scale`` (``gpu_scale.py``, ``--size gpu`` only): MODPO with QLoRA on a Llama-2-7B-shaped model: peak memory
  and step time up the batch sizes, and (a) against (b).

Results: ``<size>-<timestamp>.json``, ``<size>-latest.json`` and ``<size>-latest.md`` under ``--out``.
"""

from __future__ import annotations

import os

# Library progress bars (scoring, precompute) read this when tqdm is imported; the benchmark shows its own.
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers.utils import logging as transformers_logging

import gpu_scale
import harness
import step_cost
import sweep_cost
from harness import SIZES, Context
from modpo_trl.storage import default_cache_dir, write_atomic

PARTS = {"step": step_cost, "sweep": sweep_cost, "scale": gpu_scale}  # each: measure, markdown, TARGETS
TARGETS = {name: target for part in PARTS.values() for name, target in part.TARGETS.items()}


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
    # internal: one memory probe of the step part, in a fresh interpreter
    parser.add_argument("--probe", choices=step_cost.VARIANTS, help=argparse.SUPPRESS)
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
    if args.probe:  # a child of step_cost.probe_memory_isolated
        ctx = Context(spec, args.workdir)
        result = step_cost.probe_memory(ctx, args.probe)
        write_atomic(ctx.workdir / f"memory-{args.probe}.json", json.dumps(result))
        return result

    args.out.mkdir(parents=True, exist_ok=True)
    timestamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    started = time.perf_counter()
    report = {
        "size": spec.name,
        "timestamp": timestamp,
        "machine": harness.machine(),
        "versions": harness.versions(),
    }
    with tempfile.TemporaryDirectory(prefix="modpo-bench-") as workdir:
        ctx = Context(spec, Path(workdir))
        ctx.save_reward_model()
        results = {}
        if "step" in args.parts:
            results["step"] = step_cost.measure(ctx)
        if "sweep" in args.parts:
            results["sweep"] = sweep_cost.measure(ctx)
        if "scale" in args.parts:
            results["scale"] = gpu_scale.measure(ctx, args.checkpoint_dir)
    report.update(
        settings=harness.settings(ctx),
        methods=harness.methods(spec),
        results=results,
        wall_s=time.perf_counter() - started,
    )
    report["machine"]["load_average_at_end"] = harness.load_average()
    report["targets"] = targets(results)
    sections = [
        line for name, part in PARTS.items() if name in results for line in part.markdown(results[name])
    ]
    text = harness.markdown(report, sections)
    harness.write_report(args.out, report, text)
    print(text)
    return report


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """Every part's targets, with None values for the parts not run."""
    values = {}
    for name, part in PARTS.items():
        values.update(part.target_values(results.get(name, {})))
    return harness.check_targets(TARGETS, values)


if __name__ == "__main__":
    main()
