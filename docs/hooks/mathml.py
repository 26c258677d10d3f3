"""mkdocs hook: equations as MathML, typeset by the browser itself (no JavaScript, no CDN, no network).

`pymdownx.arithmatex` (generic mode) marks `$...$` and `$$...$$` in the pages, and in the docstrings that
mkdocstrings renders with the same Markdown extensions, as `<span class="arithmatex">\\(...\\)</span>` and
`<div class="arithmatex">\\[...\\]</div>`. This hook replaces each with the MathML that `latex2mathml` (pure
Python) writes. An equation it cannot convert fails the build, naming the page and the equation.
"""

from __future__ import annotations

import html
import re

from latex2mathml.converter import convert
from mkdocs.exceptions import PluginError

INLINE = re.compile(r'<span class="arithmatex">\\\((.*?)\\\)</span>', re.DOTALL)
BLOCK = re.compile(r'<div class="arithmatex">\\\[(.*?)\\\]</div>', re.DOTALL)


def to_mathml(tex: str, display: str) -> str:
    """The MathML of one LaTeX equation, `display` "inline" or "block"."""
    return convert(html.unescape(tex).strip(), display=display)


def typeset(content: str, where: str = "") -> str:
    """`content` (a page's HTML) with every arithmatex equation replaced by its MathML."""

    def replace(display: str, tag: str):
        def one(match: re.Match) -> str:
            try:
                mathml = to_mathml(match.group(1), display)
            except Exception as error:  # latex2mathml raises many kinds; name the equation whatever it is
                raise PluginError(f"{where}: cannot typeset {match.group(1)!r}: {error}") from error
            return f'<{tag} class="math">{mathml}</{tag}>'

        return one

    content = BLOCK.sub(replace("block", "div"), content)
    return INLINE.sub(replace("inline", "span"), content)


def on_page_content(html_content: str, page, config, files) -> str:
    return typeset(html_content, page.file.src_uri)
