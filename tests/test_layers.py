"""The package's layering, checked by machine: import-linter's contracts in pyproject.toml (imports
inside functions included), no import cycle between modules, function-local imports only where a
comment says why, and the shipped configs read in one place."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ssltrain"


def test_the_import_contracts_hold():
    """Catches an import from a higher layer (data importing objectives, objectives importing train or
    config, models importing data, ...), at module level or inside a function: lint-imports fails."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint, "import-linter is a dev dependency (pip install -e '.[dev]')"
    proc = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_module_imports_itself_through_others():
    """Catches an import cycle (checkpoint <-> faults, data.corpus <-> data.labelled, ...), which a
    function-local import can hide from the interpreter but not from this graph of every import."""
    graph = grimp.build_graph("ssltrain")
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    """The check above could pass by never finding anything: a two-module cycle is reported."""
    graph = grimp.ImportGraph()
    for name in ("pkg", "pkg.a", "pkg.b", "pkg.c"):
        graph.add_module(name)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.a")
    graph.add_import(importer="pkg.c", imported="pkg.a")
    assert _cycles(graph) == [["pkg.a", "pkg.b"]]


def _function_local_imports():
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ssltrain"):
                    yield path.relative_to(ROOT), node.lineno, lines[node.lineno - 1]


def test_function_local_imports_of_the_package_say_why():
    """Catches an import of ssltrain hidden inside a function without a reason: the package's own
    imports sit at module level, except where a `# local:` comment says what keeping them local buys
    (a fast `--help`)."""
    silent = [f"{path}:{line}: {text.strip()}" for path, line, text in _function_local_imports()
              if "# local:" not in text]
    assert silent == []


@pytest.mark.parametrize("needle", ['glob("*.yaml")', "config_dir() /"])
def test_only_paths_reads_the_shipped_configs(needle):
    """Catches a module globbing conf/ itself instead of asking ssltrain.paths.shipped_options."""
    readers = [str(p.relative_to(ROOT)) for p in sorted(PACKAGE.rglob("*.py"))
               if needle in p.read_text() and p.name != "paths.py"]
    assert readers == []
