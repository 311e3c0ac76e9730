"""Command line: answer prompts with a trained run at a preference w (`modpo_trl.serving.front.ParetoSet`).

    python -m modpo_trl.generate <run dir | recipe.yaml> --weights 0.3,0.7 [--strategy mod] "prompt" ...
    python -m modpo_trl.generate <run dir> --input requests.jsonl [--output answers.jsonl] [--weights ...]

In the JSONL mode every line is an object with a `prompt` (text or a list of chat messages) and optionally its
own `weights` and `strategy` (default: the command line's); each output line is the input line with
`response`, `weights`, `strategy` and `served_by` (the adapter, soup or mixture that answered). Every request is
checked before the model is loaded; a bad one is an error (exit status 2) naming it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .runs.recipe import RecipeError, is_user_error
from .serving.front import STRATEGIES, ParetoSet
from .storage import write_atomic

PROG = "modpo_trl.generate"


class UsageError(ValueError):
    """A request this command refuses (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description="Answer prompts with a trained run (MODPO sweep, MOC or DPA run) at a preference w.",
        epilog=f'example: python -m {PROG} outputs/quickstart --weights 0.3,0.7 --strategy mod "Name a colour."',
    )
    parser.add_argument("run", help="a run directory (with manifest.json) or the recipe YAML that made it")
    parser.add_argument("prompts", nargs="*", help="prompts to answer (or --input FILE)")
    parser.add_argument(
        "--weights",
        help="the preference, one number per objective in recipe order, e.g. 0.3,0.7 (on the simplex; "
        "a direction for DPA)",
    )
    parser.add_argument(
        "--strategy", help=f"one of {list(STRATEGIES)} (default: nearest for MODPO, conditioned for MOC/DPA)"
    )
    parser.add_argument("--input", help="JSONL requests, one object with a `prompt` per line ('-': stdin)")
    parser.add_argument("--output", help="where the JSONL answers go (default: stdout)")
    parser.add_argument(
        "--format",
        choices=("auto", "chat", "plain"),
        default="auto",
        help="text prompts as a user message through the chat template (chat) or as they are (plain); auto: "
        "as the recipe's eval.prompts.conversational",
    )
    sampling = parser.add_argument_group("sampling (default: the recipe's eval: settings)")
    choice = sampling.add_mutually_exclusive_group()
    choice.add_argument("--greedy", dest="do_sample", action="store_false", default=None)
    choice.add_argument("--sample", dest="do_sample", action="store_true", default=None)
    sampling.add_argument("--max-new-tokens", type=int)
    sampling.add_argument("--temperature", type=float)
    sampling.add_argument("--top-p", type=float)
    sampling.add_argument("--seed", type=int)
    sampling.add_argument("--batch-size", type=int)
    return parser


def parse_weights(text: str | None, where: str = "--weights") -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"{where}={text!r} is not a comma-separated list of numbers, e.g. 0.3,0.7") from None


def read_requests(path: str) -> list[dict[str, Any]]:
    """The JSONL requests of `path` ('-': stdin), each an object with a `prompt`."""
    if path != "-" and not Path(path).is_file():
        raise UsageError(f"--input {path}: no such file")
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} line {number}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str | list):
            raise UsageError(f"{path} line {number}: needs a `prompt` (text or a list of chat messages)")
        rows.append({**row, "_line": number})
    if not rows:
        raise UsageError(f"--input {path}: no requests")
    return rows


def answer(front: ParetoSet, rows: list[dict[str, Any]], args: argparse.Namespace, source: str) -> list[dict]:
    """Checks every request, then generates group by group (one per preference and strategy)."""
    overrides = {
        k: getattr(args, k)
        for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "seed", "batch_size")
        if getattr(args, k) is not None
    }
    try:
        front.sampling(**overrides)
    except ValueError as e:
        raise UsageError(f"sampling: {e}") from None
    conversational = bool(front.recipe.eval.prompts and front.recipe.eval.prompts.conversational)
    chat = args.format == "chat" or (args.format == "auto" and conversational)
    default = parse_weights(args.weights)
    groups: dict[tuple, list[int]] = {}
    plans = []
    for i, row in enumerate(rows):
        where = f"{source} line {row['_line']}" if "_line" in row else f"prompt {i + 1}"
        weights = row.get("weights", default)
        if isinstance(weights, str):
            weights = parse_weights(weights, f"{where}: weights")
        if weights is None:
            raise UsageError(f"{where}: no weights; give --weights (e.g. 0.3,0.7) or a `weights` field")
        strategy = row.get("strategy", args.strategy)
        try:
            candidate = front.candidate(weights, strategy)
        except ValueError as e:
            raise UsageError(f"{where}: {e}") from None
        strategy = strategy or front.strategies[0]
        plans.append((front.check_weights(weights), strategy, candidate))
        groups.setdefault((tuple(plans[-1][0]), strategy), []).append(i)
    answers: list[dict] = [{} for _ in rows]
    for (weights, strategy), members in groups.items():
        candidate = plans[members[0]][2]
        print(
            f"{PROG}: w={list(weights)} via {strategy}: {candidate.method} {candidate.label}",
            file=sys.stderr,
            flush=True,
        )
        prompts = [rows[i]["prompt"] for i in members]
        prompts = [[{"role": "user", "content": p}] if chat and isinstance(p, str) else p for p in prompts]
        texts = front.generate(prompts, list(weights), strategy, **overrides)
        for i, text in zip(members, texts, strict=True):
            row = {k: v for k, v in rows[i].items() if k != "_line"}
            answers[i] = {
                **row,
                "response": text,
                "weights": list(weights),
                "strategy": strategy,
                "served_by": candidate.describe(front.run_dir),
            }
    return answers


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        if bool(args.prompts) == bool(args.input):
            raise UsageError("give prompts on the command line or --input FILE (JSONL), not both")
        if args.output and not args.input:
            raise UsageError("--output writes the JSONL mode's answers; it needs --input")
        rows = read_requests(args.input) if args.input else [{"prompt": p} for p in args.prompts]
        front = ParetoSet(args.run)
        answers = answer(front, rows, args, args.input or "")
    except (UsageError, RecipeError, OSError) as e:
        if not isinstance(e, UsageError) and not is_user_error(e):
            raise
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.input:
        text = "".join(json.dumps(a) + "\n" for a in answers)
        if args.output:
            write_atomic(Path(args.output), text)
        else:
            sys.stdout.write(text)
    else:
        for a in answers:
            print(a["response"] if len(answers) == 1 else json.dumps(a["response"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
