"""Faults: a process killed at any step of finishing a weighting or of writing the manifest or the cache
(`MODPO_TRL_FAULT`), SIGTERM / Ctrl-C, damaged cache entries and manifests, non-finite training, secrets from
the environment. Nothing complete is trained again, nothing non-finite or incomplete is marked done, and the
sweep completes when run again."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from modpo_trl.evaluate import main as evaluate_main
from modpo_trl.runs.engine import Manifest, NonFiniteError, check_finite_adapter
from modpo_trl.runs.recipe import RecipeError, load_recipe, resolved_yaml
from modpo_trl.storage import FAULT_ENV
from modpo_trl.train import main
from modpo_trl.trainers.modpo_trainer import MODPOTrainer

from ..helpers import PAIRS, REPO, TINY, save_tiny_models, tiny_overrides, train_recipe

TAG = "w-1.00-0.00"
# One weighting, with a checkpoint at its last step (the resume point of a run killed after training).
ONE_RUN = ["sweep.index=0", "training.save_strategy=steps", "training.save_steps=2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def steps(monkeypatch):
    """Counts the training steps taken in this process."""
    seen = []
    step = MODPOTrainer.training_step
    monkeypatch.setattr(
        MODPOTrainer, "training_step", lambda self, *a, **k: seen.append(1) or step(self, *a, **k)
    )
    return seen


def cli(models, out, *extra, env=None, **kwargs):
    command = [
        sys.executable,
        "-m",
        "modpo_trl.train",
        str(TINY),
        *tiny_overrides(models, out, *ONE_RUN, *extra),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def assert_complete(run_dir: Path, cache_dir: Path) -> dict:
    """The weighting is done with a finite adapter, and nothing a killed process left remains."""
    entry = json.loads((run_dir / "manifest.json").read_text())["runs"][TAG]
    assert entry["status"] == "done" and entry["error"] is None
    check_finite_adapter(run_dir / TAG)
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in (run_dir / TAG).iterdir()}
    litter = [p.name for p in run_dir.iterdir() if p.name.endswith((".tmp", ".partial"))]
    litter += [p.name for p in cache_dir.rglob("*.tmp")]
    assert litter == []
    return entry


# Where a kill leaves a complete adapter (no step may be trained again), and where it leaves none.
FAULTS = {
    "write:cache": "trains",  # the first cache entry (margins) half written
    "write:manifest#1": "trains",  # the run directory being registered
    "write:manifest#2": "trains",  # the run being marked running
    "finish:saved": "resumes at the end",  # adapter saved and checked, `finishing` not recorded
    "write:manifest#3": "resumes at the end",  # `finishing` being recorded
    "finish:recorded": "recovers",  # `finishing` recorded, adapter not renamed yet
    "finish:renamed": "recovers",  # adapter under its final name, `done` not recorded
    "write:manifest#4": "recovers",  # `done` being recorded
    "finish:done": "skips",  # `done` recorded, checkpoints not deleted yet
}
FAST = {"finish:renamed", "write:manifest#3"}


@pytest.mark.parametrize(
    "fault", [f if f in FAST else pytest.param(f, marks=pytest.mark.slow) for f in FAULTS]
)
def test_a_kill_at_any_step_loses_no_training(models, tmp_path, steps, capsys, fault):
    run_dir, cache_dir = tmp_path / "tiny", tmp_path / "score_cache"
    process = cli(models, tmp_path, env={FAULT_ENV: fault})
    _, err = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, err[-3000:]
    entry = (
        json.loads((run_dir / "manifest.json").read_text())["runs"].get(TAG)
        if (run_dir / "manifest.json").exists()
        else None
    )
    assert entry is None or entry["status"] != "done" or fault == "finish:done"

    rerun = train_recipe(load_recipe(TINY, tiny_overrides(models, tmp_path, *ONE_RUN)))
    out = capsys.readouterr().out
    entry = assert_complete(run_dir, cache_dir)
    assert rerun["runs"][TAG]["status"] == "done"
    expected = FAULTS[fault]
    assert len(steps) == (2 if expected == "trains" else 0)
    if expected == "resumes at the end":
        assert entry["resumed_from"] == "checkpoint-2" and "resuming from checkpoint-2" in out
        assert entry["metrics"]["train_loss"] is None  # not the 0.0 of a training of no steps
    if expected == "recovers":
        assert "is now recorded done" in out
    if expected == "skips":
        assert "nothing to train" in out


SLOW_STEPS = """
import sys, time
from modpo_trl.trainers.modpo_trainer import MODPOTrainer
step = MODPOTrainer.training_step
MODPOTrainer.training_step = lambda self, *a, **k: (time.sleep(0.5), step(self, *a, **k))[1]
from modpo_trl.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_mark_the_run_interrupted_and_it_resumes(models, tmp_path, steps, signum):
    run_dir = tmp_path / "tiny"
    extra = ["training.max_steps=6", "training.save_steps=1"]
    command = [
        sys.executable,
        "-c",
        SLOW_STEPS,
        str(TINY),
        *tiny_overrides(models, tmp_path, *ONE_RUN, *extra),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (run_dir / f".{TAG}.tmp" / "checkpoint-1" / "trainer_state.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.05)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err[-3000:]
    name = signal.Signals(signum).name
    assert (
        err.strip().splitlines()[-1]
        == f"modpo_trl.train: interrupted by {name}; run the same command to resume"
    )
    assert "Traceback" not in err
    entry = json.loads((run_dir / "manifest.json").read_text())["runs"][TAG]
    assert (entry["status"], entry["error"]) == ("interrupted", f"interrupted by {name}")

    manifest = train_recipe(load_recipe(TINY, tiny_overrides(models, tmp_path, *ONE_RUN, *extra)))
    entry = manifest["runs"][TAG]
    assert entry["status"] == "done" and entry["resumed_from"].startswith("checkpoint-")
    assert len(steps) == 6 - int(entry["resumed_from"].split("-")[1]) < 6


def test_non_finite_training_stops_and_is_never_done(models, tmp_path, monkeypatch):
    compute_loss = MODPOTrainer.compute_loss
    monkeypatch.setattr(
        MODPOTrainer, "compute_loss", lambda self, *a, **k: compute_loss(self, *a, **k) * torch.nan
    )
    with pytest.raises(NonFiniteError, match=rf"{TAG} \(step 1\): training diverged \(.*=nan"):
        train_recipe(load_recipe(TINY, tiny_overrides(models, tmp_path, "sweep.index=0")))
    entry = Manifest(tmp_path / "tiny").runs()[TAG]
    assert entry["status"] == "failed" and "NonFiniteError" in entry["error"]
    assert not (tmp_path / "tiny" / TAG).exists()


def test_an_adapter_with_non_finite_weights_is_never_done(models, tmp_path, monkeypatch):
    save_model = MODPOTrainer.save_model

    def poisoned(self, output_dir=None, _internal_call=False):
        save_model(self, output_dir, _internal_call)
        if not _internal_call:  # the final adapter
            weights = Path(output_dir) / "adapter_model.safetensors"
            save_file({k: v * torch.nan for k, v in load_file(weights).items()}, weights)

    monkeypatch.setattr(MODPOTrainer, "save_model", poisoned)
    with pytest.raises(NonFiniteError, match="adapter_model.safetensors: tensor .* holds NaN"):
        train_recipe(load_recipe(TINY, tiny_overrides(models, tmp_path, "sweep.index=0")))
    assert Manifest(tmp_path / "tiny").runs()[TAG]["status"] == "failed"
    assert not (tmp_path / "tiny" / TAG).exists()


def test_nan_in_a_cached_reference_entry_is_recomputed(models, tmp_path):
    """A NaN written into the cached reference log-probs is caught on read: the next weighting scores them again
    and trains a finite adapter."""
    train_recipe(load_recipe(TINY, tiny_overrides(models, tmp_path, "sweep.index=0")))
    [entry] = (tmp_path / "score_cache" / "ref_logps").glob("*.npz")
    with np.load(entry) as data:
        arrays = dict(data)
    arrays["ref_chosen_logps"][0] = np.nan
    np.savez(entry, **arrays)
    with pytest.warns(UserWarning, match=f"score cache entry {entry} is holding non-finite values"):
        manifest = train_recipe(load_recipe(TINY, tiny_overrides(models, tmp_path, "sweep.index=1")))
    assert manifest["runs"]["w-0.67-0.33"]["status"] == "done"
    check_finite_adapter(tmp_path / "tiny" / "w-0.67-0.33")
    with np.load(entry) as data:
        assert np.isfinite(data["ref_chosen_logps"]).all()


def test_a_damaged_manifest_is_restored_from_its_copy(tmp_path, capsys):
    manifest = Manifest(tmp_path)
    manifest.update(lambda data: data.update(runs={"a": {"status": "done"}, "b": {"status": "pending"}}))
    text = manifest.path.read_text()
    manifest.path.write_text(text[: len(text) // 2])  # truncated
    assert Manifest(tmp_path).runs() == {"a": {"status": "done"}, "b": {"status": "pending"}}
    err = capsys.readouterr().err
    assert (
        f"WARNING: {manifest.path} was damaged (" in err
        and "restored its last copy (1 done, 1 pending)" in err
    )
    assert json.loads(manifest.path.read_text()) == json.loads(text)  # repaired on disk: one warning only
    manifest.path.write_text("")
    manifest.backup.write_text("[1, 2")
    with pytest.raises(
        RecipeError, match=r"manifest.json is damaged .* no good copy in .manifest.json.bak; move"
    ):
        manifest.read()


def test_train_and_evaluate_cli_report_a_damaged_manifest_in_one_line(models, tmp_path, capsys):
    """Without a good copy: one line naming the file, exit status 2, no JSONDecodeError traceback."""
    run_dir = tmp_path / "tiny"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text('{"runs": {"w-1')
    scorer = [
        "objectives.0.scorer.type=function",
        "objectives.0.scorer.function=modpo_trl.rewards.scorers:brevity",
    ]
    recipe = load_recipe(TINY, tiny_overrides(models, tmp_path, f"eval.prompts.path={PAIRS}", *scorer))
    (run_dir / "recipe.yaml").write_text(resolved_yaml(recipe))
    assert main([str(TINY), *tiny_overrides(models, tmp_path), "--dry-run"]) == 2
    assert evaluate_main([str(run_dir), "--dry-run"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in err] == ["modpo_trl.train", "modpo_trl.evaluate"]
    assert all(f"{run_dir / 'manifest.json'} is damaged" in line for line in err)


def test_values_from_the_environment_are_not_written(models, tmp_path, monkeypatch):
    """`${oc.env:VAR}` stays unresolved in recipe.yaml, the manifest and the model card; the run still uses the
    value."""
    monkeypatch.setenv("SECRET_TOKEN", "hf_very_secret_value")
    monkeypatch.setenv("RM_DIR", str(models / "rm"))
    overrides = tiny_overrides(models, tmp_path, "sweep.index=0", "training.hub_token=${oc.env:SECRET_TOKEN}")
    overrides = [o for o in overrides if not o.startswith("objectives.1.reward.path")]
    overrides.append("objectives.1.reward.path=${oc.env:RM_DIR}")
    recipe = load_recipe(TINY, overrides)
    assert recipe.training["hub_token"] == "hf_very_secret_value"
    train_recipe(recipe)
    run_dir = tmp_path / "tiny"
    for path in [p for p in run_dir.rglob("*") if p.is_file()]:
        assert b"hf_very_secret_value" not in path.read_bytes(), path
    written = (run_dir / "recipe.yaml").read_text()
    assert "hub_token: ${oc.env:SECRET_TOKEN}" in written and "path: ${oc.env:RM_DIR}" in written
    assert Manifest(run_dir).read()["recipe"]["training"]["hub_token"] == "${oc.env:SECRET_TOKEN}"
