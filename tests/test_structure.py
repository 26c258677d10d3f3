"""The package's structure: no import circle between its own modules, `_compat` a leaf, no module of the
package over `MAX_MODULE_LINES` lines and no function of `src/` or `benchmarks/` over the limit of
`.ci/long_functions.py` (120 lines).

Every import of a module of `dpo_trainer` counts, wherever it is written (module level or inside a function:
a function-level import only hides a circle from Python's import machinery, not from the reader); imports
under `if TYPE_CHECKING:` do not (they never run).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import dpo_trainer

PACKAGE = Path(dpo_trainer.__file__).resolve().parent
ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node of `tree`, those under `if TYPE_CHECKING:` left out."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _own_module(name: str) -> str | None:
    """The longest prefix of the dotted `name` that is a module of the package, or None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def imports_in(source: str, module: str, is_package: bool = False) -> set[str]:
    """The package's modules that the code `source` of `module` imports (the package itself, `dpo_trainer`,
    for a name read from its `__init__`); `is_package`: `module` is a package's `__init__`."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = set()
    for node in _imports(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            prefix = ".".join(part for part in (base, node.module) if part)
            # `from .x import y`: the module x.y if there is one (`from . import models`), else x, where y is read
            targets = [
                f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in MODULES else prefix
                for alias in node.names
            ]
        for target in targets:
            own = _own_module(target)
            if own is not None and own != module:
                found.add(own)
    return found


def imported_modules(module: str) -> set[str]:
    """The package's modules that `module` imports."""
    path = MODULES[module]
    return imports_in(path.read_text(encoding="utf-8"), module, is_package=path.name == "__init__.py")


def import_graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports} for every module of the package."""
    return {module: imported_modules(module) for module in MODULES}


def import_cycles(graph: dict[str, set[str]], limit: int = 100) -> list[list[str]]:
    """Every elementary circle of `graph` ([a, b, ..., a], starting at its first module in sorted order; at
    most `limit` of them), sorted; empty when there is none. The package's graph is small enough to walk
    every path."""
    cycles = []
    for start in sorted(graph):
        paths = [[start]]
        while paths and len(cycles) < limit:
            path = paths.pop()
            for target in sorted(graph[path[-1]], reverse=True):
                if target == start:
                    cycles.append(path + [start])
                elif target > start and target not in path and target in graph:
                    paths.append(path + [target])
    return sorted(cycles)[:limit]


IMPORTS = """
import json
import dpo_trainer.models
from typing import TYPE_CHECKING
from . import VERSION, formats
from .layouts import default_collator
from .collate import *
from ..losses import preference_loss

if TYPE_CHECKING:
    from ..trainer import DPOTrainer
else:
    from ..placement import prepare_reference


def later():
    from ..reference.scoring import reference_logps
"""


def test_every_kind_of_import_is_read():
    assert imports_in(IMPORTS, "dpo_trainer.data.batching") == {
        "dpo_trainer.models",  # import dpo_trainer.models
        "dpo_trainer.data",  # from . import VERSION: a name of the package's __init__
        "dpo_trainer.data.formats",  # from . import formats: a module
        "dpo_trainer.data.layouts",
        "dpo_trainer.data.collate",
        "dpo_trainer.losses",  # a package
        "dpo_trainer.placement",  # the `else` of `if TYPE_CHECKING:` runs
        "dpo_trainer.reference.scoring",  # in a function, a module of a subpackage
    }
    # a package's __init__ imports relative to itself; its own module is no import
    assert imports_in(
        "from . import models\nfrom .config import DPOConfig", "dpo_trainer", is_package=True
    ) == {
        "dpo_trainer.models",
        "dpo_trainer.config",
    }


def test_cycles_are_found():
    graph = {"a": {"b", "d"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c", "a"], ["a", "d", "a"], ["e", "e"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_compat_imports_nothing_of_the_package():
    # `_compat` holds the touches of other libraries' private state; a leaf, so that every module may use it.
    assert imported_modules("dpo_trainer._compat") == set()


def test_no_import_circle():
    graph = import_graph()
    assert "dpo_trainer.models" in graph["dpo_trainer.trainer"]  # the package's own files are read
    cycles = import_cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


# ---------------------------------------------------------------- sizes: modules and functions


def _long_functions_checker():
    """`.ci/long_functions.py` as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("long_functions", ROOT / ".ci" / "long_functions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def long_modules(folder: Path, max_lines: int = MAX_MODULE_LINES) -> list[tuple[int, str]]:
    """(lines, path from `folder`) of every Python file under `folder` over `max_lines` lines."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > max_lines:
            found.append((lines, str(path.relative_to(folder))))
    return found


def _function(name: str, body_lines: int, indent: str = "") -> str:
    """Source of a function `name` of 1 + `body_lines` lines (its `def` and `body_lines` statements)."""
    return f"{indent}def {name}():\n" + "".join(f"{indent}    x = {i}\n" for i in range(body_lines))


def test_the_module_length_rule_finds_a_long_module(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "short.py").write_text("x = 1\n" * MAX_MODULE_LINES)
    (tmp_path / "sub" / "long.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    assert long_modules(tmp_path) == [(MAX_MODULE_LINES + 1, "sub/long.py")]


def test_the_function_length_rule_finds_long_functions(tmp_path):
    checker = _long_functions_checker()
    limit = checker.MAX_LINES
    source = (
        _function("fits", limit - 1)  # exactly the limit: allowed
        + _function("too_long", limit)  # one line over
        + "class Holder:\n"
        + "    @staticmethod\n"  # a decorator is not counted
        + _function("method", limit - 1, indent="    ")
        + "def outer():\n"
        + _function("inner", limit, indent="    ")  # nested: counts in its parent and on its own
    )
    path = tmp_path / "example.py"
    path.write_text(source)
    found = {name: lines for lines, name, _ in checker.long_functions(path, limit)}
    assert found == {"too_long": limit + 1, "outer": limit + 2, "outer.inner": limit + 1}
    # the script (paths from the repository's root) fails when it finds one, and only then
    assert checker.main(["--max-lines", "1", "tests/test_structure.py"]) == 1
    assert checker.main(["--max-lines", str(10**6), "tests/test_structure.py"]) == 0


def test_no_module_of_the_package_is_too_long():
    found = long_modules(PACKAGE)
    assert not found, f"modules over {MAX_MODULE_LINES} lines (split them where the pieces have names):\n" + (
        "\n".join(f"{lines:5d}  {path}" for lines, path in found)
    )


def test_no_function_is_too_long():
    checker = _long_functions_checker()
    found = [
        f"{lines:5d}  {path.relative_to(ROOT)}:{lineno}  {name}"
        for folder in checker.DEFAULT_PATHS
        for path in sorted((ROOT / folder).rglob("*.py"))
        for lines, name, lineno in checker.long_functions(path, checker.MAX_LINES)
    ]
    assert not found, f"functions over {checker.MAX_LINES} lines:\n" + "\n".join(found)


def test_the_paper_pipelines_stay_short_enough_to_read():
    """examples/hh.py and sentiment.py read as their experiments: under 400 lines each, the stage machinery
    in examples/pipeline.py."""
    for name in ("hh.py", "sentiment.py"):
        lines = len((ROOT / "examples" / name).read_text(encoding="utf-8").splitlines())
        assert lines < 400, f"examples/{name} has {lines} lines; move machinery into examples/pipeline.py"
