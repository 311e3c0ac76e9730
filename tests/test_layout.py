"""The package's layers import only downwards, and no module reaches into another's private names.

storage, loading, offline, generation, testing     (bottom: no package imports but each other)
conditioning  <  rewards  <  trainers  <  runs  <  serving  <  evaluation
    <  train / evaluate / generate / reward_modeling (CLIs)
"""

import ast
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "modpo_trl"
ABOVE = {
    "bottom": ("conditioning", "rewards", "trainers", "runs", "serving", "evaluation"),
    "conditioning": ("rewards", "trainers", "runs", "serving", "evaluation"),
    "rewards": ("trainers", "runs", "serving", "evaluation"),
    "trainers": ("runs", "serving", "evaluation"),
    "runs": ("serving", "evaluation"),
    "serving": ("evaluation",),
}
CLIS = ("modpo_trl.train", "modpo_trl.evaluate", "modpo_trl.generate", "modpo_trl.reward_modeling")
# Imports inside functions only for optional dependencies that are not installed everywhere.
OPTIONAL = ("vllm", "vaderSentiment")


BOTTOM = ("storage", "loading", "offline", "generation", "testing")


def modules(layer: str) -> list[str]:
    if layer == "bottom":
        return [f"modpo_trl.{name}" for name in BOTTOM]
    return sorted(f"modpo_trl.{layer}.{p.stem}" for p in (SRC / layer).glob("*.py") if p.stem != "__init__")


def imported_after(group: list[str]) -> set[str]:
    code = f"import json, sys; import {', '.join(group)}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return {m for m in json.loads(done.stdout.splitlines()[-1]) if m.startswith("modpo_trl")}


@pytest.mark.parametrize("layer", list(ABOVE))
def test_a_layer_imports_nothing_above_it(layer):
    """In a fresh interpreter, a trainer module pulls in no recipe, run-engine or evaluation module (and
    likewise for every layer). Trainer modules are imported one per interpreter; the other layers' modules
    together, which is as strict for the layer and costs one interpreter start (torch, TRL) instead of many."""
    groups = [[m] for m in modules(layer)] if layer == "trainers" else [modules(layer)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for group, loaded in zip(groups, pool.map(imported_after, groups), strict=True):
            above = sorted(m for m in loaded if m.split(".")[1:2] in ([a] for a in ABOVE[layer]) or m in CLIS)
            assert not above, f"{group} import {above}"


def python_files() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private:
                    offenders.append(f"{path.relative_to(SRC)}: from {node.module} import {private}")
    assert not offenders


def test_imports_sit_at_the_top_of_modules():
    """Function-local imports hide dependencies and import cycles; only optional packages may use them."""
    offenders = []
    for path in python_files():
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    names = (
                        [node.module or ""]
                        if isinstance(node, ast.ImportFrom)
                        else [a.name for a in node.names]
                    )
                    if not any(n.split(".")[0] in OPTIONAL for n in names):
                        offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {names}")
    assert not offenders


def test_the_top_level_holds_only_the_bottom_modules_and_the_clis():
    top = sorted(p.stem for p in SRC.glob("*.py"))
    assert top == sorted(["__init__", *BOTTOM, *(m.split(".")[1] for m in CLIS)])
