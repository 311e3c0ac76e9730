"""Bad input to `python -m modpo_trl.train`: every case ends with one `modpo_trl.train: error: ...` paragraph
naming the key or file, the value and what is valid, exit status 2, before the policy is loaded, and leaves no
folder behind. Reward outputs need the reward model: they are checked right after it is loaded, still before the
policy."""

import json
import math
import re
from pathlib import Path

import pytest
import transformers
from datasets import Dataset

from modpo_trl.testing import tiny_causal_lm, tiny_reward_model, tiny_tokenizer
from modpo_trl.train import main

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "tiny_modpo.yaml"
PAIRS = REPO / "tests" / "data" / "tiny_pairs.jsonl"
HERE = "tests.runs.test_bad_input"


# reward functions a user might write
def returns_nan(prompts, responses):
    return [0.0] * (len(responses) - 1) + [math.nan]


def returns_inf(prompts, responses):
    return [math.inf] * len(responses)


def returns_none(prompts, responses):
    return None


def returns_strings(prompts, responses):
    return ["good"] * len(responses)


def returns_one_too_few(prompts, responses):
    return [1.0] * (len(responses) - 1)


def raises(prompts, responses):
    raise KeyError("score")


NOT_CALLABLE = 3


def jsonl(rows: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Saved tiny models and data files, good and bad; returns their folder."""
    root = tmp_path_factory.mktemp("inputs")
    tokenizer = tiny_tokenizer()
    two = tiny_reward_model(tokenizer, num_labels=2)
    two.config.id2label = {0: "helpful", 1: "harmless"}
    for name, model in [
        ("policy", tiny_causal_lm(tokenizer)),
        ("rm", tiny_reward_model(tokenizer)),
        ("rm2", two),
    ]:
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    tiny_causal_lm(tokenizer).save_pretrained(root / "no-tokenizer")
    (root / "empty-model").mkdir()
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    rated = [
        {"prompt": p["prompt"], "response": p[c], "score": s}
        for p in pairs
        for c, s in (("chosen", 2), ("rejected", 1))
    ]
    text = {
        "null-prompt.jsonl": jsonl([{**pairs[0], "prompt": None}, *pairs[1:]]),
        "numeric-prompt.jsonl": jsonl([*pairs[:2], {**pairs[2], "prompt": 5}]),
        "empty.jsonl": "",
        "malformed.jsonl": jsonl(pairs[:3]) + '{"prompt": "x", "chosen": "y"\n' + jsonl(pairs[3:]),
        "ratings-as-strings.jsonl": jsonl(
            [{**r, "score": "good" if i == 3 else "bad"} for i, r in enumerate(rated)]
        ),
    }
    for name, content in text.items():
        (root / name).write_text(content)
    # NaN and inf survive in parquet (a CSV reader makes "nan" a null)
    Dataset.from_list(
        [{**r, "score": math.nan if i == 2 else r["score"]} for i, r in enumerate(rated)]
    ).to_parquet(root / "ratings-nan.parquet")
    Dataset.from_list(
        [{**r, "score": math.inf if i == 5 else r["score"]} for i, r in enumerate(rated)]
    ).to_parquet(root / "ratings-inf.parquet")
    Dataset.from_list(
        [{**p, "c": math.nan if i == 4 else 1.0, "r": 0.0} for i, p in enumerate(pairs)]
    ).to_parquet(root / "columns-nan.parquet")
    (root / "latin1.jsonl").write_bytes(
        jsonl(pairs[:2]).encode() + '{"prompt": "café", "chosen": "a", "rejected": "b"}\n'.encode("latin-1")
    )
    (root / "list.yaml").write_text("- run_name: x\n- model: y\n")
    (root / "syntax.yaml").write_text("run_name: tiny\nmodel: {path: x\n")
    (root / "a-file").write_text("not a folder")
    return root


def function(name: str) -> str:
    return f"objectives.1.reward={{type: function, function: '{HERE}:{name}'}}"


def data(name: str, **extra: str) -> str:
    fields = ", ".join([f"path: '{{files}}/{name}'", *(f"{k}: {v}" for k, v in extra.items())])
    return f"objectives.0.data={{{fields}}}"


RATINGS = {"format": "ratings", "rating_column": "score"}
COLUMNS = "objectives.1.reward={type: columns, chosen_column: c, rejected_column: r}"
# (case id, overrides ({files} is the folder of the `files` fixture), what the message must contain)
CASES = [
    # silently accepted before
    ("beta-zero", ["training.beta=0"], r"training.beta=0 .*valid: a number > 0"),
    ("beta-negative", ["training.beta=-0.1"], r"training.beta=-0.1 .*valid: a number > 0"),
    (
        "max-length-huge",
        ["training.max_length=100000000"],
        r"training.max_length=100000000 .*max_position_embeddings=256.*valid: 1\.\.256",
    ),
    (
        "ratings-nan",
        [data("ratings-nan.parquet", **RATINGS)],
        r"ratings-nan.parquet.*row 2.*score.*nan.*valid: a finite number",
    ),
    (
        "ratings-inf",
        [data("ratings-inf.parquet", **RATINGS)],
        r"ratings-inf.parquet.*row 5.*score.*inf.*valid: a finite number",
    ),
    ("run-name-path", ["run_name=../../elsewhere"], r"run_name='../../elsewhere'.*valid: a plain name"),
    # tracebacks after the policy was loaded before
    (
        "function-nan",
        [function("returns_nan")],
        r"reward.*returns_nan.*non-finite score \(nan\) at row 3 \(chosen\)",
    ),
    ("function-inf", [function("returns_inf")], r"reward.*returns_inf.*non-finite score \(inf\) at row 0"),
    (
        "function-none",
        [function("returns_none")],
        r"reward.*returns_none.*returned None.*valid: a list \(or tensor\) of numbers",
    ),
    (
        "function-strings",
        [function("returns_strings")],
        r"reward.*returns_strings.*returned \['good'.*valid: a list \(or tensor\) of numbers",
    ),
    (
        "function-count",
        [function("returns_one_too_few")],
        r"reward.*returns_one_too_few.*returned 3 scores for a batch of 4",
    ),
    (
        "function-raises",
        [function("raises")],
        r"reward.*function='tests.runs.test_bad_input:raises' raised KeyError: 'score'",
    ),
    (
        "columns-nan",
        [data("columns-nan.parquet"), COLUMNS],
        r"reward.*non-finite score \(nan\) at row 4 \(chosen\)",
    ),
    (
        "prompt-null",
        [data("null-prompt.jsonl")],
        r"null-prompt.jsonl.*row 0.*'prompt'.*None.*valid: a string, or a list of chat messages",
    ),
    (
        "prompt-number",
        [data("numeric-prompt.jsonl")],
        r"numeric-prompt.jsonl.*row 2.*'prompt'.*5.*valid: a string, or a list of chat messages",
    ),
    ("columns-missing", [COLUMNS], r"column\(s\) \['c', 'r'\] not in the dataset; available columns"),
    ("lora-r-zero", ["lora.r=0"], r"lora.r=0 .*valid: an integer >= 1"),
    ("lora-dropout", ["lora.dropout=2"], r"lora.dropout=2.0 .*valid: 0 <= dropout < 1"),
    (
        "lora-modules",
        ["lora.target_modules=[q_proj,nope]"],
        r"lora.target_modules.*'nope'.*valid: .*'q_proj'",
    ),
    ("lr-negative", ["training.learning_rate=-1"], r"training.learning_rate=-1 .*valid: a number >= 0"),
    ("lr-string", ["training.learning_rate=fast"], r"training.learning_rate='fast' .*valid: a number"),
    ("max-length-zero", ["training.max_length=0"], r"training.max_length=0 .*valid: an integer >= 1"),
    ("max-length-negative", ["training.max_length=-5"], r"training.max_length=-5 .*valid: an integer >= 1"),
    ("max-samples-zero", ["objectives.0.data.max_samples=0"], r"max_samples=0 .*valid: an integer >= 1"),
    (
        "max-samples-negative",
        ["objectives.0.data.max_samples=-1"],
        r"max_samples=-1 .*valid: an integer >= 1",
    ),
    ("max-steps-string", ["training.max_steps=ten"], r"training.max_steps='ten' .*valid: an integer"),
    (
        "rm-unknown-output",
        ["objectives.1.reward.output=kind"],
        r"reward.*output='kind' is not a label of the model; valid: \['LABEL_0'\]",
    ),
    (
        "rm-two-outputs",
        ["objectives.1.reward.path={files}/rm2"],
        r"has 2 outputs \(\['helpful', 'harmless'\]\).*output=",
    ),
    (
        "rm-causal-lm",
        ["objectives.1.reward.path={files}/policy"],
        r"reward.path=.*policy.*causal language model.*type: implicit",
    ),
    (
        "batch-size-zero",
        ["training.per_device_train_batch_size=0"],
        r"per_device_train_batch_size=0 .*valid: an integer >= 1",
    ),
    # tracebacks before loading
    ("data-not-utf8", [data("latin1.jsonl")], r"latin1.jsonl.*line 3.*not UTF-8"),
    ("recipe-syntax", ["@{files}/syntax.yaml"], r"syntax.yaml.*YAML.*line 2"),
    ("recipe-list", ["@{files}/list.yaml"], r"list.yaml.*must be a mapping of sections.*got a list"),
    ("override-value", ["training.beta=[0.1"], r"override 'training.beta=\[0.1'.*YAML"),
    (
        "function-not-callable",
        [function("NOT_CALLABLE")],
        r"function='tests.runs.test_bad_input:NOT_CALLABLE' is an int, not callable",
    ),
    (
        "ratings-strings",
        [data("ratings-as-strings.jsonl", **RATINGS)],
        r"row 0.*score.*'bad'.*valid: a finite number",
    ),
    (
        "output-under-a-file",
        ["output_dir={files}/a-file/out"],
        r"output_dir='.*a-file/out' cannot be created",
    ),
    ("output-in-proc", ["output_dir=/proc/modpo-out"], r"output_dir='/proc/modpo-out' cannot be created"),
    # unclear before
    ("data-empty", [data("empty.jsonl")], r"empty.jsonl.*holds no rows"),
    ("data-malformed-line", [data("malformed.jsonl")], r"malformed.jsonl', line 4: not valid JSON"),
    # late but clear before
    (
        "hub-id-offline",
        ["model.path=someone/not-cached"],
        r"model.path='someone/not-cached'.*not in the local Hugging Face cache.*HF_HUB_OFFLINE",
    ),
    ("model-folder-empty", ["model.path={files}/empty-model"], r"model.path=.*empty-model.*no config.json"),
    (
        "tokenizer-missing",
        ["model.path={files}/no-tokenizer"],
        r"could not load a tokenizer from .*no-tokenizer",
    ),
]


@pytest.mark.parametrize("overrides,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_before_the_policy_loads(
    files, overrides, message, tmp_path, monkeypatch, capsys
):
    def policy_loaded(*args, **kwargs):
        raise AssertionError("the policy was loaded before the bad input was found")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", policy_loaded)
    out = tmp_path / "out"
    overrides = [o.replace("{files}", str(files)) for o in overrides]
    recipe = next((o[1:] for o in overrides if o.startswith("@")), str(TINY))
    base = [
        f"model.path={files / 'policy'}",
        f"objectives.0.data.path={PAIRS}",
        f"objectives.1.reward.path={files / 'rm'}",
        f"output_dir={out}",
    ]
    assert main([recipe, *base, *(o for o in overrides if not o.startswith("@"))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modpo_trl.train: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists() or not any(out.iterdir())  # no run folder, no `.w-*.tmp/`
