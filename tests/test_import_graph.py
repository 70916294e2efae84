"""The package's import graph, read from the source: no loop between its folders, and no library module that
imports a renderer (``report.py``) or a command (``cli/``)."""

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
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
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


def is_folder(name: str) -> bool:
    return (ROOT.parent / Path(*name.split(".")) / "__init__.py").is_file()


def test_no_loop_between_folders():
    edges: dict[str, set[str]] = {}
    for mod, deps in graph().items():
        for dep in deps:
            a, b = room(mod), room(dep)
            if a != b and dep != "deltacomp":
                edges.setdefault(a, set()).add(b)

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

    loops = []
    for a in sorted(edges):
        if is_folder(a):
            cycle = path(a, a, set())
            if cycle and all(is_folder(r) for r in cycle):
                loops.append(" -> ".join(cycle))
    assert not loops, "folders import each other in a loop:\n" + "\n".join(loops)


def test_library_modules_import_no_renderer_or_command():
    bad = [f"{mod} imports {dep}" for mod, deps in graph().items() for dep in deps
           if not mod.startswith(PRESENTATION) and dep.startswith(RENDERERS_AND_COMMANDS)]
    assert not bad, "\n".join(sorted(bad))


def test_the_graph_is_read():
    g = graph()
    assert "deltacomp.quant.rtn" in g["deltacomp.quant.factors"]
    assert "deltacomp.cli" in g["deltacomp.cli.core"]
