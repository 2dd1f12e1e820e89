"""The package's shape: no import cycles between vitslim's modules, and imports that run downwards only."""

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "vitslim"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _nodes(tree: ast.AST, typing: bool):
    """Every node of ``tree``; without ``typing``, none under ``if TYPE_CHECKING:`` (imports for
    annotations only, which never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if not typing and isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def import_graph(typing: bool = True) -> dict[str, set[str]]:
    """vitslim module -> the vitslim modules it imports, at module level or inside functions (an
    import moved into a function hides a cycle from the interpreter, not from the design).
    ``from package import name`` counts as importing ``package.name`` when that is a module,
    else ``package``; ``importlib.import_module("vitslim.x")`` with a literal name counts too.
    ``typing=False`` leaves out the imports made for type annotations only."""
    modules = {_module_name(path): path for path in SOURCE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for statement in _nodes(ast.parse(path.read_text()), typing):
            if isinstance(statement, ast.Import):
                edges |= {alias.name for alias in statement.names if alias.name in modules}
            elif isinstance(statement, ast.ImportFrom) and statement.module and statement.level == 0:
                for alias in statement.names:
                    submodule = f"{statement.module}.{alias.name}"
                    edges.add(submodule if submodule in modules else statement.module)
            elif _imports_by_name(statement):
                edges.add(statement.args[0].value)
        graph[name] = {edge for edge in edges if edge in modules and edge != name}
    return graph


def _imports_by_name(node: ast.AST) -> bool:
    """``importlib.import_module("...")`` or ``import_module("...")`` with a string literal."""
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return False
    function = node.func
    return (isinstance(function, ast.Attribute) and function.attr == "import_module") or (isinstance(function, ast.Name) and function.id == "import_module")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_an_import_by_name_is_an_edge(tmp_path, monkeypatch):
    package = tmp_path / "vitslim"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("import importlib\n\ndef f():\n    importlib.import_module('vitslim.b')\n")
    (package / "b.py").write_text("from vitslim import a\n")
    monkeypatch.setattr(__import__(__name__), "SOURCE", package)
    graph = import_graph()
    assert graph["vitslim.a"] == {"vitslim.b"} and find_cycle(graph) == ["vitslim.a", "vitslim.b", "vitslim.a"]


def test_vitslim_modules_import_each_other_without_cycles():
    graph = import_graph()
    assert "vitslim.pipeline" in graph and "vitslim.adapters.hf" in graph  # the walk saw the package
    # the package's __init__ only re-exports: importing any module runs it first, by Python's rules, not by a design choice
    cycle = find_cycle({name: edges - {"vitslim"} for name, edges in graph.items() if name != "vitslim"})
    assert cycle is None, " -> ".join(cycle)


LAYERS = {
    # the ground: errors, the torchvision guard, private infrastructure
    "vitslim.errors": 0, "vitslim._compat": 0, "vitslim._infra": 0,
    # formats that know no model: recipe steps, bounded folder reads, images and batches, checkpoints
    "vitslim.io.recipe": 1, "vitslim.io.folder_io": 1, "vitslim.io.image_dataset": 1, "vitslim.io.image_batches": 1,
    "vitslim.io.checkpoints": 1,
    "vitslim.adapters": 2,
    "vitslim.io": 3,  # loading, saving and opening images for a model, through the adapters
    "vitslim.measure": 4, "vitslim.deploy": 4, "vitslim.train": 4,
    "vitslim.methods": 5,  # the registry the methods below register in
    "vitslim.lowrank": 6, "vitslim.cait": 6, "vitslim.lowrank_cait": 6,
    "vitslim.pipeline": 7,
    "vitslim.apps": 8, "vitslim.__main__": 8,
}


def layer(module: str) -> int | None:
    """The layer of ``module``: its longest prefix in ``LAYERS``."""
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    return None if prefix is None else LAYERS[prefix]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a module to one in a higher layer (the package's ``__init__``, which only
    re-exports the public face, stands outside the layers)."""
    return [f"{source} -> {target}" for source, targets in sorted(graph.items()) for target in sorted(targets)
            if "vitslim" not in (source, target) and layer(target) > layer(source)]


def test_every_module_has_a_layer_and_imports_only_downwards():
    graph = import_graph(typing=False)
    assert [name for name in graph if name != "vitslim" and layer(name) is None] == []
    assert upward_imports(graph) == []
    assert upward_imports({"vitslim.io.recipe": {"vitslim.pipeline"}}) == ["vitslim.io.recipe -> vitslim.pipeline"]  # it can see one
