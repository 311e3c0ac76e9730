"""benchmarks/harness.py: the memory probe, the round-robin order and the target checks every part relies on."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import harness


def test_peak_memory_sees_an_allocation_made_inside_the_block():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("VmHWM reset needs Linux /proc")
    with harness.PeakMemory("cpu") as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert memory.peak - memory.before >= 60 * 2**20


class FakeTrainer:
    """Three steps of 10 tokens per `train()`, reported to the callback `quiet` adds; logs its name."""

    def __init__(self, name: str, log: list[str]):
        self.name, self.log, self.timer = name, log, None

    def remove_callback(self, callback):
        pass

    def add_callback(self, callback):
        self.timer = callback

    def train(self):
        self.log.append(self.name)
        state = SimpleNamespace(num_input_tokens_seen=0)
        self.timer.on_train_begin(None, state, None)
        for _ in range(3):
            self.timer.on_step_begin(None, state, None)
            state.num_input_tokens_seen += 10
            self.timer.on_step_end(None, state, None)


def test_round_robin_rotates_the_order_and_drops_the_warm_up():
    log = []
    trainers = {name: FakeTrainer(name, log) for name in "abc"}
    samples, per_rep = harness.round_robin(trainers, reps=2, desc="test")
    assert log == ["c", "a", "b", "a", "b", "c", "b", "c", "a"]  # warm-up, then two measured repetitions
    for name in "abc":
        # Two measured repetitions of three steps, the first step of each dropped.
        assert len(samples[name]["step_s"]) == len(samples[name]["interval_s"]) == 4
        assert samples[name]["tokens"] == [10] * 4
        assert len(per_rep[name]) == 2


def test_check_targets_strict_and_inclusive_limits():
    targets = {"at_most": harness.Target(1.0, "<= 1"), "below": harness.Target(1.0, "< 1", strict=True)}
    checked = harness.check_targets(targets, {"at_most": 1.0, "below": 1.0})
    assert checked["at_most"] == {"value": 1.0, "limit": 1.0, "met": True, "target": "<= 1"}
    assert checked["below"]["met"] is False
    assert harness.check_targets(targets, {"at_most": None, "below": 0.5})["at_most"]["met"] is None
