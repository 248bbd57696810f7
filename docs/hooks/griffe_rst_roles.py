"""Griffe extension: docstrings written for reST read well as Markdown in the API reference.

- reST roles (``:func:`x```, ``:class:`~a.B```, ...) become inline code instead of literal text;
- ``*`` inside a shape outside code (``[B, N, p*p*C]``) stays a star instead of starting
  emphasis (code spans and indented literal blocks are left as they are).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const):`~?([^`]+)`")
CODE = re.compile(r"(`+[^`]*`+)")
SHAPE = re.compile(r"\[[^\[\]\n`]*\]")


def _escape_shapes(line: str) -> str:
    if line.startswith("    "):  # literal block
        return line
    parts = CODE.split(line)
    for i in range(0, len(parts), 2):  # outside code spans
        parts[i] = SHAPE.sub(lambda m: m.group(0).replace("*", r"\*"), parts[i])
    return "".join(parts)


def markdownify(text: str) -> str:
    text = ROLE.sub(r"`\1`", text)
    return "\n".join(_escape_shapes(line) for line in text.split("\n"))


class RstRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdownify(obj.docstring.value)
