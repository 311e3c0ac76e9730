"""What a `transformers.Trainer` writes into its `output_dir` besides checkpoints and what is worth keeping when
that folder is a temporary one: the log history (`trainer_state.json`, written by `Trainer.save_state()`),
TensorBoard's default log folder (`runs/`, `report_to: tensorboard`) and CodeCarbon's `emissions.csv`
(`report_to: codecarbon`). Integrations that log elsewhere (wandb, mlflow, trackio, ...) are not touched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

LOG_OUTPUTS = ("trainer_state.json", "runs", "emissions.csv")


def keep_logs(output_dir: str | Path, folder: str | Path, copy: bool = False) -> list[str]:
    """Moves (or copies) the `LOG_OUTPUTS` found in `output_dir` into `folder`; returns their names.

    A `runs/` folder already in `folder` gains the new runs (TensorBoard shows each as its own run).
    """
    output_dir, folder = Path(output_dir), Path(folder)
    kept = []
    for name in LOG_OUTPUTS:
        source, target = output_dir / name, folder / name
        if not source.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
            if not copy:
                shutil.rmtree(source)
        elif copy:
            shutil.copy2(source, target)
        else:
            shutil.move(source, target)
        kept.append(name)
    return kept
