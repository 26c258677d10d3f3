"""The documentation: README is a landing page whose links resolve, the docs' links and anchors resolve,
the quick start's code runs as shown, and the parts the site generates at build time cover the code."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
SNIPPET = re.compile(r'^--8<-- "([^"]+)"$', re.MULTILINE)
FENCE = re.compile(r"^ *(```|~~~).*?^ *\1", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _hook(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", DOCS / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _expanded(path: Path) -> str:
    """A page's Markdown with its `--8<--` snippets included, as the site shows it."""
    return SNIPPET.sub(lambda m: (ROOT / m.group(1)).read_text(), path.read_text())


def _prose(markdown: str) -> str:
    """Markdown without code blocks and code spans, where links are not links."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", markdown))


def _slug(heading: str) -> str:
    """Python-Markdown's `toc` slug of a heading (what mkdocs uses as its anchor)."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(path: Path) -> set[str]:
    markdown = FENCE.sub("", _expanded(path) if path.suffix == ".md" else path.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} +(.+?) *#*$", markdown, re.MULTILINE)}


def _links(path: Path) -> list[str]:
    markdown = path.read_text() if path.name == "README.md" else _expanded(path)
    return [m.group(1) for m in LINK.finditer(_prose(markdown))]


def test_readme_is_a_landing_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; the docs hold the rest"


@pytest.mark.parametrize("path", [ROOT / "README.md", *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    for target in _links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        assert resolved.is_file(), (
            f"{path.relative_to(ROOT)}: link {target!r} names no file of the repository"
        )
        assert ROOT in resolved.parents, f"{path.relative_to(ROOT)}: link {target!r} leaves the repository"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{path.relative_to(ROOT)}: no heading {anchor!r} in {file}"


def test_the_docs_link_every_page_from_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in PAGES:
        assert str(page.relative_to(DOCS)) in nav, f"{page} is not in mkdocs.yml's nav"


def _quick_start_code() -> str:
    page = (DOCS / "quickstart.md").read_text()
    section = page.split("## Train, offline", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.mark.slow
def test_quick_start_code_runs_as_shown(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_quick_start_code(), "docs/quickstart.md", "exec"), namespace)
    history = namespace["trainer"].state.log_history
    assert history[-1]["step"] == 2
    assert abs(history[-1]["train_loss"] - 0.6931) < 0.01  # two steps from the reference: about ln 2


def test_config_table_has_every_field():
    from dpo_trainer import DPOConfig

    table = _hook("generate").config_fields()
    for field in dataclasses.fields(DPOConfig):
        if field.init and not field.name.startswith("_"):
            assert f"| `{field.name}` |" in table, field.name


def test_trl_field_list_is_trls():
    trl = pytest.importorskip("trl")
    from transformers import TrainingArguments

    generate = _hook("generate")
    inherited = {field.name for field in dataclasses.fields(TrainingArguments)}
    trl_fields = {field.name for field in dataclasses.fields(trl.DPOConfig)} - inherited
    assert generate.TRL_DPO_FIELDS == trl_fields


def test_cli_page_has_every_flag():
    from dpo_trainer.cli import make_parser

    flags = _hook("generate").cli_flags()
    for action in make_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert f"`{action.option_strings[0]}`" in flags, action.option_strings


def test_loss_registry_has_every_loss():
    from dpo_trainer.losses import LOSSES

    table = _hook("generate").loss_registry()
    for name in LOSSES:
        assert f"| `{name}` |" in table


def test_equations_become_mathml():
    pytest.importorskip("latex2mathml")
    mathml = _hook("mathml")
    html = '<p><span class="arithmatex">\\(\\beta &lt; 1\\)</span></p><div class="arithmatex">\\[\\sigma(x)\\]</div>'
    out = mathml.typeset(html)
    assert "arithmatex" not in out and out.count("<math") == 2
    assert "&amp;" not in out and "lt;" not in out  # the page's &lt; read as <, not typeset as "&lt;"
    assert 'display="block"' in out


def test_rst_habits_read_as_markdown():
    pytest.importorskip("griffe")
    rst = _hook("rst_docstrings")
    text = "See :func:`preference_loss`.\n\n=== ===\na   b\n=== ===\nx   y\n    z\n=== ===\n\n>>> 1 + 1\n2\n"
    out = rst.markdown_docstring(text)
    assert "See `preference_loss`." in out
    assert "| a | b |\n|---|---|\n| x | y z |" in out
    assert "```pycon\n>>> 1 + 1\n2\n```" in out
