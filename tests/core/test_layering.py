"""The house's floors, read from the source with ``ast`` (every import, also those inside functions).

Floor 0 is ``obelisk/`` (shared code), floor 1 ``bootloader/``, floor 2 the host's update engine and
cloud-config, floor 3 what runs off the host (the builder, the servers). A module may import its own
package and packages on lower floors only, and no two modules may import each other in a circle.
``obelisk/cli.py`` mounts the packages by name (importlib strings), so it names no import here.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FLOORS = {
    "obelisk": 0,
    "bootloader": 1,
    "update_engine": 2, "cloudconfig": 2,
    "builder": 3, "update_server": 3, "fleetlock_server": 3, "provision": 3,
}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """module -> project modules it imports (a name imported from a package counts as its submodule when one exists)."""
    modules = {}
    for pkg in FLOORS:
        for path in (root / pkg).rglob("*.py"):
            modules[_module_name(path, root)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_pkg, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def floor_violations(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for mod, deps in sorted(graph.items()):
        top = mod.split(".")[0]
        for dep in sorted(deps):
            other = dep.split(".")[0]
            if other != top and FLOORS[other] >= FLOORS[top]:
                wrong.append(f"{mod} imports {dep} (floor {FLOORS[top]} -> {FLOORS[other]})")
    return wrong


def test_imports_only_go_down_the_floors() -> None:
    wrong = floor_violations(import_graph())
    assert not wrong, "imports that go up or sideways:\n" + "\n".join(wrong)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            # A package's __init__ importing its own submodules is not a cycle of concern unless they import it back.
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_a_violation(tmp_path: Path) -> None:
    """The scanner itself, on a made-up tree: a lazy upward import, a sideways one and a relative cycle are found."""
    def write(rel: str, text: str) -> None:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)

    for pkg in FLOORS:
        write(f"{pkg}/__init__.py", "")
    write("obelisk/x.py", "def f():\n    from builder import y\n")  # lazy, inside a function
    write("builder/y.py", "")
    write("bootloader/z.py", "import cloudconfig.w\n")
    write("cloudconfig/w.py", "")
    write("provision/a.py", "from . import b\n")
    write("provision/b.py", "from .a import thing\n")
    graph = import_graph(tmp_path)
    wrong = floor_violations(graph)
    assert "obelisk.x imports builder.y (floor 0 -> 3)" in wrong
    assert "bootloader.z imports cloudconfig.w (floor 1 -> 2)" in wrong
    assert find_cycles(graph) == [["provision.a", "provision.b", "provision.a"]]
