"""hf_zsharp's modules import each other as a DAG: no module needs another that needs it back."""

import ast
from pathlib import Path

import hf_zsharp

PACKAGE = Path(hf_zsharp.__file__).parent  # the copy under test: the source tree, or an installed wheel


def module_names() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__)."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports; `from package import submodule` needs only the submodule."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            submodules = {f"{target}.{alias.name}" for alias in node.names} & modules.keys()
            found |= submodules if len(submodules) == len(node.names) else {target, *submodules}
    return (found & modules.keys()) - {name}


def test_the_package_imports_form_a_dag():
    modules = module_names()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        for needed in sorted(graph[name]):
            assert needed not in path, f"import cycle: {' -> '.join([*path, needed])}"
            if needed not in done:
                visit(needed, [*path, needed])
        done.add(name)

    for name in sorted(graph):
        visit(name, [name])
    assert "hf_zsharp.run" in graph and "hf_zsharp.optim.zsharp" in graph  # the walk saw the package
