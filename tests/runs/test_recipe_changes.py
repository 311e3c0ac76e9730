"""A finished run whose trained sections changed is not skipped silently: a warning names what changed, the dry
run shows it, and `--retrain-changed` trains it again under the new recipe."""

from modpo_trl.runs.engine import recipe_changes, trained_sections
from modpo_trl.train import main
from modpo_trl.trainers.modpo_trainer import MODPOTrainer

from ..helpers import train_recipe
from .test_engine import TAGS, TINY, manifest_of, saved_models, tiny_args, tiny_recipe  # noqa: F401 - fixture

CHANGED = ["sweep.index=2", "training.beta=0.5"]


def test_a_run_trained_under_another_recipe_is_reported_and_retrained_on_request(
    saved_models,  # noqa: F811 - the fixture
    tmp_path,
    monkeypatch,
    capsys,
):
    trainings = []
    train = MODPOTrainer.train
    monkeypatch.setattr(MODPOTrainer, "train", lambda self, **kw: trainings.append(1) or train(self, **kw))
    train_recipe(tiny_recipe(saved_models, tmp_path, "sweep.index=2"))
    run_dir, tag = tmp_path / "tiny", TAGS[2]
    first = manifest_of(run_dir)["runs"][tag]
    assert first["trained_recipe"]["training"]["beta"] == 0.1
    capsys.readouterr()

    train_recipe(tiny_recipe(saved_models, tmp_path, *CHANGED))
    assert len(trainings) == 1
    err = capsys.readouterr().err
    assert (
        f"modpo_trl.train: WARNING: {tag} was trained under a different recipe (training.beta: 0.1 -> 0.5)"
        in err
    )
    assert "--retrain-changed" in err

    assert main([str(TINY), *tiny_args(saved_models, tmp_path, *CHANGED), "--dry-run"]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert "under another recipe (training.beta: 0.1 -> 0.5)" in row and row.endswith(
        "skip (--retrain-changed retrains)"
    )

    assert main([str(TINY), *tiny_args(saved_models, tmp_path, *CHANGED), "--retrain-changed"]) == 0
    assert len(trainings) == 2
    again = manifest_of(run_dir)["runs"][tag]
    assert again["status"] == "done" and again["trained_recipe"]["training"]["beta"] == 0.5
    assert again["fingerprints"]["recipe"] != first["fingerprints"]["recipe"]
    capsys.readouterr()
    train_recipe(tiny_recipe(saved_models, tmp_path, *CHANGED), retrain_changed=True)  # nothing changed since
    assert len(trainings) == 2 and "WARNING" not in capsys.readouterr().err


def test_a_field_added_since_at_a_neutral_value_is_no_change(saved_models, tmp_path):  # noqa: F811 - fixture
    """A run recorded before `lora.use_dora` existed trained as `use_dora: false` does: not a change. The same
    field set to true is one."""
    recipe = tiny_recipe(saved_models, tmp_path)
    entry = {
        "status": "done",
        "fingerprints": {"recipe": "recorded-by-an-older-version"},
        "trained_recipe": trained_sections(recipe),
    }
    del entry["trained_recipe"]["lora"]["use_dora"]
    assert recipe_changes(entry, recipe) is None
    recipe.lora.use_dora = True
    assert recipe_changes(entry, recipe) == ["lora.use_dora: (unset) -> True"]
