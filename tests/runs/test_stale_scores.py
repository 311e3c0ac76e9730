"""End to end: what a sweep trains on follows the code of its reward functions, whatever the score cache holds."""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from modpo_trl.runs.recipe import load_recipe
from modpo_trl.testing import tiny_causal_lm, tiny_tokenizer
from modpo_trl.trainers.modpo_trainer import MODPOTrainer

from ..helpers import train_recipe

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "tiny_modpo.yaml"
PAIRS = REPO / "tests" / "data" / "tiny_pairs.jsonl"
SCORES = "from .helpers import helper\n\n\ndef score(prompts, responses):\n    return [helper(r) for r in responses]\n"
HELPERS = "def helper(response):\n    return float(len(response.split()))\n"
EDITED = "def helper(response):\n    return -2.5 * float(len(response.split()))\n"


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "policy"
    tokenizer = tiny_tokenizer()
    tiny_causal_lm(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def trained_margins(monkeypatch):
    """The chosen margin rewards each training saw, in order."""
    seen = []
    train = MODPOTrainer.train

    def recording(self, *args, **kwargs):
        seen.append(np.asarray(self.train_dataset["chosen_margin_rewards"])[:, 0])
        return train(self, *args, **kwargs)

    monkeypatch.setattr(MODPOTrainer, "train", recording)
    return seen


def write_package(root: Path, helpers: str) -> None:
    """Writes `rewardpkg` and forgets the imported one, as the next `python -m modpo_trl.train` would."""
    (root / "rewardpkg").mkdir(exist_ok=True)
    (root / "rewardpkg" / "__init__.py").write_text("")
    (root / "rewardpkg" / "scores.py").write_text(SCORES)
    (root / "rewardpkg" / "helpers.py").write_text(helpers)
    for name in [m for m in sys.modules if m.split(".")[0] == "rewardpkg"]:
        del sys.modules[name]
    importlib.invalidate_caches()


def test_editing_a_reward_functions_helper_between_two_sweeps_trains_on_fresh_scores(
    policy, tmp_path, monkeypatch, trained_margins
):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    overrides = [
        f"model.path={policy}",
        f"objectives.0.data.path={PAIRS}",
        "objectives.1.reward={type: function, function: 'rewardpkg.scores:score'}",
        f"output_dir={tmp_path / 'out'}",
    ]
    write_package(tmp_path, HELPERS)
    train_recipe(load_recipe(TINY, [*overrides, "sweep.index=0"]))
    write_package(tmp_path, EDITED)  # the function's own module is unchanged: the helper it calls is edited
    train_recipe(load_recipe(TINY, [*overrides, "sweep.index=1"]))

    first, second = trained_margins
    assert np.all(first > 0)
    np.testing.assert_allclose(second, -2.5 * first)  # the edited helper's scores, not the cached ones
