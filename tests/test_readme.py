"""The README's Python example must run as written (with the tiny stand-in models it uses); the README stays a
short front door, and every relative link in it and in docs/ points to a file (and heading) that exists."""

import importlib
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples/quickstart/README.md"]
README_MAX_BYTES = 12 * 1024

# [text](target) and ![alt](target); the alt text of the figures spans lines.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


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


def test_readme_is_a_short_front_door():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes (limit {README_MAX_BYTES}): move detail to docs/"
    )


def github_anchor(heading: str) -> str:
    """The id GitHub gives a markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # '# ...' inside code blocks is no heading
    return {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]  # skip https:, mailto:


def test_github_anchor():
    assert github_anchor("`MOCConfig(DPOConfig)` and `MOCTrainer(DPOTrainer)`") == (
        "mocconfigdpoconfig-and-moctrainerdpotrainer"
    )
    assert github_anchor("30-second quickstart") == "30-second-quickstart"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    links = relative_links(page)
    broken = []
    for link in links:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link}: no heading #{anchor} in {target.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_docs_pages_are_linked_from_the_readme():
    linked = {(README.parent / link.partition("#")[0]).resolve() for link in relative_links(README)}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


@pytest.mark.parametrize("result", sorted((ROOT / "docs/results").glob("*.json")), ids=lambda p: p.name)
def test_measured_results_say_where_they_come_from(result):
    record = json.loads(result.read_text())
    missing = [key for key in ("command", "date", "source") if not record.get(key)]
    assert not missing, f"{result.name} lacks {missing}: say how the numbers were produced"


@pytest.mark.parametrize("page", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_docs_python_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S):
        exec(compile(block, str(page), "exec"), {})


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_modules_and_objects_exist(page):
    """Every `modpo_trl.x.y` (or `module:function`) the docs name imports: no stale path after a move."""
    missing = []
    for name in sorted(set(re.findall(r"\bmodpo_trl(?:\.[A-Za-z_]\w*)+(?::\w+)?", page.read_text()))):
        parts = name.replace(":", ".").split(".")
        for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            try:
                for attr in parts[i:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(name)
            break
    assert not missing, f"{page.relative_to(ROOT)} names what does not exist: {missing}"
