"""List every function or method longer than a limit (default 120 lines) and fail if there is one.

    python .ci/long_functions.py [--max-lines N] [PATH ...]      # default paths: src benchmarks

A function's length runs from its `def` line to its last line, decorators excluded; a nested function
counts inside its parent and is also checked on its own.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATHS = ("src", "benchmarks")
MAX_LINES = 120


def long_functions(path: Path, max_lines: int) -> list[tuple[int, str, int]]:
    """(lines, qualified name, def line) of each function in one file over `max_lines` lines."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                lines = child.end_lineno - child.lineno + 1  # `lineno` is the `def` line, not a decorator's
                if lines > max_lines:
                    found.append((lines, name, child.lineno))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "paths", nargs="*", default=list(DEFAULT_PATHS), help="files or folders (from the root)"
    )
    parser.add_argument("--max-lines", type=int, default=MAX_LINES)
    options = parser.parse_args(argv)

    offenders = []
    for name in options.paths:
        target = ROOT / name
        files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
        for file in files:
            for lines, function, lineno in long_functions(file, options.max_lines):
                offenders.append((lines, f"{file.relative_to(ROOT)}:{lineno}", function))
    for lines, where, function in sorted(offenders, reverse=True):
        print(f"{lines:5d} lines  {where}  {function}")
    if offenders:
        print(f"{len(offenders)} function(s) over {options.max_lines} lines", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
