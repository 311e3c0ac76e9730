"""benchmarks/gpu_scale.py: the GPU-only 7B part, shrunk and unquantised so that it runs on a CPU."""

import dataclasses
import math
from dataclasses import asdict

import gpu_scale
import harness


def test_scale_part_runs_on_cpu_without_quantisation(tmp_path):
    """Checkpoint, batch ladder, (a) vs (b) and the report."""
    tiny = harness.Dims(hidden=32, layers=2, heads=4, intermediate=64, vocab=128)
    scale = harness.ScaleSpec(
        tiny,
        seq_len=48,
        lora_r=4,
        lora_alpha=8,
        batches=(1, 2),
        steps=2,
        ratio_batch=2,
        reps=1,
        steps_per_rep=2,
    )
    spec = dataclasses.replace(harness.SIZES["smoke"], scale=dataclasses.replace(scale, load_in_4bit=False))
    ctx = harness.Context(spec, tmp_path)
    result = gpu_scale.measure(ctx, tmp_path / "checkpoints")
    assert (tmp_path / "checkpoints" / "llama-32x2-random" / "config.json").exists()
    assert [p["batch"] for p in result["ladder"]] == [1, 2] and not any(p["oom"] for p in result["ladder"])
    assert result["largest_batch_under_48gib"] == 2
    comparison = result["comparison"]
    assert comparison["batch"] == 2
    assert all(math.isfinite(comparison["ratios"][k]) for k in ("interval_time", "step_time", "peak_memory"))
    assert gpu_scale.target_values(result) == {"qlora_7b_peak_gib": None}  # not the 7B shape
    text = "\n".join(gpu_scale.markdown(result))
    assert "## LoRA MODPO on a random Llama" in text and "(b)/(a) at batch 2:" in text


def test_the_7b_target_reads_batch_one_of_the_full_size_only():
    point = {"batch": 1, "oom": False, "peak_bytes": 20 * harness.GIB}
    full = {"dims": asdict(harness.LLAMA2_7B), "load_in_4bit": True, "seq_len": 1024, "ladder": [point]}
    assert gpu_scale.target_values(full) == {"qlora_7b_peak_gib": 20.0}
    assert gpu_scale.target_values({**full, "seq_len": 512}) == {"qlora_7b_peak_gib": None}
    assert gpu_scale.target_values({**full, "ladder": [{"batch": 1, "oom": True}]}) == {
        "qlora_7b_peak_gib": None
    }
