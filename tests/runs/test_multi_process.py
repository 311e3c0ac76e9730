"""Several CPU processes from the documented command (recipes/accelerate/multi_cpu.yaml's header)."""

import json
import shlex
import subprocess
import sys

import pytest

from ..helpers import REPO, TINY, save_tiny_models, tiny_overrides

MULTI_CPU = REPO / "recipes" / "accelerate" / "multi_cpu.yaml"


def documented_command() -> list[str]:
    """The `accelerate launch` line of the config's header."""
    line = next(x for x in MULTI_CPU.read_text().splitlines() if x.startswith("#   accelerate launch"))
    return shlex.split(line.removeprefix("#"))


@pytest.mark.slow
def test_two_cpu_processes_train_the_tiny_recipe(tmp_path):
    command = documented_command()
    assert command[:2] == ["accelerate", "launch"] and command[-1] == "RECIPE.yaml"
    models = save_tiny_models(tmp_path / "models")
    launch = [sys.executable, "-m", "accelerate.commands.launch", *command[2:-1], str(TINY)]
    done = subprocess.run(
        [*launch, *tiny_overrides(models, tmp_path, "sweep.index=0")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # 12 pairs in global batches of 2 processes x 4: two steps are one epoch (one process: two thirds of one)
    history = json.loads((tmp_path / "tiny" / "w-1.00-0.00" / "trainer_state.json").read_text())[
        "log_history"
    ]
    assert history[-1]["step"] == 2 and history[-1]["epoch"] == 1.0
