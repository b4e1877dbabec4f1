"""The package layers hold (DESIGN.md, "Layers and where new things go"): imports go down
only, never in a circle. Read from the source (AST), so a lazy import inside a function counts
too; imports under ``if TYPE_CHECKING:`` do not (they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

import medunet

PACKAGE = Path(medunet.__file__).parent

# rank of each top-level module or package; an import may only go to the same rank or below.
# modeldir sits with planning: loading a network from a model directory needs the plan.
RANKS = {
    "cli": 5, "demo": 5, "serve": 5, "__main__": 5,
    "training": 4, "export": 4, "nnunet": 4,
    "inference": 3,
    "planning": 2, "augment": 2, "evaluation": 2, "modeldir": 2,
    "preprocessing": 1, "datasets": 1, "nets": 1,
    "io": 0, "errors": 0, "runtime": 0, "files": 0,
}
NEVER = {"io", "nets", "datasets", "preprocessing", "evaluation"}  # ... import any of these:
HIGH = {"training", "inference", "export", "serve"}


def _runtime_imports(tree: ast.AST) -> list[str]:
    """``medunet.X`` modules imported outside ``if TYPE_CHECKING:`` blocks."""
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medunet"):
            if node.module == "medunet":  # only submodules, not names such as __version__
                out.extend(f"medunet.{a.name}" for a in node.names
                           if (PACKAGE / a.name).is_dir() or (PACKAGE / f"{a.name}.py").is_file())
            else:
                out.append(node.module)
        elif isinstance(node, ast.Import):
            out.extend(a.name for a in node.names if a.name.startswith("medunet."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _edges() -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        src = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if src == "__init__":  # the package's public API re-exports from every layer
            continue
        for module in _runtime_imports(ast.parse(path.read_text())):
            dst = module.split(".")[1]
            if dst != src:
                edges.setdefault((src, dst), []).append(str(rel))
    return edges


def test_every_module_has_a_layer():
    names = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").is_file()) and p.stem != "__init__"}
    assert names <= set(RANKS), f"give these a layer in RANKS and DESIGN/ARCHITECTURE: {names - set(RANKS)}"


def test_low_layers_never_import_training_inference_export_or_serve():
    bad = {k: v for k, v in _edges().items() if k[0] in NEVER and k[1] in HIGH}
    assert not bad, bad


def test_imports_go_down_only():
    bad = {k: v for k, v in _edges().items() if RANKS[k[1]] > RANKS[k[0]]}
    assert not bad, bad


def test_no_import_cycles_between_packages():
    graph: dict[str, set[str]] = {}
    for src, dst in _edges():
        graph.setdefault(src, set()).add(dst)

    def reaches(a: str, b: str, seen: set[str]) -> bool:
        for n in graph.get(a, ()):
            if n == b:
                return True
            if n not in seen:
                seen.add(n)
                if reaches(n, b, seen):
                    return True
        return False

    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a, set())})
    assert not cycles, cycles


def test_no_import_cycles_between_modules():
    """Within a package too (a lazy import inside a function hides a cycle, it does not remove it)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: {m for m in _runtime_imports(ast.parse(path.read_text())) if m in modules and m != name}
             for name, path in modules.items()}

    def reaches(a: str, b: str) -> bool:
        seen, todo = set(), [a]
        while todo:
            for n in graph.get(todo.pop(), ()):
                if n == b:
                    return True
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return False

    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a)})
    assert not cycles, cycles


def test_the_scan_sees_lazy_imports_and_skips_type_checking():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                     "    from medunet.training import x\n"
                     "def f():\n    from medunet.serve import y\n    import medunet.io.image\n")
    assert _runtime_imports(tree) == ["medunet.serve", "medunet.io.image"]
