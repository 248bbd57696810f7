"""Griffe extension: docstrings written for reST read well as Markdown in the API reference.

- reST simple tables (``=====  =====`` borders) become Markdown tables;
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


BORDER = re.compile(r"^ *=+( +=+)+ *$")


def _columns(border: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(r"=+", border)]


def _cells(line: str, cols: list[tuple[int, int]]) -> list[str]:
    out = []
    for i, (a, _) in enumerate(cols):
        b = cols[i + 1][0] if i + 1 < len(cols) else len(line)
        out.append(line[a:b].strip())
    return out


def _rows(lines: list[str], cols: list[tuple[int, int]]) -> list[list[str]]:
    """A line whose first column is blank continues the row above."""
    rows: list[list[str]] = []
    for line in lines:
        if not line.strip():
            continue
        cells = _cells(line, cols)
        if rows and not cells[0]:
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells)]
        else:
            rows.append(cells)
    return rows


def rst_tables(text: str) -> str:
    """Simple reST tables -> Markdown tables (with or without a header row)."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        if not BORDER.match(lines[i]):
            out.append(lines[i])
            i += 1
            continue
        cols = _columns(lines[i])
        ends = [j for j in range(i + 1, len(lines)) if BORDER.match(lines[j])]
        if not ends:
            out.append(lines[i])
            i += 1
            continue
        if len(ends) >= 2 and ends[0] == i + 2:  # header row between the first two borders
            header, body_end = _rows([lines[i + 1]], cols)[0], ends[1]
            body = lines[ends[0] + 1 : body_end]
        else:
            header, body_end = [""] * len(cols), ends[0]
            body = lines[i + 1 : body_end]
        table = [header, *_rows(body, cols)]
        out.append("")
        for k, row in enumerate(table):
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
            if k == 0:
                out.append("|" + "---|" * len(cols))
        out.append("")
        i = body_end + 1
    return "\n".join(out)


def markdownify(text: str) -> str:
    text = rst_tables(text)
    text = ROLE.sub(r"`\1`", text)
    return "\n".join(_escape_shapes(line) for line in text.split("\n"))


class RstRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdownify(obj.docstring.value)
