"""The benchmark's `--size smoke` run, once for every test of its parts (pytest puts benchmarks/ on the path)."""

import pytest
import torch

import bench


@pytest.fixture(scope="package")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    report = bench.main(["--size", "smoke", "--out", str(out)])
    assert torch.get_num_threads() == threads  # the smoke size runs on 1 thread, then gives the setting back
    return out, report
