"""Command line: train a regression reward model (one output per attribute) on rated responses.

    python -m modpo_trl.reward_modeling --base MODEL --data rows.jsonl --attributes a b --output DIR

See `modpo_trl.rewards.modeling.train_reward_model` for what it does and writes.
"""

from __future__ import annotations

import argparse
import json
import sys

from .rewards.modeling import train_reward_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modpo_trl.reward_modeling",
        description="Train a regression reward model (one output per attribute) on rated responses.",
    )
    parser.add_argument("--base", required=True, help="base model folder (or hub id)")
    parser.add_argument("--data", required=True, help="json/jsonl/csv/parquet file with the columns below")
    parser.add_argument("--attributes", nargs="+", required=True, help="numeric columns to predict")
    parser.add_argument("--output", required=True, help="folder to write the reward model to")
    parser.add_argument("--prompt-column", default="prompt")
    parser.add_argument("--response-column", default="response")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--no-normalize", dest="normalize", action="store_false", help="predict raw values")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    args = parser.parse_args(argv)
    try:
        metrics = train_reward_model(
            args.base,
            args.data,
            args.attributes,
            args.output,
            prompt_column=args.prompt_column,
            response_column=args.response_column,
            epochs=args.epochs,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            max_length=args.max_length,
            normalize=args.normalize,
            seed=args.seed,
            eval_fraction=args.eval_fraction,
        )
    except (ValueError, OSError, TypeError) as e:
        print(f"modpo_trl.reward_modeling: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
