"""Griffe extension: render the reStructuredText bits of pyrovae's docstrings as Markdown.

Some core modules write docstrings with Sphinx roles and directives (``:math:`x```,
``:class:`~pyrovae.VAE```, ``.. math::``, simple ``=====`` tables). mkdocstrings renders
docstrings as Markdown, where these would show up verbatim. This extension rewrites them when
mkdocstrings loads the package (the source files are not touched):

* ``:math:`x``` → ``$x$``; ``.. math:: x`` (with indented continuation lines) → ``$$ x $$``;
* ``:class:`~a.b.C```, ``:func:``, ``:mod:``, ``:meth:``, ``:attr:``, ``:data:`` → `` `C` ``;
* simple RST tables → Markdown tables.

Enabled in ``mkdocs.yml`` under the python handler's ``options.extensions``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_XREF_ROLE = re.compile(r":(?:class|func|mod|meth|attr|data|obj|exc):`(~?)([^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(\s*)\.\. math::\s*(.*)$")
_TABLE_BORDER = re.compile(r"^\s*=+( +=+)+\s*$")


def _xref(m: re.Match[str]) -> str:
    name = m.group(2).strip()
    if m.group(1):  # ~a.b.C shows only C
        name = name.rsplit(".", 1)[-1]
    return f"`{name}`"


def _math_directives(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _MATH_DIRECTIVE.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent, first = m.group(1), m.group(2)
        body = [first] if first.strip() else []
        i += 1
        while i < len(lines) and (
            not lines[i].strip()
            and not body
            or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
        ):
            if lines[i].strip():
                body.append(lines[i].strip())
            i += 1
        out += [f"{indent}$$", *(f"{indent}{b}" for b in body), f"{indent}$$"]
    return out


def _table_math(cell: str) -> str:
    """Inside math, a bare ``|`` would end the Markdown table cell: write ``\\vert``/``\\Vert``."""

    def fix(m: re.Match[str]) -> str:
        body = m.group(1).replace("\\|", "\\Vert ").replace("|", "\\vert ")
        return f":math:`{body}`"

    return _MATH_ROLE.sub(fix, cell)


def _tables(lines: list[str]) -> list[str]:
    """Simple RST tables → Markdown. Cells are split on runs of 2+ spaces (the source tables are
    not always aligned to their borders); a row that starts with spaces continues the previous
    row's last cell."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not _TABLE_BORDER.match(lines[i]):
            out.append(lines[i])
            i += 1
            continue
        ncols = len(re.findall(r"=+", lines[i]))
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        rows: list[list[str]] = []
        header: list[str] | None = None
        borders = 1
        i += 1
        while i < len(lines) and borders < 3:
            line = lines[i]
            i += 1
            if _TABLE_BORDER.match(line):
                borders += 1
                if borders == 2 and len(rows) == 1 and header is None:
                    header = rows.pop()
                continue
            if not line.strip():
                continue
            body = line[len(indent) :]
            if rows and body[:1].isspace():  # continuation of the previous row
                rows[-1][-1] = f"{rows[-1][-1]} {body.strip()}"
                continue
            cells = re.split(r"\s{2,}", body.strip(), maxsplit=ncols - 1)
            lead = re.match(r"^(``[^`]+``)\s+(.+)$", cells[0])
            if len(cells) < ncols and lead:  # a literal first cell touching the next one
                cells = [lead.group(1), lead.group(2), *cells[1:]]
            rows.append(cells + [""] * (ncols - len(cells)))
        if header is None:
            header = [""] * ncols
        out.append("")
        out.append(indent + "| " + " | ".join(header) + " |")
        out.append(indent + "|" + "---|" * ncols)
        out += [indent + "| " + " | ".join(_table_math(c) for c in r) + " |" for r in rows]
        out.append("")
    return out


def rst_to_markdown(text: str) -> str:
    """Rewrite the RST constructs listed in the module docstring as Markdown."""
    lines = _tables(_math_directives(text.splitlines()))
    text = "\n".join(lines)
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)
    return _XREF_ROLE.sub(_xref, text)


class RstToMarkdown(griffe.Extension):
    """Apply [`rst_to_markdown`][] to every docstring griffe loads."""

    def on_object(self, *, obj: Any, loader: Any, **kwargs: Any) -> None:  # noqa: ARG002
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)

    def on_package(self, *, pkg: Any, loader: Any, **kwargs: Any) -> None:  # noqa: ARG002
        """The package's own docstring (``on_object`` is not called for the root)."""
        if pkg.docstring is not None:
            pkg.docstring.value = rst_to_markdown(pkg.docstring.value)
