"""The generated reference pages match the code (regenerate with `python tools/gen_reference.py`), and every
repository path the documentation names exists."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "tools" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_pages_are_up_to_date():
    stale = [str(p.relative_to(ROOT)) for p in _generator().stale_pages()]
    assert stale == [], f"{stale} out of date with the code: run `python tools/gen_reference.py` and commit them"


def test_paths_named_in_the_docs_exist():
    """`src/...`, `tests/...`, `configs/...`, `tools/...` in README.md and docs/ point at real files."""
    pattern = re.compile(r"`((?:src|tests|configs|tools)/[\w./-]+?)(?:::\w+)?`")
    missing = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for path in pattern.findall(page.read_text(encoding="utf-8")):
            if not (ROOT / path.rstrip("/")).exists():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert missing == []
