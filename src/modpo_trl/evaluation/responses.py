"""Every candidate's responses to the evaluation prompts and their scores, cached per candidate.

One cache file per candidate in `<run dir>/eval/candidates/`, keyed by fingerprints of the adapter(s), soup
coefficients or MOD mixing rule and weights, base model, prompts as the model sees them, sampling settings and
backend; scores are kept per scorer with the scorer's
fingerprint. A re-run only generates or scores what changed.
"""

from __future__ import annotations

import gc
import json
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..generation import SamplingSettings, as_response
from ..rewards.cache import fingerprint, path_fingerprint
from ..rewards.sources import check_scores
from ..runs.method import Candidate
from ..runs.recipe import Recipe
from ..serving import mod
from ..serving.generators import TransformersGenerator, VLLMGenerator, lora_rank
from ..storage import write_atomic


def generation_fingerprint(
    recipe: Recipe, candidate: Candidate, prompts: list, settings: SamplingSettings, backend: str
) -> str:
    """Changes whenever the responses could: the base model and tokenizer (by content, or resolved hub
    commit) and every `model:` setting (dtype, attention, quantisation), adapter files, soup coefficients, MOD
    mixing rule and weights, prompts as the model sees them, sampling settings, backend."""
    model = recipe.model
    # Only when set, so that other candidates keep the fingerprints (and caches) they had before the field existed.
    gates = [candidate.adapter_preference] if candidate.adapter_preference is not None else []
    return fingerprint(
        "generation",
        path_fingerprint(model.path),
        path_fingerprint(model.tokenizer) if model.tokenizer else None,
        {k: v for k, v in asdict(model).items() if k not in ("path", "tokenizer")},
        asdict(settings),
        backend,
        prompts,
        [path_fingerprint(p) for p in candidate.adapters()],
        [c for _, c in candidate.soup] if candidate.soup else None,
        {"rule": mod.RULE, "weights": [w for _, w in candidate.mixture]} if candidate.mixture else None,
        *gates,
    )


def _make_generator(recipe: Recipe, settings: SamplingSettings, backend: str, candidates: list[Candidate]):
    if backend == "transformers":
        return TransformersGenerator(recipe, settings)
    ranks = [
        sum(lora_rank(p) for p in c.adapters()) if c.soup else max(lora_rank(p) for p in c.adapters())
        for c in candidates
        if c.adapters()
    ]
    return VLLMGenerator(recipe, settings, max_lora_rank=max(ranks, default=8))


def generate_all(recipe, todo, model_prompts, settings, backend, entries) -> None:
    """Generates for `todo` with one base model, unloading each adapter after the last candidate using it."""
    if not todo:
        return
    uses = Counter(p for c in todo for p in c.adapters())
    generator = _make_generator(recipe, settings, backend, todo)
    try:
        for candidate in todo:
            entry = entries[candidate.key]
            try:
                entry["responses"] = generator.generate(
                    model_prompts[candidate.key],
                    adapter=candidate.adapter,
                    soup=candidate.soup,
                    mixture=candidate.mixture,
                    desc=f"Generating {candidate.key}",
                    preference=candidate.adapter_preference,
                )
                entry["scores"], entry["error"] = {}, None
            except (OSError, ValueError) as e:  # an adapter that cannot load, a prompt the template rejects
                entry["responses"], entry["error"] = None, f"generation failed: {e}"
            for path in candidate.adapters():
                uses[path] -= 1
                if uses[path] == 0:
                    generator.release(path)
            if entry["responses"] is not None:
                _save_entry(entry)
    finally:
        del generator
        gc.collect()
        _empty_cuda_cache()


def _empty_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _score(source, prompts: list, responses: list, batch_size: int) -> list[float]:
    values = []
    for start in range(0, len(prompts), batch_size):
        batch = source.score(prompts[start : start + batch_size], responses[start : start + batch_size])
        values += check_scores(
            source.name, batch, expected=len(prompts[start : start + batch_size]), offset=start
        ).tolist()
    return values


def score_all(sources, prompts: list, entries: dict[str, dict], batch_size: int) -> None:
    """Scores every candidate's responses with every objective whose cached scores are missing or stale."""
    fingerprints = [s.fingerprint() for s in sources]
    for entry in tqdm(list(entries.values()), desc="Scoring", leave=False):
        if entry["responses"] is None:
            continue
        responses = [as_response(p, r) for p, r in zip(prompts, entry["responses"], strict=True)]
        errors, changed = [], False
        for source, fp in zip(sources, fingerprints, strict=True):
            cached = entry["scores"].get(source.name)
            if cached and cached["fingerprint"] == fp:
                continue
            entry["scores"].pop(source.name, None)
            try:
                values = _score(source, prompts, responses, batch_size)
            except Exception as e:  # a scorer is user code: record its failure for this candidate, go on
                errors.append(f"scorer '{source.name}' failed: {type(e).__name__}: {e}")
                continue
            entry["scores"][source.name] = {"fingerprint": fp, "values": values}
            changed = True
        entry["error"] = "; ".join(errors) or None
        if changed:
            _save_entry(entry)
    for source in sources:
        source.release()


def _save_entry(entry: dict[str, Any]) -> None:
    keep = ("candidate", "fingerprint", "responses", "scores")
    write_atomic(entry["cache_path"], json.dumps({k: entry[k] for k in keep}, indent=1) + "\n")


def _load_entry(path: Path, fp: str, force: bool) -> dict[str, Any] | None:
    if force or not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # an unreadable cache file is regenerated
    return cached if cached.get("fingerprint") == fp and cached.get("responses") is not None else None


def cache_entry(candidate: Candidate, fp: str, eval_dir: Path, run_dir: Path, force: bool) -> dict[str, Any]:
    """A candidate's responses and scores: from its cache file when that matches `fp`, else empty."""
    name = re.sub(r"[^\w.+-]+", "_", candidate.key)  # labels may hold spaces or brackets
    path = eval_dir / "candidates" / f"{name}.json"
    cached = _load_entry(path, fp, force)
    return {
        "candidate": candidate.describe(run_dir),
        "fingerprint": fp,
        "responses": cached["responses"] if cached else None,
        "scores": cached.get("scores", {}) if cached else {},
        "error": None,
        "cached": cached is not None,
        "cache_path": path,
    }
