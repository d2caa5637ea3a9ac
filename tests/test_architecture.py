"""The shape of the package (docs/architecture.md): no import cycles, no oversized modules, domain code never
imports HTTP code. Every module of vspemu/ is parsed with ast; imports under ``if TYPE_CHECKING:`` and inside
functions count too (a cycle hidden there is still a cycle in the design)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vspemu"
MAX_LINES = 650

# module -> why it may be longer than MAX_LINES for now (the integrator shrinks this list)
TOO_LONG_FOR_NOW: dict[str, str] = {
}

# import cycles that are known and not part of this change (each: the modules, and why it is allowed)
KNOWN_CYCLES: dict[frozenset[str], str] = {
}

DOMAIN_PACKAGES = ("vspemu.system", "vspemu.replication", "vspemu.volumes")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The vspemu modules ``name`` imports (``from a import b`` counts as a.b if that is a module, else a)."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # import a.b.c where a.b is the module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    found = cycles(graph())
    unknown = [sorted(c) for c in found if c not in KNOWN_CYCLES]
    assert not unknown, f"import cycles: {unknown}"


def test_known_cycles_still_exist() -> None:
    """An allow-list entry that no longer applies must be removed (so the list only shrinks)."""
    found = set(cycles(graph()))
    assert not [sorted(c) for c in KNOWN_CYCLES if c not in found]


def test_no_module_is_too_long() -> None:
    long = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    over = {name: n for name, n in long.items() if n > MAX_LINES and name not in TOO_LONG_FOR_NOW}
    assert not over, f"modules over {MAX_LINES} lines: {over}"
    stale = [name for name in TOO_LONG_FOR_NOW if long.get(name, 0) <= MAX_LINES]
    assert not stale, f"no longer too long, remove from TOO_LONG_FOR_NOW: {stale}"


def test_domain_code_never_imports_http_code() -> None:
    g = graph()
    bad = {name: sorted(d for d in deps if d == "vspemu.api" or d.startswith("vspemu.api."))
           for name, deps in g.items() if name.startswith(DOMAIN_PACKAGES)}
    assert not {k: v for k, v in bad.items() if v}


def test_the_checker_sees_cycles_and_type_checking_imports(tmp_path: Path) -> None:
    """The checker itself: a cycle through an import under TYPE_CHECKING is found."""
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [frozenset({"a", "b", "c"})]
    src = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vspemu.x import Y\n"
    p = tmp_path / "m.py"
    p.write_text(src)
    assert imports("vspemu.m", p, {"vspemu.x", "vspemu.m"}) == {"vspemu.x"}
