"""The package's import graph: no circle between modules and no upward import between layers.

Every import counts -- at module level or inside a function (a lazy import still ties two modules) -- except
annotations under ``if TYPE_CHECKING:``, which never run.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"robustvtc": ROOT / "robustvtc", "robustvtc.attacks": ROOT / "attacks",
            "robustvtc.defenses": ROOT / "defenses"}
# lowest first; a module may import its own layer and the layers below it
LAYERS = [
    {"robustvtc.errors", "robustvtc.stats", "robustvtc.registry", "robustvtc.safe_io", "robustvtc.images"},
    {"robustvtc.data", "robustvtc.scoring"},
    {"robustvtc.models"},
    {"robustvtc.compression"},
    {"robustvtc.defenses"},
    {"robustvtc.target"},
    {"robustvtc.attacks"},
    {"robustvtc.campaign"},
    {"robustvtc.cli", "robustvtc.pytest_plugin", "robustvtc.__main__", "robustvtc.classifier"},
]


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "robustvtc" and (name.startswith("robustvtc.attacks") or name.startswith("robustvtc.defenses")):
                continue
            out[name] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for stmt in node.body for n in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = name.split(".")
            if node.level:
                base = base[:len(base) - node.level + (path.name == "__init__.py")]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known]
            targets = subs if len(subs) == len(node.names) else [module, *subs]
        for target in targets:
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target not in (name, "robustvtc"):
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def layer(module: str) -> int:
    for i, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: place it")


def test_no_module_imports_a_higher_layer():
    upward = [(a, b) for a, targets in graph().items() for b in targets if layer(b) > layer(a)]
    assert upward == []


def test_no_circle_between_modules():
    edges = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2
    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_the_checker_sees_lazy_imports_and_skips_annotations(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from robustvtc.cli import main\n"
                      "def f():\n    from robustvtc.campaign import runner\n")
    known = modules()
    assert imports("robustvtc.models.m", module, known) == {"robustvtc.campaign.runner"}
