"""A Griffe extension for the API reference: seqpack's docstrings are plain text, with aligned columns
(``input_ids     [1, T] int64  ...``) and indented examples. Markdown would run the aligned lines together into
one paragraph, so each block of them (with the lines that continue it) is kept as preformatted text."""

from __future__ import annotations

import re

import griffe

ALIGNED = re.compile(r"^\S.*?\S {2,}\S")  # a word, two or more spaces, more text: a column layout


def preformat(text: str) -> str:
    """Wrap every run of column-aligned lines (and their more-indented continuations) in a ``text`` fence."""
    out, block = [], []

    def flush():
        if block:
            out.extend(["```text", *block, "```"])
            block.clear()

    for line in text.split("\n"):
        if ALIGNED.match(line) or (block and line.startswith(" ") and line.strip()):
            block.append(line)
        else:
            flush()
            out.append(line)
    flush()
    return "\n".join(out)


class PlainDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = preformat(obj.docstring.value)
