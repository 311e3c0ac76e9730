"""A reward function's cache key follows its behaviour: code, the code it reaches in its package, and the values
it reads (closures, defaults, globals, bound state); when that cannot be known, nothing is cached."""

import functools
import importlib
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from modpo_trl import FunctionReward
from modpo_trl.rewards import callables
from modpo_trl.rewards.callables import Unfingerprintable, callable_fingerprint
from modpo_trl.rewards.scorers import brevity

SCORES = """
from .helpers import helper

SCALE = 2.0
STOPWORDS = {"a", "the", "of"}


def score(prompts, responses):
    return [SCALE * helper(r) for r in responses]


class Scorer:
    def __init__(self, weight):
        self.weight = weight

    def __call__(self, prompts, responses):
        return [self.weight * len(r) for r in responses]


def with_stopwords(prompts, responses):
    return [sum(w not in STOPWORDS for w in r.split()) for r in responses]
"""
HELPERS = """
def helper(response):
    return float(len(response))
"""


FACTORY = """

def make(weight):
    def scorer(prompts, responses):
        return [weight * len(r) for r in responses]

    return scorer
"""


def key(fn) -> str:
    """The score cache's key part for a reward function."""
    return FunctionReward(fn).fingerprint()


@pytest.fixture
def package(tmp_path, monkeypatch):
    """`write(**files)` (re)writes the package `rewardpkg` in a temporary folder and imports it afresh, as a new
    process would after the files were edited."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    root = tmp_path / "rewardpkg"
    root.mkdir()

    def write(**files):
        for name, text in {"__init__": "", **files}.items():
            (root / f"{name}.py").write_text(textwrap.dedent(text))
        for name in [m for m in sys.modules if m == "rewardpkg" or m.startswith("rewardpkg.")]:
            del sys.modules[name]
        importlib.invalidate_caches()
        return importlib.import_module("rewardpkg.scores")

    yield write
    for name in [m for m in sys.modules if m == "rewardpkg" or m.startswith("rewardpkg.")]:
        del sys.modules[name]


def test_editing_a_function_body_changes_its_key(package):
    before = key(package(scores=SCORES, helpers=HELPERS).score)
    assert key(package(scores=SCORES, helpers=HELPERS).score) == before  # re-imported, same code
    edited = SCORES.replace("SCALE * helper(r)", "SCALE * helper(r) + 1")
    assert key(package(scores=edited, helpers=HELPERS).score) != before


def test_editing_a_helper_in_another_module_of_the_package_changes_the_key(package):
    before = key(package(scores=SCORES, helpers=HELPERS).score)
    edited = HELPERS.replace("float(len(response))", "-float(len(response))")
    assert key(package(scores=SCORES, helpers=edited).score) != before


def test_a_module_constant_changed_at_run_time_changes_the_key(package):
    module = package(scores=SCORES, helpers=HELPERS)
    before = key(module.score)
    module.SCALE = 3.0  # e.g. set from an environment variable at import
    assert key(module.score) != before


def test_a_callable_objects_state_and_call_method_are_in_the_key(package):
    module = package(scores=SCORES, helpers=HELPERS)
    one, two = module.Scorer(1.0), module.Scorer(2.0)
    assert key(one) != key(two)
    assert key(one) == key(module.Scorer(1.0))
    edited = package(
        scores=SCORES.replace("self.weight * len(r)", "self.weight * len(r) ** 2"), helpers=HELPERS
    )
    assert key(edited.Scorer(1.0)) != key(one)
    assert key(one.__call__) != key(two.__call__)  # a bound method's object


def test_closures_defaults_and_partials_are_in_the_key():
    def make(scale):
        return lambda prompts, responses: [scale * len(r) for r in responses]

    def shifted(prompts, responses, shift=1.0):
        return [len(r) + shift for r in responses]

    def copy_of_shifted(prompts, responses, shift=2.0):
        return [len(r) + shift for r in responses]

    assert key(make(1.0)) != key(make(2.0))
    assert key(make(1.0)) == key(make(1.0))
    assert key(shifted) != key(copy_of_shifted)
    assert key(functools.partial(shifted, shift=1)) != key(functools.partial(shifted, shift=2))


def test_the_key_is_the_same_in_another_process(package):
    """The processes of a sweep (and `accelerate launch`) share the cache: a set of strings, whose order
    follows per-process string hashing, must not change the key."""
    module = package(scores=SCORES, helpers=HELPERS)
    here = [key(f) for f in (module.with_stopwords, module.Scorer(2.0), brevity)]
    code = (
        "from modpo_trl import FunctionReward; f = lambda fn: FunctionReward(fn).fingerprint(); "
        "from modpo_trl.rewards.scorers import brevity; import rewardpkg.scores as m; "
        "print(f(m.with_stopwords), f(m.Scorer(2.0)), f(brevity))"
    )
    env = {"PYTHONHASHSEED": "123", "PYTHONPATH": f"{Path(module.__file__).parents[1]}:{':'.join(sys.path)}"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == here


def test_unknowable_state_is_not_cached_unless_a_version_is_given():
    lock = threading.Lock()

    def locked(prompts, responses):
        with lock:
            return [0.0] * len(responses)

    with pytest.raises(Unfingerprintable, match="lock"):
        callable_fingerprint(locked)
    source = FunctionReward(locked)
    with pytest.warns(UserWarning, match=r"'locked': its scores are not cached.*lock.*version="):
        assert not source.cacheable
    assert source.fingerprint() == source.fingerprint()  # stable for this instance ...
    assert FunctionReward(locked).fingerprint() != source.fingerprint()  # ... and matched by no other

    versioned = FunctionReward(locked, version="2024-06-01")
    assert versioned.cacheable
    assert versioned.fingerprint() == FunctionReward(locked, version="2024-06-01").fingerprint()
    assert versioned.fingerprint() != FunctionReward(locked, version="2").fingerprint()
    with pytest.raises(ValueError, match="version=3 must be a non-empty string"):
        FunctionReward(locked, version=3)


def test_a_library_functions_closure_is_in_the_key(package, monkeypatch):
    """A scorer made by an installed library's factory is keyed by the library's version and by the values it was
    made with."""
    module = package(scores=SCORES + FACTORY, helpers=HELPERS)
    monkeypatch.setattr(callables, "_install_roots", lambda: (str(Path(module.__file__).parents[1]) + "/",))
    assert key(module.make(1.0)) != key(module.make(2.0))
    assert key(module.make(1.0)) == key(module.make(1.0))
