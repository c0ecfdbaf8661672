"""The dependency rule of DESIGN.md, checked by reading every module's imports with `ast`.

Storeys are the top-level parts of the package (`pagoda.model`, `pagoda.infer`, ...). The base
modules `pagoda` (its __init__), `pagoda.errors`, `pagoda.paths` and `pagoda.configfile` may be
imported by anyone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pagoda"
BASE = {"pagoda", "errors", "paths", "configfile"}

# storey -> storeys it must never import (DESIGN.md, "Dependency rule")
FORBIDDEN = {
    "model": {"infer", "train", "serve", "rag", "agent", "apps", "eval", "cli", "hub", "data",
              "client"},
    "tokenizer": {"infer", "train", "serve", "rag", "agent", "apps", "eval", "cli", "hub", "data",
                  "client"},
    "infer": {"train", "serve", "cli", "eval", "rag", "agent", "apps", "client"},
    # rag, agent and apps reach models only through pagoda.client
    "rag": {"model", "infer", "hub"},
    "agent": {"model", "infer", "hub"},
    "apps": {"model", "infer", "hub"},
}
# storey -> the only storeys it may import (besides itself and the base modules)
ONLY = {"hub": {"model", "tokenizer"}}
# storeys nobody else may import
UNIMPORTABLE = {"eval", "cli"}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def pagoda_imports(source: str, module: str, is_package: bool) -> set[str]:
    """Every `pagoda...` module this source imports, anywhere in the file (functions included)."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "pagoda")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "pagoda":
                continue
            if target == "pagoda":  # `from pagoda import infer` imports the storey pagoda.infer
                found.update(f"pagoda.{a.name}" for a in node.names)
            else:
                found.add(target)
    return found


def storey(module: str) -> str:
    """`pagoda.infer.kernels` -> `infer`; the package itself -> `pagoda`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "pagoda"


def violations(edges: dict[str, set[str]]) -> list[str]:
    """One line per import that breaks the rule: `importer -> imported (why)`."""
    bad = []
    for importer, targets in sorted(edges.items()):
        src = storey(importer)
        for target in sorted(targets):
            dst = storey(target)
            if dst == src or dst in BASE:
                continue
            if dst in UNIMPORTABLE:
                bad.append(f"{importer} -> {target} (nothing may import pagoda.{dst})")
            elif dst in FORBIDDEN.get(src, ()):
                bad.append(f"{importer} -> {target} (pagoda.{src} must not import pagoda.{dst})")
            elif src in ONLY and dst not in ONLY[src]:
                allowed = ", ".join(sorted(ONLY[src] | BASE - {"pagoda"}))
                bad.append(f"{importer} -> {target} (pagoda.{src} may only import {allowed})")
    return bad


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    edges = {}
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        edges[name] = pagoda_imports(path.read_text(encoding="utf-8"), name,
                                     path.name == "__init__.py")
    return edges


def test_the_package_follows_the_dependency_rule():
    edges = import_graph()
    assert "pagoda.infer.generate" in edges and "pagoda.cli" in edges
    bad = violations(edges)
    assert not bad, "imports that break DESIGN.md's dependency rule:\n  " + "\n  ".join(bad)


def test_imports_are_found_in_every_form():
    source = """
import os
import pagoda.hub.store as store
from pagoda.infer import generate
from pagoda import cli, errors
from . import sibling
from ..tokenizer.chat import render_chat

def lazy():
    from pagoda.train import sft
"""
    found = pagoda_imports(source, "pagoda.model.thing", is_package=False)
    assert found == {"pagoda.hub.store", "pagoda.infer", "pagoda.cli", "pagoda.errors",
                     "pagoda.model", "pagoda.tokenizer.chat", "pagoda.train"}
    assert pagoda_imports("from .store import x", "pagoda.hub", is_package=True) == {
        "pagoda.hub.store"}


@pytest.mark.parametrize(
    ("importer", "target", "message"),
    [
        ("pagoda.model.transformer", "pagoda.infer.generate", "must not import pagoda.infer"),
        ("pagoda.tokenizer.chat", "pagoda.hub.store", "must not import pagoda.hub"),
        ("pagoda.infer.engine", "pagoda.train.sft", "must not import pagoda.train"),
        ("pagoda.serve.app", "pagoda.eval.report", "nothing may import pagoda.eval"),
        ("pagoda.serve.app", "pagoda.cli", "nothing may import pagoda.cli"),
        ("pagoda.hub.loader", "pagoda.infer", "pagoda.hub may only import"),
        ("pagoda.rag.embed", "pagoda.model.transformer", "must not import pagoda.model"),
    ],
)
def test_violations_name_the_module_and_the_import(importer, target, message):
    (line,) = violations({importer: {target}})
    assert line.startswith(f"{importer} -> {target}") and message in line


@pytest.mark.parametrize(
    ("importer", "target"),
    [
        ("pagoda.cli.generate", "pagoda.infer.completion"),
        ("pagoda.cli", "pagoda.cli.models"),
        ("pagoda.eval.report", "pagoda.serve.app"),  # eval may import (almost) anything
        ("pagoda.model.config", "pagoda.errors"),
        ("pagoda.infer.kernels", "pagoda.paths"),
        ("pagoda.tokenizer.chat", "pagoda"),
        ("pagoda.hub.loader", "pagoda.tokenizer"),
        ("pagoda.infer.generate", "pagoda.model.kv_cache"),
    ],
)
def test_allowed_imports(importer, target):
    assert violations({importer: {target}}) == []


def test_a_planted_violation_fails(tmp_path):
    root = tmp_path / "pagoda"
    (root / "model").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "model" / "__init__.py").write_text("from pagoda.model.core import X\n")
    (root / "model" / "core.py").write_text("def f():\n    from ..cli import main\n")
    assert violations(import_graph(root)) == [
        "pagoda.model.core -> pagoda.cli (nothing may import pagoda.cli)"]
