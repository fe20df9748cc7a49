"""The code's shape, checked: no import circles between the package's modules, no module over 400 lines, and
torch / vllm / openvino imported only inside their backends (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "embedding_service"
MAX_LINES = 400
# The modules allowed to import each heavy runtime (everything else must work without it installed).
RUNTIME_HOMES = {
    "torch": ("backends/torch/", "backends/openvino/", "backends/runtime/device.py", "backends/model/pooling.py",
              "backends/runtime/fallback.py"),
    "vllm": ("backends/vllm/",),
    "openvino": ("backends/openvino/",),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):  # (imports inside functions count too)
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {module for module in found if module in modules and module != name}


def test_no_import_circles() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    circles = []
    for start in graph:  # a path from a module's imports back to itself
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module == start:
                circles.append(start)
                break
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
    assert circles == [], f"modules on an import circle: {sorted(circles)}"


def test_no_module_is_over_the_line_budget() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in ROOT.rglob("*.py")}
    long = {name: lines for name, lines in sizes.items() if lines > MAX_LINES}
    assert long == {}, f"split these (at most {MAX_LINES} lines a module): {long}"


def test_heavy_runtimes_are_imported_only_inside_their_backends() -> None:
    offenders = []
    for path in ROOT.rglob("*.py"):
        relative = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for name in names:
                runtime = name.split(".")[0]
                if runtime in RUNTIME_HOMES and not relative.startswith(RUNTIME_HOMES[runtime]):
                    offenders.append(f"{relative} imports {name}")
    assert offenders == [], offenders


def test_the_server_never_imports_the_test_model_builders() -> None:
    """testkit/ (random-weight model builders, torch) is outside the wheel: nothing in the package may need it."""
    users = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if "testkit" in p.read_text()]
    assert users == []
