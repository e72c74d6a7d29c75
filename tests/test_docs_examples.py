"""Docs that cannot rot: every Python block of README.md and docs/ runs here, in order, one namespace per page
(Sybil's Markdown parsers). A block that cannot run on a CPU in seconds is marked on its page with
``<!-- skip: next "reason" -->``; its imports are still executed, so a renamed or moved name fails here too."""

import ast
from pathlib import Path
from unittest import SkipTest

import pytest
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SYBIL = Sybil(parsers=[SkipParser(), PythonCodeBlockParser()])


def _imports_only(source: str) -> str:
    tree = ast.parse(source)
    return ast.unparse([node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))])


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page, monkeypatch):
    monkeypatch.chdir(ROOT)  # examples name repository paths (configs/...)
    document = SYBIL.parse(page)
    ran = skipped = 0
    for example in document:
        if not isinstance(example.parsed, str):  # a skip directive
            example.evaluate()
            continue
        try:
            example.evaluate()
            ran += 1
        except SkipTest:  # marked on the page, with its reason: check what it imports
            exec(compile(_imports_only(example.parsed), f"{page.name}:{example.line}", "exec"), {})
            skipped += 1
    assert ran + skipped == page.read_text(encoding="utf-8").count("```python")


def test_every_skip_gives_a_reason():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        assert text.count("<!-- skip: next -->") == 0, f"{page}: say why a block cannot run: skip: next \"...\""
