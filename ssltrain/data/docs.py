"""The text that ships with every Python: the interpreter's help topics and the standard library's
docstrings, read as documents without a download (data=docs, and the docs_topics task)."""

from __future__ import annotations

import ast
import inspect
import sysconfig
from pathlib import Path

_SKIP_STDLIB_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def pydoc_topic_documents() -> list[dict]:
    """The interpreter's help topics (`help('FOR')`, ...): ~465 KB of reference prose."""
    from pydoc_data.topics import topics

    return [{"title": f"topic:{name}", "source": "topic", "text": topics[name].strip()} for name in sorted(topics)]


def stdlib_docstring_documents(stdlib_dir: str | None = None) -> list[dict]:
    """One document per standard-library module: its docstrings in source order.

    Parsed with `ast`, never imported, so no module's import side effects run.
    """
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_STDLIB_PARTS.intersection(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        parts = [d for d in (_docstring(node) for node in _in_source_order(tree)) if d]
        if parts:
            module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            docs.append({"title": f"module:{module}", "source": "module", "text": "\n\n".join(parts)})
    return docs


def _in_source_order(node):
    yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _in_source_order(child)


def _docstring(node) -> str | None:
    text = ast.get_docstring(node, clean=False)
    return inspect.cleandoc(text) if text else None
