"""The architecture's rules, checked on the source: no import cycles among trmlx's modules (function-level imports
included: a deferred import still ties two modules together), and the core never imports mlx or torch when it is
imported (only the backends and functions that run on one may)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("mlx", "torch", "transformers", "peft", "bitsandbytes", "mlx_lm", "sentence_transformers")


def modules() -> dict[str, Path]:
    """Module name -> file, with backends/ installed as trmlx.backends."""
    found = {}
    for root, prefix in ((REPO / "trmlx", "trmlx"), (REPO / "backends", "trmlx.backends")):
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((prefix, *parts))] = path
    return found


def imports(path: Path, name: str, known: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported trmlx module, at module level?) for every import in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree, found = ast.parse(path.read_text()), []
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` names the submodule where one exists
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known and "." in target:
                target = target.rpartition(".")[0]
            found.append((target, id(node) in top))
    return found


def test_no_import_cycles_function_level_imports_included():
    known = modules()
    graph = {name: {t for t, _ in imports(path, name, known) if t in known and t != name}
             for name, path in known.items()}
    # a package's __init__ re-exporting its own submodules is how packages work, not a cycle between concerns
    for name in graph:
        graph[name] = {t for t in graph[name] if not (t.startswith(name + ".") or name.startswith(t + "."))}
    cycles, index, low, stack, on_stack, counter = [], {}, {}, [], set(), [0]

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    assert cycles == [], f"import cycles: {cycles}"


def test_the_core_imports_no_framework_at_module_level():
    known = modules()
    offenders = []
    for name, path in known.items():
        if name.startswith("trmlx.backends"):
            continue
        tree = ast.parse(path.read_text())
        for node in tree.body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{name}: {n}" for n in names if n.split(".")[0] in HEAVY]
    assert offenders == []
