"""What a `transformers.Trainer` writes into its `output_dir` besides checkpoints and what is worth keeping when
that folder is a temporary one: the log history (`trainer_state.json`, written by `Trainer.save_state()`),
TensorBoard's default log folder (`runs/`, `report_to: tensorboard`) and CodeCarbon's `emissions.csv`
(`report_to: codecarbon`). Integrations that log elsewhere (wandb, mlflow, trackio, ...) are not touched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

LOG_OUTPUTS = ("trainer_state.json", "runs", "emissions.csv")


def keep_logs(output_dir: str | Path, folder: str | Path) -> list[str]:
    """Copies the `LOG_OUTPUTS` found in `output_dir` into `folder`; returns their names. Copies, not moves: until
    `folder` is complete, a run killed meanwhile resumes from `output_dir` with its logs still there.

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
        else:
            shutil.copy2(source, target)
        kept.append(name)
    return kept
