"""Griffe extension: the few reStructuredText habits of this package's docstrings, read as Markdown.

The docstrings are Google style with Markdown code spans; some also use reST roles (:func:`name`), literal
blocks introduced by `::`, doctest blocks and simple tables (rows between `===  ===` rules). mkdocstrings renders docstrings
as Markdown, so before it does, this extension turns roles into code spans, `Example::` into `Example:`, doctest
blocks into fenced `pycon` code, and simple tables into Markdown tables. The source files are not changed.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:func|class|data|mod|meth|attr|obj|exc):`~?\.?([^`]+)`")
RULE = re.compile(r"^( *)(=+)( +=+)+ *$")


def _columns(rule: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(r"=+", rule)]


def _cells(line: str, spans: list[tuple[int, int]]) -> list[str]:
    cells = []
    for i, (start, _) in enumerate(spans):
        end = spans[i + 1][0] if i + 1 < len(spans) else len(line)
        cells.append(line[start:end].strip())
    return cells


def simple_tables(text: str) -> str:
    """`text` with each reST simple table (a rule, a header row, a rule, rows, a rule) as a Markdown table.

    A row whose first cell is empty continues the row above it, cell by cell.
    """
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        rules = [j for j in range(i, len(lines)) if RULE.match(lines[j])][:3] if RULE.match(lines[i]) else []
        if len(rules) < 3 or rules[0] != i:
            out.append(lines[i])
            i += 1
            continue
        spans = _columns(lines[i])
        indent = RULE.match(lines[i]).group(1)
        rows: list[list[str]] = []
        for part, (first, last) in enumerate(((rules[0], rules[1]), (rules[1], rules[2]))):
            for line in lines[first + 1 : last]:
                if not line.strip():
                    continue
                cells = _cells(line, spans)
                if rows and not cells[0] and (part == 1 and len(rows) > 1 or part == 0):
                    rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells)]
                else:
                    rows.append(cells)
            if part == 0:
                header_rows = len(rows)
        for k, row in enumerate(rows):
            out.append(indent + "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
            if k == header_rows - 1:
                out.append(indent + "|" + "---|" * len(spans))
        i = rules[2] + 1
    return "\n".join(out)


def doctest_blocks(text: str) -> str:
    """`text` with each doctest block (from a `>>>` line to the next blank line) fenced as `pycon` code."""
    out: list[str] = []
    block: list[str] = []
    for line in text.split("\n") + [""]:
        if block and not line.strip():
            indent = block[0][: len(block[0]) - len(block[0].lstrip())]
            out += [indent + "```pycon", *block, indent + "```"]
            block = []
        if block or line.lstrip().startswith(">>>") and not (out and out[-1].strip().startswith("```")):
            block.append(line)
        else:
            out.append(line)
    return "\n".join(out[:-1])


def markdown_docstring(text: str) -> str:
    text = doctest_blocks(text)
    text = ROLE.sub(lambda m: f"`{m.group(1)}`", text)
    text = re.sub(r"(?m)^(\s*\w[\w ]*)::$", r"\1:", text)
    return simple_tables(text)


class RstToMarkdown(griffe.Extension):
    def on_instance(self, *, node, obj, agent, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)
