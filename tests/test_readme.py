"""The README's Python example must run as written (with the tiny stand-in models it uses)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 10
    assert (tmp_path / "outputs/modpo-demo/adapter/adapter_config.json").exists()
    assert any("margin/brevity" in entry for entry in trainer.state.log_history)


def test_every_top_level_export_resolves():
    import modpo_trl

    for name in modpo_trl.__all__:
        assert getattr(modpo_trl, name).__name__ == name
