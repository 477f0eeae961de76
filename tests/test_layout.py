"""The package's floors: no import circles, and no floor imports a higher one (docs/ARCHITECTURE.md)."""

import ast
from pathlib import Path

import mlx_coach

PACKAGE = Path(mlx_coach.__file__).parent


def module_imports():
    """{module: {imported mlx_coach module, ...}} for every module, function-level imports included."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if parts[-1] == "__init__" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
        modules[name] = {m for m in found if m.split(".")[0] == "mlx_coach"}
    known = set(modules)
    return {name: {m for m in deps if m in known and m != name} for name, deps in modules.items()}


def floor_of(module):
    parts = module.split(".")
    if len(parts) == 1 or parts[1] not in mlx_coach.FLOORS:
        return len(mlx_coach.FLOORS)  # the top: cli, __main__ and the one-release re-exports
    return mlx_coach.FLOORS.index(parts[1])


def test_every_package_is_on_the_floor_list():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(mlx_coach.FLOORS)


def upward_imports(graph):
    return sorted((name, dep) for name, deps in graph.items() for dep in deps if floor_of(dep) > floor_of(name))


def import_circles(graph):
    circles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                circles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return circles


def test_no_floor_imports_a_higher_one():
    assert upward_imports(module_imports()) == []


def test_there_is_no_import_circle():
    # the package itself (`import mlx_coach`) is every module's parent, not a dependency
    graph = {name: deps - {"mlx_coach"} for name, deps in module_imports().items()}
    assert import_circles(graph) == []


def test_the_checks_find_a_planted_circle_and_upward_import():
    planted = {"mlx_coach.core.errors": {"mlx_coach.rl.trainer"}, "mlx_coach.rl.trainer": {"mlx_coach.core.errors"}}
    assert upward_imports(planted) == [("mlx_coach.core.errors", "mlx_coach.rl.trainer")]
    assert import_circles(planted) == [["mlx_coach.core.errors", "mlx_coach.rl.trainer", "mlx_coach.core.errors"]]
