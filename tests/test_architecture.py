"""Import rules of the package, checked over its own AST (no import is executed).

- Nothing imports in a circle.
- `hf_collapse.modeling` imports nothing from processors, trainers, evals or the entry points.
- Processors import nothing from trainers or the entry points; trainers nothing from the entry points.
- Metrics import nothing from modeling.
- The library's core imports nothing from the entry points (`hf_collapse.scripts`, `hf_collapse.cli`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "hf_collapse"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
ENTRY_POINTS = (f"{PACKAGE}.scripts", f"{PACKAGE}.cli")

# (importer prefix, forbidden import prefixes)
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (f"{PACKAGE}.modeling", (f"{PACKAGE}.processors", f"{PACKAGE}.trainers", f"{PACKAGE}.evals", *ENTRY_POINTS)),
    (f"{PACKAGE}.processors", (f"{PACKAGE}.trainers", *ENTRY_POINTS)),
    (f"{PACKAGE}.trainers", ENTRY_POINTS),
    (f"{PACKAGE}.metrics", (f"{PACKAGE}.modeling",)),
    (f"{PACKAGE}.evals", ENTRY_POINTS),
    (f"{PACKAGE}.hub", ENTRY_POINTS),
    (f"{PACKAGE}.model_cards", ENTRY_POINTS),
)


def _module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every import statement, including lazy ones inside functions, except under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the package modules it imports (`from x import y` counts `x.y` when that is a module)."""
    files = {_module_name(p, root, package): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rsplit(".", 1)[0]
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                    mod = f"{base}.{node.module}" if node.module else base
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in files else mod for a in node.names]
            edges.update(t for t in targets if t == package or t.startswith(package + "."))
        graph[name] = {e for e in edges if e in files and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules, or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def rule_violations(graph: dict[str, set[str]], rules=RULES) -> list[str]:
    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    bad = []
    for importer, targets in sorted(graph.items()):
        for src_prefix, forbidden in rules:
            if under(importer, src_prefix):
                bad += [f"{importer} imports {t}" for t in sorted(targets) if any(under(t, f) for f in forbidden)]
    return bad


# the package itself ----------------------------------------------------------------------------------------------


def test_package_has_no_import_cycle():
    # the package __init__ imports registration only; its lazy names are resolved at run time, not imported
    graph = import_graph(ROOT, PACKAGE)
    assert len(graph) > 20, "the AST walk found too few modules"
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_package_follows_the_import_rules():
    assert rule_violations(import_graph(ROOT, PACKAGE)) == []


def test_modeling_does_not_import_hf_collapse_absolutely():
    """Remote-code exports copy modeling files flat: an absolute `hf_collapse` import would break them."""
    offenders = []
    for path in (ROOT / "modeling").rglob("*.py"):
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(PACKAGE):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    # checkpoint_utils asks for the card builder inside a try (absent in remote-code copies): the one exception
    assert [o for o in offenders if not o.startswith("modeling/checkpoint_utils.py")] == []


# the checker can fail -----------------------------------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_checker_detects_a_cycle_and_a_broken_rule(tmp_path):
    _write(tmp_path, {
        "__init__.py": "",
        "modeling/__init__.py": "",
        "modeling/m.py": "def f():\n    from ..processors.p import x\n",
        "processors/__init__.py": "",
        "processors/p.py": "from hf_collapse.trainers import t\nx = 1\n",
        "trainers/__init__.py": "",
        "trainers/t.py": "from ..modeling import m\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import hf_collapse.scripts\n",
        "hub.py": "from .model_cards import y\n",
        "model_cards.py": "from . import hub\n",
    })  # fmt: skip
    graph = import_graph(tmp_path, PACKAGE)
    assert graph["hf_collapse.modeling.m"] == {"hf_collapse.processors.p"}  # lazy import inside a function counts
    assert "hf_collapse.scripts" not in graph["hf_collapse.trainers.t"]  # TYPE_CHECKING does not
    assert find_cycle(graph) is not None
    bad = rule_violations(graph)
    assert "hf_collapse.modeling.m imports hf_collapse.processors.p" in bad
    assert "hf_collapse.processors.p imports hf_collapse.trainers.t" in bad


@pytest.mark.parametrize("module", ["hf_collapse.processors.air_decoding", "hf_collapse.modeling.robust_mamba2"])
def test_decoding_and_modeling_load_without_training_code(module):
    """At run time too: importing decoding or modeling code does not pull in the trainers."""
    import subprocess
    import sys

    code = f"import sys, {module}\nbad = [m for m in sys.modules if m.startswith('hf_collapse.trainers')]\nassert not bad, bad\n"
    subprocess.run([sys.executable, "-c", code], check=True)
