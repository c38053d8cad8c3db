"""The import structure of the project: imports run downward only, and there are no cycles.

The graph is read from the source (every `import`, also those inside functions, but not those under
`if TYPE_CHECKING:`), so a lazy import that closes a cycle is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("minigpt4", "demo")
ENGINE = ("minigpt4.model", "minigpt4.vision", "minigpt4.weights")
CHAT_SIDE = ("minigpt4.chat", "minigpt4.conversation", "minigpt4.serve", "minigpt4.commands", "demo", "app")
TOP_LEVEL_MODULES = {
    "__init__", "__main__", "build", "chat", "config", "conversation", "errors", "files", "generation",
    "gguf_checkpoint", "hosts", "images", "model", "packages", "processor", "vision", "weights",
}  # fmt: skip
TOP_LEVEL_FOLDERS = {"assets", "commands", "curate", "data", "decode", "eval", "lite", "serve", "train"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    modules = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    modules["app"] = ROOT / "app.py"
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(path: Path, name: str, top_only: bool = False) -> set[str]:
    """Every module `path` imports (absolute names); `top_only`: only those run at import time."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, in_function)
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import) and not (top_only and in_function):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and not (top_only and in_function):
                base = child.module or ""
                if child.level:
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    package = package[: len(package) - child.level + 1]
                    base = ".".join([*package, base] if base else package)
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in child.names)
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def import_graph(top_only: bool = False) -> dict[str, set[str]]:
    """Project module → the project modules it imports (a `from pkg import name` counts as pkg.name
    when that is a module, else as pkg)."""
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_names(path, name, top_only):
            if imported in modules:
                targets.add(imported)
            elif imported.rpartition(".")[0] in modules and imported.split(".")[0] in PACKAGES:
                targets.add(imported.rpartition(".")[0])
        targets.discard(name)
        graph[name] = targets
    return graph


def external_imports(top_only: bool) -> dict[str, set[str]]:
    modules = project_modules()
    return {
        name: {n.split(".")[0] for n in imported_names(path, name, top_only)}
        for name, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checker_finds_a_cycle_and_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    source = "def f():\n    from minigpt4.chat import Chat\n"
    path = ROOT / "tests" / "_layout_probe.py"
    try:
        path.write_text(source)
        assert "minigpt4.chat" in imported_names(path, "tests._layout_probe")
        assert "minigpt4.chat" not in imported_names(path, "tests._layout_probe", top_only=True)
    finally:
        path.unlink()


@pytest.mark.parametrize("engine", ENGINE)
def test_the_model_side_never_reaches_the_chat_side(engine):
    wrong = {m for m in reachable(import_graph(), engine) if _within(m, CHAT_SIDE)}
    assert not wrong, f"{engine} imports {sorted(wrong)}"


def test_data_never_imports_training():
    graph = import_graph()
    for name in graph:
        if _within(name, ("minigpt4.data",)):
            wrong = {m for m in reachable(graph, name) if _within(m, ("minigpt4.train",))}
            assert not wrong, f"{name} reaches {sorted(wrong)}"


def test_demo_never_imports_torch():
    graph = import_graph(top_only=True)
    external = external_imports(top_only=True)
    for name in graph:
        if _within(name, ("demo",)):
            loaded = {name} | reachable(graph, name)
            heavy = {m for m in loaded if {"torch", "transformers"} & external[m]}
            assert not heavy, f"importing {name} loads {sorted(heavy)}, which import torch"


def test_top_level_holds_the_engine_and_one_folder_per_concern():
    package = ROOT / "minigpt4"
    modules = {p.stem for p in package.glob("*.py")}
    folders = {p.name for p in package.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert modules == TOP_LEVEL_MODULES
    assert folders == TOP_LEVEL_FOLDERS
    train = {p.stem for p in (package / "train").glob("*.py")}
    assert {"loop", "config", "checkpoints", "features", "bench"} <= train


# Test folders that are not a package of minigpt4, and top-level test files that test no one module.
TEST_FOLDERS_OF_THEIR_OWN = {"demo", "project", "helpers", "bad_inputs", "artifacts"}
CROSS_MODULE_TESTS = {"test_release_fidelity.py"}  # the release presets against the original code


def test_the_tests_mirror_the_code():
    tests = ROOT / "tests"
    packages = {p.name for p in (ROOT / "minigpt4").iterdir() if (p / "__init__.py").is_file()}
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    assert folders - packages - TEST_FOLDERS_OF_THEIR_OWN == set(), "a test folder that mirrors no package"
    top_level = {p.name for p in tests.glob("test_*.py")} - CROSS_MODULE_TESTS
    missing = {name for name in top_level if not (ROOT / "minigpt4" / name.removeprefix("test_")).is_file()}
    assert not missing, f"top-level tests that name no top-level module of minigpt4: {sorted(missing)}"
    helpers = {p.relative_to(tests).as_posix() for p in tests.rglob("*_helpers.py")}
    assert helpers and all(h.startswith("helpers/") for h in helpers), helpers
