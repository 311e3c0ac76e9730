"""benchmarks/bench.py: the entry point's CLI and report, the smoke size end to end (schema, no timing assertions)."""

import json

import pytest
import torch

import bench


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
    assert set(saved["results"]) == {"step", "sweep"}  # no scale part at this size
    assert {"cpu", "cores", "gpu", "torch_threads", "load_average_at_end"} <= set(saved["machine"])
    assert {"torch", "transformers", "trl", "peft", "modpo_trl"} <= set(saved["versions"])
    assert saved["settings"]["seq_len"] == 48 and saved["settings"]["batch"] == 2
    text = (out / "smoke-latest.md").read_text()
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings[0].startswith("# modpo_trl benchmark: `--size smoke`")
    assert headings[1:] == ["## Per-step cost", "## Sweep cost (K=2, 4 pairs, 1 epoch per run)", "## Targets"]
    assert "| modpo/dpo |" in text and "| on_the_fly/modpo |" in text and "| moc_mgda/moc_linear |" in text


def test_smoke_reports_every_target(smoke):
    targets = smoke[1]["targets"]
    assert (
        list(targets)
        == list(bench.TARGETS)
        == [
            "modpo_vs_dpo_step_time",
            "modpo_vs_dpo_peak_memory",
            "sweep_cached_vs_uncached",
            "qlora_7b_peak_gib",
        ]
    )
    assert targets["qlora_7b_peak_gib"]["met"] is None  # no GPU part at this size
    assert targets["sweep_cached_vs_uncached"]["value"] is None  # K=2, the target is at K=5
    assert isinstance(targets["modpo_vs_dpo_step_time"]["met"], bool)
    assert (
        targets["modpo_vs_dpo_step_time"]["value"]
        == smoke[1]["results"]["step"]["ratios"]["modpo/dpo"]["interval_time"]
    )


def test_targets_without_results_are_unmeasured():
    assert all(t["value"] is None and t["met"] is None for t in bench.targets({}).values())


def test_bad_arguments_fail_before_any_work(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--size", "cpu", "--parts", "sweep,nope"])
    assert "--parts ['nope'] is not valid for --size cpu; valid: ['step', 'sweep']" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.main(["--size", "gpu"])
        assert "--size gpu needs a CUDA GPU" in capsys.readouterr().err
