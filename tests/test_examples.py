"""examples/modpo_trl_script.py: TRL's DPO script shape (TrlParser over script, MODPOConfig and model arguments)
runs end to end on a tiny model saved to disk."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modpo_trl.testing import tiny_causal_lm, tiny_tokenizer, toy_preference_dataset

REPO = Path(__file__).resolve().parents[1]


def words(prompts, completions, **kwargs):
    """A margin reward in TRL's reward-function convention."""
    return [float(len(c.split())) for c in completions]


# The stream covers more (margins scored per batch, a streamed eval set); each run is an interpreter start.
@pytest.mark.parametrize(
    "streaming", [pytest.param(False, marks=pytest.mark.slow), True], ids=["dataset", "stream"]
)
def test_trl_style_script_trains_and_saves(tmp_path, streaming):
    tokenizer = tiny_tokenizer()
    tiny_causal_lm(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    for split, seed in (("train", 0), ("test", 1)):
        rows = toy_preference_dataset(8, seed=seed).to_list()
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli = [
        sys.executable,
        str(REPO / "examples" / "modpo_trl_script.py"),
        f"--dataset_name={data}",
        f"--model_name_or_path={tmp_path / 'model'}",
        "--margin_reward_funcs=tests.test_examples:words",
        "--weights",
        "0.7",
        "0.3",
        "--beta=0.2",
        "--max_steps=2",
        "--per_device_train_batch_size=4",
        "--per_device_eval_batch_size=4",
        "--eval_strategy=steps",
        "--eval_steps=2",
        "--logging_steps=1",
        "--use_cpu",
        "--bf16=False",
        "--report_to=none",
        "--save_strategy=no",
        f"--output_dir={tmp_path / 'out'}",
        "--no_remove_unused_columns",
        "--use_peft",
        "--lora_r=4",
        "--lora_alpha=8",
        "--lora_target_modules",
        "q_proj",
        "v_proj",
    ] + (["--dataset_streaming"] if streaming else [])
    # The reward function lives in this test module: importable from the repository root.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(cli, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert "'margin/words'" in done.stdout and "'eval_loss'" in done.stdout
