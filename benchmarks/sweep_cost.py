"""Part ``sweep``: what the shared score cache saves when K weightings are trained one after another.

K weightings trained with a shared score cache (``use_score_cache=True``, one fresh cache directory) and without
(every run rescoring margins and reference log-probs), cached and uncached runs alternating. Each run's wall time
is split into model building, trainer construction (= scoring: margin rewards, reference log-probs, plus TRL's
tokenisation) and training (one epoch). Uncached runs also turn ``datasets`` caching off, so that TRL's own
per-process cache of reference log-probs misses as it does when every run is a separate process. The cache can
only remove scoring, so with scoring ``S`` and the rest ``T`` of a run the ratio cannot go below
``(S + K T) / (K (S + T))``; the report gives that bound next to the ratio.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset
from tqdm.auto import tqdm

from harness import Context, Target, clocked, fmt, quiet, ratio, release_memory
from modpo_trl import MODPOConfig, MODPOTrainer

TARGETS = {"sweep_cached_vs_uncached": Target(0.6, "sweep wall time cached/uncached <= 0.6 at K=5")}

for _method in ("_with_margins", "_precompute_ref_logps"):  # the sweep's scoring clock hooks these two
    if not hasattr(MODPOTrainer, _method):
        raise ImportError(
            f"MODPOTrainer has no {_method}: update TimedMODPOTrainer in benchmarks/sweep_cost.py"
        )


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


def measure(ctx: Context) -> dict[str, Any]:
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


def target_values(result: dict[str, Any]) -> dict[str, float | None]:
    at_five = result.get("k") == 5
    return {"sweep_cached_vs_uncached": result.get("ratio_cached_uncached") if at_five else None}


def markdown(result: dict[str, Any]) -> list[str]:
    lines = [
        f"## Sweep cost (K={result['k']}, {result['pairs']} pairs, {result['epochs']} epoch per run)",
        "",
        "| | total s | model s | construction s | of which margins s | of which ref log-probs s | training s |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, t in result["totals"].items():
        lines.append(
            f"| {mode} | {fmt(t['total_s'], 1)} | {fmt(t['model_s'], 1)} | {fmt(t['construction_s'], 1)} | "
            f"{fmt(t['margins_s'], 1)} | {fmt(t['ref_logps_s'], 1)} | {fmt(t['training_s'], 1)} |"
        )
    scoring = "; ".join(
        f"{mode}: "
        + ", ".join(fmt(r["margins_s"] + r["ref_logps_s"], 2) for r in result["runs"] if r["cached"] == c)
        for mode, c in (("cached", True), ("uncached", False))
    )
    return [
        *lines,
        "",
        f"cached/uncached: total {fmt(result['ratio_cached_uncached'])}, construction "
        f"{fmt(result['ratio_construction'])}; scoring is {fmt(100 * result['scoring_share_of_uncached_run'], 0)}% "
        f"of an uncached run, so even free scoring after the first run bounds the ratio at "
        f"{fmt(result['ratio_bound_if_scoring_were_free'])}.",
        "",
        f"Scoring per run in sweep order (margins + reference log-probs, s): {scoring}. Cache entries after the "
        f"sweep: {result['cache_entries']} (scored once: {fmt(result['scored_once'])}, expected "
        f"{result['expected_cache_entries']}).",
        "",
    ]
