"""Command line: evaluate a trained run (every adapter of a sweep, or a conditioned model at its preferences)
against the baselines, and plot the front.

    python -m modpo_trl.evaluate <run dir | recipe.yaml> [key=value ...] [--force] [--dry-run]

See `modpo_trl.evaluation.pipeline` for what is generated, scored and written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .evaluation.pipeline import evaluate_sweep, plan_evaluation, plan_lines
from .evaluation.report import print_report
from .runs.recipe import RecipeError, is_user_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m modpo_trl.evaluate",
        description="Generate, score and compare every adapter of a sweep with the baselines; plot the front.",
        epilog="example: python -m modpo_trl.evaluate outputs/quickstart eval.num_prompts=16 eval.do_sample=false",
    )
    parser.add_argument(
        "target", help="a sweep directory (with manifest.json) or the recipe YAML that made it"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted recipe overrides, e.g. eval.num_prompts=32"
    )
    parser.add_argument("--force", action="store_true", help="ignore cached responses and scores")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, list the candidates and which responses would be generated; load no model",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        if args.dry_run:
            print("\n".join(plan_lines(plan_evaluation(args.target, args.overrides, force=args.force))))
            return 0
        report = evaluate_sweep(args.target, args.overrides, force=args.force)
    except (RecipeError, OSError) as e:
        if not is_user_error(e):
            raise
        print(f"modpo_trl.evaluate: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
