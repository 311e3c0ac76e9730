"""benchmarks/bench.py: the smoke size end to end (output schema, no timing assertions) and its pieces."""

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("modpo_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    report = bench.main(["--size", "smoke", "--out", str(out)])
    assert torch.get_num_threads() == threads  # the smoke size runs on 1 thread, then gives the setting back
    return out, report


def finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def test_smoke_writes_json_and_markdown(smoke):
    out, report = smoke
    stamped = out / f"smoke-{report['timestamp']}.json"
    assert {p.name for p in out.iterdir()} == {stamped.name, "smoke-latest.json", "smoke-latest.md"}
    assert json.loads(stamped.read_text()) == json.loads((out / "smoke-latest.json").read_text())
    saved = json.loads(stamped.read_text())
    assert {
        "size",
        "timestamp",
        "machine",
        "versions",
        "settings",
        "methods",
        "results",
        "targets",
        "wall_s",
    } <= set(saved)
    assert {"cpu", "cores", "gpu", "torch_threads"} <= set(saved["machine"])
    assert {"torch", "transformers", "trl", "peft", "modpo_trl"} <= set(saved["versions"])
    assert saved["settings"]["seq_len"] == 48 and saved["settings"]["batch"] == 2
    text = (out / "smoke-latest.md").read_text()
    for heading in ("## Per-step cost", "## Sweep cost (K=2", "## Targets"):
        assert heading in text
    assert "| modpo/dpo |" in text and "| on_the_fly/modpo |" in text and "| moc_mgda/moc_linear |" in text


def test_smoke_step_cost_has_every_variant_and_finite_ratios(smoke):
    step = smoke[1]["results"]["step"]
    assert (
        set(step["variants"])
        == set(bench.VARIANTS)
        == {"dpo", "modpo", "modpo_on_the_fly", "moc_linear", "moc_mgda"}
    )
    spec = bench.SIZES["smoke"]
    for result in step["variants"].values():
        # One measured step per repetition: the first step of each repetition is the warm-up.
        assert result["measured_steps"] == spec.reps * (spec.steps_per_rep - 1)
        assert result["median_interval_s"] > 0 and result["tokens_per_s"] > 0
        assert result["memory"]["peak_bytes"] >= result["memory"]["before_training_bytes"] > 0
    for name in ("modpo/dpo", "on_the_fly/modpo", "moc_mgda/moc_linear"):
        for key in ("interval_time", "step_time", "peak_memory"):
            assert finite(step["ratios"][name][key]), (name, key)


def test_smoke_sweep_and_targets(smoke):
    report = smoke[1]
    sweep = report["results"]["sweep"]
    assert sweep["k"] == 2 and len(sweep["runs"]) == 4
    assert [r["cached"] for r in sweep["runs"]] == [True, False, False, True]  # alternating order
    assert all(r["steps"] == 2 for r in sweep["runs"])  # one epoch of 4 pairs at batch 2
    assert finite(sweep["ratio_cached_uncached"]) and 0 < sweep["scoring_share_of_uncached_run"] < 1
    for mode in ("cached", "uncached"):
        totals = sweep["totals"][mode]
        assert totals["total_s"] == pytest.approx(
            totals["model_s"] + totals["construction_s"] + totals["training_s"]
        )
    assert set(report["targets"]) == set(bench.TARGETS)
    assert report["targets"]["qlora_7b_peak_gib"]["met"] is None  # no GPU part at this size
    assert report["targets"]["sweep_cached_vs_uncached"]["value"] is None  # K=2, the target is at K=5
    assert isinstance(report["targets"]["modpo_vs_dpo_step_time"]["met"], bool)


def test_smoke_sweep_scores_the_data_once(smoke):
    """One cache entry per margin source and one for the reference log-probs, although the reward model's
    tokenizer is also used by the policy's trainers in between (its truncation state must not be in the key)."""
    sweep = smoke[1]["results"]["sweep"]
    assert sweep["expected_cache_entries"] == {"margins": 2, "ref_logps": 1}
    assert sweep["cache_entries"] == sweep["expected_cache_entries"]
    assert sweep["scored_once"] is True


def test_bad_arguments_fail_before_any_work(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--size", "cpu", "--parts", "sweep,nope"])
    assert "--parts ['nope'] is not valid for --size cpu; valid: ['step', 'sweep']" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.main(["--size", "gpu"])
        assert "--size gpu needs a CUDA GPU" in capsys.readouterr().err


def test_decode_pairs_splits_prompt_and_response(tokenizer):
    prompt = tokenizer("the cat sat", add_special_tokens=False)["input_ids"]
    response = tokenizer("on the mat </s>", add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id
    ids = torch.tensor([prompt + response, prompt + response[:1] + [pad] * 3])
    inputs = {
        "input_ids": ids,
        "attention_mask": (ids != pad).long(),
        "completion_mask": torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0, 0]]),
    }
    prompts, responses = bench.decode_pairs(tokenizer, inputs)
    assert prompts == ["the cat sat", "the cat sat"]
    assert responses == ["on the mat", "on"]


def test_sweep_weightings_are_valid_and_end_at_pure_target():
    from modpo_trl.trainers.modpo_config import check_weights

    weightings = bench.sweep_weightings(5)
    assert [w[0] for w in weightings] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert weightings[0][1:] == pytest.approx([0.4, 0.4])
    for w in weightings:
        check_weights(w)


def test_peak_memory_sees_an_allocation_made_inside_the_block():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("VmHWM reset needs Linux /proc")
    with bench.PeakMemory("cpu") as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert memory.peak - memory.before >= 60 * 2**20


def test_scale_part_runs_on_cpu_without_quantisation(tmp_path):
    """The GPU-only 7B part, shrunk and unquantised: checkpoint, batch ladder, (a) vs (b) and the report."""
    tiny = bench.Dims(hidden=32, layers=2, heads=4, intermediate=64, vocab=128)
    scale = bench.ScaleSpec(
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
    spec = dataclasses.replace(bench.SIZES["smoke"], scale=dataclasses.replace(scale, load_in_4bit=False))
    ctx = bench.Context(spec, tmp_path)
    result = bench.scale_cost(ctx, tmp_path / "checkpoints")
    assert (tmp_path / "checkpoints" / "llama-32x2-random" / "config.json").exists()
    assert [p["batch"] for p in result["ladder"]] == [1, 2] and not any(p["oom"] for p in result["ladder"])
    assert result["largest_batch_under_48gib"] == 2
    comparison = result["comparison"]
    assert comparison["batch"] == 2
    assert all(finite(comparison["ratios"][k]) for k in ("interval_time", "step_time", "peak_memory"))
    assert bench.targets({"scale": result})["qlora_7b_peak_gib"]["value"] is None  # not the 7B shape
