"""`python -m modpo_trl.evaluate --dry-run`: validates, lists the candidates and which responses would be
generated, and loads no model."""

import pytest
import transformers

from modpo_trl.evaluate import main
from modpo_trl.evaluation import pipeline

from .test_pipeline import sweep, sweep_template  # noqa: F401 (fixtures)


def test_dry_run_lists_candidates_and_loads_no_model(sweep, monkeypatch, capsys):  # noqa: F811
    def no_model(*args, **kwargs):
        raise AssertionError("the dry run loaded a model")

    with monkeypatch.context() as patched:
        patched.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
        patched.setattr(pipeline, "generate_all", no_model)
        assert main([str(sweep), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        f"# {sweep}: 5 candidate(s), 5 to generate, 5 prompt(s), backend transformers, max_new_tokens 5, "
        "sampling, seed 0"
    )
    assert out[1] == "# scorers: ['length', 'positive']"
    assert out[2].split() == ["candidate", "model", "responses"]
    rows = {line.split(maxsplit=1)[0]: line.split(maxsplit=1)[1].split("  ")[0] for line in out[3:]}
    assert rows == {
        "reference-base": "base model",
        "modpo-w-1.00-0.00": "w-1.00-0.00",
        "modpo-w-0.50-0.50": "w-0.50-0.50",
        "modpo-w-0.20-0.80": "w-0.20-0.80",
        "rewarded_soups-w-0.50-0.50": "0.375 w-1.00-0.00 + 0.625 w-0.20-0.80",  # the soup's coefficients
    }
    assert all(line.endswith("  generate") for line in out[3:])
    assert not (sweep / "eval").exists()  # nothing written

    main([str(sweep)])  # a real evaluation fills the caches
    capsys.readouterr()
    assert main([str(sweep), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "5 candidate(s), 0 to generate" in out[0] and all(line.endswith("cached") for line in out[3:])
    assert main([str(sweep), "--dry-run", "--force"]) == 0
    assert "5 to generate" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override,message", [("eval.num_prompts=0", "eval.num_prompts=0 must be >= 1"), ("eval.backend=x", "x")]
)
def test_dry_run_rejects_bad_eval_settings(sweep, override, message, capsys):  # noqa: F811
    assert main([str(sweep), override, "--dry-run"]) == 2
    assert message in capsys.readouterr().err
