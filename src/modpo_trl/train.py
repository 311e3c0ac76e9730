"""Command line: train what a recipe describes.

    python -m modpo_trl.train RECIPE.yaml [key=value ...] [--dry-run] [--retrain-changed]
    accelerate launch [--config_file recipes/accelerate/multi_gpu.yaml] -m modpo_trl.train RECIPE.yaml ...

The recipe is resolved into a plan (`modpo_trl.runs.engine`): `method: modpo` trains one LoRA adapter per
weighting, `moc` and `dpa` one conditioned adapter. A bad recipe, a missing file or a model that cannot be
loaded ends with a one-paragraph message and exit status 2; SIGTERM and Ctrl-C (SIGINT) with one line and the
shell's status for the signal (143, 130), after marking the run being trained `interrupted` (the same command
resumes it).
"""

from __future__ import annotations

import argparse
import sys

from .runs.engine import execute, make_plan, print_plan
from .runs.memory import memory_lines
from .runs.methods import method_of
from .runs.recipe import RecipeError, is_user_error, load_recipe, resolved_yaml
from .runs.signals import Interrupted, interruptible


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m modpo_trl.train",
        description="Train the Pareto set (MODPO sweep) or the conditioned model (MOC, DPA) a recipe describes.",
        epilog="examples: python -m modpo_trl.train recipes/safety/modpo.yaml sweep.index=3 training.beta=0.2",
    )
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. training.learning_rate=1e-4 sweep.index=2 objectives.0.data.max_samples=100",
    )
    parser.add_argument(
        "--retrain-changed",
        action="store_true",
        help="train again the finished runs whose trained sections (method, model, lora, objectives, target, "
        "training) changed since; without it they are kept, with a warning",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the recipe and every trainer config, print it resolved, the estimated peak memory and the "
        "runs with their status; load no model or data",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        with interruptible():
            return _run(args)
    except (RecipeError, OSError) as e:
        if not is_user_error(e):
            raise
        message = " ".join(str(e).split())  # one paragraph, whatever the wrapped error looked like
        print(f"modpo_trl.train: error: {message}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"modpo_trl.train: interrupted by {e.name}; run the same command to resume", file=sys.stderr)
        return e.exit_status


def _run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    plan = make_plan(recipe, method_of(recipe), dry_run=args.dry_run, retrain_changed=args.retrain_changed)
    if args.dry_run:
        print(f"# {args.recipe}, resolved\n{resolved_yaml(recipe)}")
        print("\n".join(memory_lines(recipe, plan.runs[0].args)))
        print_plan(plan)
    else:
        execute(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
