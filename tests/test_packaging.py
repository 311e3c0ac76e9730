"""The package as installed: every imported third-party package is declared in setup.cfg, importing the CLIs
prints nothing a user cannot act on, and `make help` lists every target."""

import ast
import configparser
import importlib.metadata
import logging
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CODE = ("src", "tests", "benchmarks", "examples")


def declared() -> set[str]:
    """Distribution names in install_requires and every extra, normalised (PEP 503)."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    lines = config["options"]["install_requires"].splitlines()
    lines += [line for extra in config["options.extras_require"].values() for line in extra.splitlines()]
    names = [re.split(r"[<>=!~;\[ ]", line.strip())[0] for line in lines if line.strip() and line[0] != "#"]
    return {re.sub(r"[-_.]+", "-", n).lower() for n in names if n}


def imported_modules() -> set[str]:
    """Top-level names of every `import` in the code, minus the standard library and the code's own modules."""
    local = {p.stem for folder in CODE for p in (REPO / folder).rglob("*.py")} | set(CODE) | {"modpo_trl"}
    local |= {p.name for folder in CODE for p in (REPO / folder).rglob("*") if p.is_dir()}
    names = set()
    for folder in CODE:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - local - {"__future__"}


def test_every_imported_package_is_declared():
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(imported_modules()):
        # a module not installed here (vllm) must still be declared under its own name, as an extra
        names = distributions.get(module, [module])
        if not {re.sub(r"[-_.]+", "-", n).lower() for n in names} & declared():
            missing[module] = names
    assert not missing, f"imported but not declared in setup.cfg: {missing}"


def test_importing_the_clis_prints_nothing():
    """Nothing on import; of transformers' deprecation notices, only the one peft and TRL trigger is dropped."""
    code = (
        "import warnings\n"
        "import modpo_trl.train, modpo_trl.evaluate, modpo_trl.reward_modeling\n"
        "warnings.warn('`is_gradient_checkpointing` is deprecated and will be removed in v6.', FutureWarning)\n"
        "warnings.warn('`gradient_checkpointing` is deprecated and will be removed in v6.', FutureWarning)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0 and done.stdout == "", done.stderr
    assert (
        done.stderr
        == "<string>:4: FutureWarning: `gradient_checkpointing` is deprecated and will be removed in v6.\n"
    )


def test_only_the_bitsandbytes_cpu_kernel_notice_is_dropped(caplog):
    import modpo_trl  # noqa: F401 (installs the filters)

    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        cpu_ops.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "offline"
        )
        logging.getLogger("kernels._internals.hf_hub").warning(
            "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because ..."
        )
        cpu_ops.warning("some other CPU backend problem")
        logging.getLogger("bitsandbytes.cextension").warning("Could not find the CUDA runtime library")
    assert [r.getMessage() for r in caplog.records] == [
        "some other CPU backend problem",
        "Could not find the CUDA runtime library",
    ]


def test_make_help_lists_every_target():
    makefile = (REPO / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split()
    done = subprocess.run(["make", "-s", "help"], capture_output=True, text=True, cwd=REPO, timeout=60)
    listed = [line.split()[0] for line in done.stdout.splitlines()]
    assert sorted(listed) == sorted(t for t in phony if t != "help")
