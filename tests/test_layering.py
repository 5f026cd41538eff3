"""The package's layers import only downwards (so there is no import cycle between them)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "antidote_llm"
# Lower numbers are lower layers; packages of one number never import each other. integrations (a Trainer
# callback running guard) sits on frontier, beside defenses: neither needs the other.
LAYERS = {"errors": 0, "runtime": 1, "data": 2, "registry": 3, "core": 4, "evaluation": 4, "training": 4,
          "frontier": 5, "defenses": 6, "integrations": 6, "lab": 7, "cli": 8, "__init__": 9, "__main__": 9}


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("antidote_llm"):
            found |= {node.module} if node.module != "antidote_llm" else {f"antidote_llm.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("antidote_llm")}
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_layers(path):
    relative = path.relative_to(PACKAGE).with_suffix("")
    own = relative.parts[0]
    assert own in LAYERS, f"{relative} sits in no layer; add its package to LAYERS"
    for imported in _imports(path):
        other = _part(imported)
        if other == own:
            continue
        assert LAYERS[other] < LAYERS[own], f"{relative} ({own}) imports {imported} ({other}): against the layers"


def test_the_layer_table_is_exercised():
    assert len(MODULES) > 30 and {p.relative_to(PACKAGE).with_suffix("").parts[0] for p in MODULES} <= set(LAYERS)


def _module_name(path: Path) -> str:
    parts = ("antidote_llm", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_imports_itself_through_others():
    """Module-level and function-level imports alike: a lazy import that closes a cycle is still a cycle."""
    names = {_module_name(p): p for p in MODULES}
    graph = {name: {i for i in _imports(path) if i in names and i != name} for name, path in names.items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
