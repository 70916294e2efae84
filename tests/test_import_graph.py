"""The package's import graph, read from the source (imports inside functions included): no loop between its
folders and top-level modules, and no library module that imports a renderer (``report.py``) or a command
(``cli/``)."""

import ast
from pathlib import Path

import deltacomp

ROOT = Path(deltacomp.__file__).parent
# where text for people is made: the commands, the demo script they run, and the renderers
PRESENTATION = ("deltacomp.cli", "deltacomp.demo", "deltacomp.report", "deltacomp.plots")
RENDERERS_AND_COMMANDS = ("deltacomp.cli", "deltacomp.report")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every ``deltacomp`` module ``path`` imports, at the top or inside a function."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py", str(path))


def imports_in(source: str, name: str, is_package: bool = False, filename: str = "<source>") -> set[str]:
    """Every ``deltacomp`` module that the source of module ``name`` imports, wherever the import stands."""
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # ``from deltacomp.quant import rtn``
    return {m for m in out if m == "deltacomp" or m.startswith("deltacomp.")}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: {m for m in imports_of(p) if m in modules} for name, p in modules.items()}


def room(module: str) -> str:
    """A module's folder (``deltacomp.quant``), or the module itself for one at the top (``deltacomp.compress``)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def room_edges(g: dict[str, set[str]]) -> dict[str, set[str]]:
    """Which rooms import which (the package's ``__init__``, ``deltacomp`` itself, is no room)."""
    edges: dict[str, set[str]] = {}
    for mod, deps in g.items():
        for dep in deps:
            a, b = room(mod), room(dep)
            if a != b and "deltacomp" not in (mod, dep):
                edges.setdefault(a, set()).add(b)
    return edges


def loops(edges: dict[str, set[str]]) -> list[str]:
    """Each loop of rooms once, as ``a -> b -> a`` starting from its first room in sorted order."""

    def path(start, goal, seen):
        for nxt in sorted(edges.get(start, ())):
            if nxt == goal:
                return [start, goal]
            if nxt not in seen:
                seen.add(nxt)
                rest = path(nxt, goal, seen)
                if rest:
                    return [start, *rest]
        return None

    found, covered = [], set()
    for a in sorted(edges):
        if a not in covered:
            cycle = path(a, a, set())
            if cycle:
                covered.update(cycle)
                found.append(" -> ".join(cycle))
    return found


def test_no_loop_between_rooms():
    """Folders and top-level modules (``config.py``) import each other in one direction only, lazy imports too."""
    found = loops(room_edges(graph()))
    assert not found, "rooms import each other in a loop:\n" + "\n".join(found)


def test_a_lazy_import_counts_and_its_loop_is_caught():
    source = "import torch\n\ndef check(config):\n    from deltacomp.methods.base import get_method\n"
    deps = imports_in(source, "deltacomp.config")
    assert deps == {"deltacomp.methods.base", "deltacomp.methods.base.get_method"}
    g = {"deltacomp.config": deps, "deltacomp.methods.base": {"deltacomp.config", "deltacomp.quant.rtn"},
         "deltacomp.quant.rtn": set()}
    assert loops(room_edges(g)) == ["deltacomp.config -> deltacomp.methods -> deltacomp.config"]
    assert "deltacomp.calib.sequential" in graph()["deltacomp.calib.provider"]  # imported inside a method


def test_library_modules_import_no_renderer_or_command():
    bad = [f"{mod} imports {dep}" for mod, deps in graph().items() for dep in deps
           if not mod.startswith(PRESENTATION) and dep.startswith(RENDERERS_AND_COMMANDS)]
    assert not bad, "\n".join(sorted(bad))


def test_the_graph_is_read():
    g = graph()
    assert "deltacomp.quant.rtn" in g["deltacomp.quant.factors"]
    assert "deltacomp.cli" in g["deltacomp.cli.core"]
