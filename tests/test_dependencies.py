"""pyproject.toml declares what the code imports, and nothing it doesn't use."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parent.parent
OWN = ("trainer", "launch", "benchmarks")
# Declared but never imported by our code: what each is for.
USED_WITHOUT_IMPORT = {
    "deepspeed": "ZeRO through accelerate (the cluster profiles' zero_stage)",
    "tensorboard": "log.trackers=[tensorboard] through accelerate",
    "safetensors": "the weights format transformers saves and loads",
}


def normalized(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalized(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])


def declared() -> tuple[set[str], set[str]]:
    """(the core dependencies, those plus every extra)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {requirement_name(r) for r in project["dependencies"]}
    extras = {requirement_name(r) for rs in project["optional-dependencies"].values() for r in rs}
    return core, core | extras


def imported_modules() -> dict[str, str]:
    """Top-level third-party modules our packages import (absolute imports, lazy ones in
    functions too), each with one file that imports it."""
    found: dict[str, str] = {}
    for package in OWN:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in OWN:
                        found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_every_imported_module_is_declared():
    _, everything = declared()
    owners = packages_distributions()
    missing = []
    for module, where in imported_modules().items():
        distributions = {normalized(d) for d in owners.get(module, [module])}
        if not distributions & everything:
            missing.append(f"{module} ({where}; distribution {', '.join(sorted(distributions))})")
    assert not missing, "imported but not declared in pyproject.toml: " + "; ".join(missing)
    assert {"tokenizers", "filelock", "pyarrow"} <= declared()[0]


def test_every_core_dependency_is_used():
    core, _ = declared()
    owners = packages_distributions()
    used = {normalized(d) for m in imported_modules() for d in owners.get(m, [m])}
    unused = core - used - set(USED_WITHOUT_IMPORT)
    assert not unused, f"declared in pyproject.toml but never imported: {sorted(unused)}"
    assert "seqeval" not in core and "evaluate" not in core


# --- what a run imports, and the environment it leaves --------------------------------------

RUN_AND_REPORT = """
import json, os, sys
from trainer.cli import main
config, run_dir, data = sys.argv[1:]
codes = [main(["train", config]), main(["evaluate", run_dir + "/final", "--data", data])]
print(json.dumps({
    "codes": codes,
    "seqeval": sorted(m for m in sys.modules if m.split(".")[0] in ("seqeval", "sklearn")),
    "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM"),
}))
"""


@pytest.mark.slow  # a subprocess that trains and evaluates: ~14 s on 2 shared cores
def test_a_classification_run_imports_no_seqeval_and_keeps_tokenizers_parallel(
    run_config, tmp_path, data_dir
):
    config = run_config("classification", train={"max_steps": 2, "epochs": 0})
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN_AND_REPORT,
            config,
            tmp_path / "run",
            data_dir / "sentiment_validation.csv",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**env, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report == {"codes": [0, 0], "seqeval": [], "TOKENIZERS_PARALLELISM": None}
