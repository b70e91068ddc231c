"""The house rules the layout keeps: no import cycle between the project's modules (lazy
imports inside functions count, imports for type checking only do not), no module in
trainer/ or launch/ over 500 lines, no function over 60, and `import trainer.config`
(which rejects a bad config before anything heavy loads) free of torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "launch", "benchmarks")


def project_modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the project's packages."""
    modules = {}
    for package in PACKAGES:
        if not (REPO / package / "__init__.py").is_file():
            continue
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def imported(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports anywhere, outside `if TYPE_CHECKING:` blocks."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}: a relative import (the project names modules in full)"
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {module for module in found if module in modules and module != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def test_no_import_cycle_between_the_project_modules():
    modules = project_modules()
    graph = {name: imported(path, name, modules) for name, path in modules.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_over_500_lines_and_no_function_over_60():
    too_long = []
    for package in ("trainer", "launch"):
        for path in sorted((REPO / package).rglob("*.py")):
            text = path.read_text()
            if text.count("\n") > 500:
                too_long.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > 60:
                        too_long.append(f"{path.relative_to(REPO)}:{node.name}: {length} lines")
    assert not too_long, too_long


def test_config_validation_imports_nothing_heavy():
    """A bad config is rejected in well under a second: the config module, the task specs
    it reads and the validation they run import no torch, transformers or datasets."""
    probe = (
        "import sys\n"
        "from trainer.config import build_config\n"
        "raw = {'task': 'mlm', 'model': {'name_or_path': 'm'}, 'eval': {'metric': 'f1'}}\n"
        "try:\n"
        "    build_config(raw, for_training=False)\n"
        "except Exception as err:\n"
        "    print(type(err).__name__)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["UserError", "[]"]  # eval.metric f1 is not an MLM metric
