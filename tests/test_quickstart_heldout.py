"""The quickstart's held-out prompts: never trained on, and what `make_data --eval-only` writes."""

import json
from pathlib import Path

import pytest
from examples.quickstart import make_data

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart"


def test_eval_prompts_are_disjoint_from_the_training_prompts():
    trained = {json.loads(line)["prompt"] for line in (QUICKSTART / "data" / "samples.jsonl").open()}
    held_out = [json.loads(line)["prompt"] for line in (QUICKSTART / "data" / "eval_prompts.jsonl").open()]
    assert len(held_out) == len(set(held_out)) == 96
    assert not {p.lower() for p in held_out} & {p.lower() for p in trained}
    # the file is the seeded split's 54 held-out prompts, then the added ones
    train, split = make_data.split_prompts(str(QUICKSTART / "prompts.txt"), 0.15, seed=0)
    assert set(train) == trained
    extra = str(QUICKSTART / "heldout_prompts.txt")
    assert held_out == make_data.eval_prompts(split, train, extra) and held_out[:54] == split


def test_an_added_prompt_that_was_trained_on_is_refused(tmp_path):
    train, split = make_data.split_prompts(str(QUICKSTART / "prompts.txt"), 0.15, seed=0)
    (tmp_path / "extra.txt").write_text(f"A new instruction.\n{train[3].upper()}\n")
    with pytest.raises(SystemExit, match="held-out prompts must be new"):
        make_data.eval_prompts(split, train, str(tmp_path / "extra.txt"))
