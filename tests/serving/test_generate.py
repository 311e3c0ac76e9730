"""python -m modpo_trl.generate: prompts on the command line, the JSONL mode, and its errors (exit status 2, before
the model loads)."""

import json
import re
import subprocess
import sys

import pytest

from modpo_trl.generate import main
from modpo_trl.serving.front import ParetoSet
from modpo_trl.serving.generators import TransformersGenerator

GREEDY = ["--greedy", "--max-new-tokens", "5"]
SETTINGS = {"do_sample": False, "max_new_tokens": 5}


def chat(text):
    return [{"role": "user", "content": text}]


def test_prompts_on_the_command_line(sweep, capsys):
    assert main([str(sweep), "--weights", "0.6,0.4", "--strategy", "mod", *GREEDY, "tell me a story"]) == 0
    out, err = capsys.readouterr()
    # the recipe's eval prompts are conversational: a text prompt is the user's message
    expected = ParetoSet(sweep).generate([chat("tell me a story")], [0.6, 0.4], "mod", **SETTINGS)
    assert out == expected[0] + "\n"
    assert "w=[0.6, 0.4] via mod: mod w-0.60-0.40" in err

    assert main([str(sweep), "--weights", "0.6,0.4", *GREEDY, "--format", "plain", "why", "hello"]) == 0
    out = capsys.readouterr().out.splitlines()
    expected = ParetoSet(sweep).generate(["why", "hello"], [0.6, 0.4], "nearest", **SETTINGS)
    assert [json.loads(line) for line in out] == expected  # several answers: one JSON string per line


def test_jsonl_in_jsonl_out(sweep, tmp_path):
    requests = [
        {"prompt": "tell me a story", "id": 1},
        {"prompt": chat("why"), "weights": [1.0, 0.0], "strategy": "soup", "id": 2},
        {"prompt": "hello", "strategy": "mod", "id": 3},
        {"prompt": "what is this", "weights": "0.2,0.8", "id": 4},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests) + "\n")
    out = tmp_path / "out.jsonl"
    args = [str(sweep), "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--weights", "0.6,0.4"]
    assert main([*args, *GREEDY]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["id"] for a in answers] == [1, 2, 3, 4]  # the input's order
    assert [(a["weights"], a["strategy"]) for a in answers] == [
        ([0.6, 0.4], "nearest"),
        ([1.0, 0.0], "soup"),
        ([0.6, 0.4], "mod"),
        ([0.2, 0.8], "nearest"),
    ]
    assert answers[1]["prompt"] == chat("why") and answers[2]["prompt"] == "hello"  # as given
    assert answers[0]["served_by"]["adapter"] == "w-0.50-0.50"
    assert answers[1]["served_by"]["soup"] == [{"adapter": "w-1.00-0.00", "coefficient": 1.0}]
    assert [m["adapter"] for m in answers[2]["served_by"]["mixture"]] == ["w-1.00-0.00", "w-0.20-0.80"]
    front = ParetoSet(sweep)
    assert answers[2]["response"] == front.generate([chat("hello")], [0.6, 0.4], "mod", **SETTINGS)[0]
    assert answers[1]["response"] == front.generate([chat("why")], [1.0, 0.0], "soup", **SETTINGS)[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--weights", "0.5", "hi"],
            r"prompt 1: weights=\[0.5\] must be a list of 2 numbers, one per objective",
        ),
        (["--weights", "0.5,0.6", "hi"], r"prompt 1: weights=\[0.5, 0.6\] sums to 1.1, not 1"),
        (["--weights", "0.5,x", "hi"], r"--weights='0.5,x' is not a comma-separated list of numbers"),
        (["hi"], r"prompt 1: no weights; give --weights"),
        (["--weights", "0.5,0.5", "--strategy", "best", "hi"], r"strategy='best' is not valid; valid: \["),
        (
            ["--weights", "0.5,0.5", "--strategy", "conditioned", "hi"],
            r"strategy='conditioned' cannot serve the modpo run",
        ),
        (["--weights", "0.1,0.9", "--strategy", "soup", "hi"], r"weights=\[0.1, 0.9\] lie outside"),
        (
            ["--weights", "0.5,0.5", "--temperature", "0", "--sample", "hi"],
            r"sampling: temperature=0.0 must be",
        ),
        (["--weights", "0.5,0.5"], "give prompts on the command line or --input FILE"),
        (["--weights", "0.5,0.5", "--output", "x.jsonl", "hi"], "--output writes the JSONL mode's answers"),
    ],
)
def test_bad_requests(sweep, monkeypatch, capsys, args, message):
    monkeypatch.setattr(
        TransformersGenerator, "__init__", lambda *a, **k: pytest.fail("the model was loaded")
    )
    assert main([str(sweep), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modpo_trl.generate: error: ")
    assert re.search(message, err), err


def test_bad_jsonl(sweep, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        TransformersGenerator, "__init__", lambda *a, **k: pytest.fail("the model was loaded")
    )
    path = tmp_path / "in.jsonl"
    for text, message in [
        ('{"prompt": "hi"}\nnot json\n', "line 2: not JSON"),
        ('{"text": "hi"}\n', "line 1: needs a `prompt`"),
        ('{"prompt": "hi", "weights": [0.2, 0.2]}\n', "line 1: weights=[0.2, 0.2] sums to 0.4"),
        ("\n", "no requests"),
    ]:
        path.write_text(text)
        assert main([str(sweep), "--input", str(path), "--weights", "0.5,0.5"]) == 2
        assert message in capsys.readouterr().err
    assert main([str(sweep), "--input", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err


def test_missing_run_directory_from_the_module(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "modpo_trl.generate", str(tmp_path / "nope"), "--weights", "0.5,0.5", "hi"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (  # the last line: libraries may log before it
        f"modpo_trl.generate: error: {tmp_path / 'nope'} does not exist: give a run directory (with "
        "manifest.json) or its recipe YAML"
    )
