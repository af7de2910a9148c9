"""The package's folders import each other without cycles: errors / geometry / bundle at the
bottom, the core above, each family folder on top of the core, the verbs (api, cli) on top of
everything. Every import counts, lazy ones inside functions too; the only way down from the core
to a family is the registry's lazy import by name (pcbedge.families.get_family)."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pcbedge"
TOP = {"api", "cli", "__main__", "testing", "__version__"}


def _node(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "pcbedge" or len(parts) < 2:
        return None
    if parts[1] == "families" and len(parts) > 2 and parts[2] != "base":
        return "family:" + parts[2]
    return parts[1]


def import_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        src = _node(".".join(rel.parts).replace(".__init__", ""))
        for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(n, ast.ImportFrom) and n.module:
                targets = ([f"pcbedge.{a.name}" for a in n.names] if n.module == "pcbedge"
                           else [n.module])
            elif isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            else:
                continue
            for t in targets:
                dst = _node(t)
                if src and dst and dst != src:
                    edges.setdefault(src, set()).add(dst)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> list[str] | None:
        state[n] = 1
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                found = visit(m, path + [m])
                if found:
                    return found
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state:
            found = visit(n, [n])
            if found:
                return found
    return None


def test_no_import_cycles_between_folders():
    edges = import_graph()
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges))}"


def test_core_depends_on_no_family_and_not_on_the_verbs():
    edges = import_graph()
    core = [n for n in edges if n not in TOP and not n.startswith("family:")]
    for n in core:
        bad = {d for d in edges[n] if d.startswith("family:") or d in TOP - {"__version__"}}
        assert not bad, f"{n} imports {sorted(bad)}"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
