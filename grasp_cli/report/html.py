"""HTML building blocks of the report: tables, embedded figures, collapsed blocks, the page.

The page is one self-contained file: figures are PNG bytes embedded as
``data:image/png;base64`` URIs and the only style sheet is inline, so the file can be mailed
or attached to a ticket and still shows everything. No script, no external URL.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Sequence
from typing import Any

Formatter = Callable[[Any], str]


def esc(value: object) -> str:
    """``value`` as HTML-escaped text."""
    return html.escape(str(value))


def number(value: Any, digits: int = 3) -> str:
    """A cell's text: fixed ``digits`` decimals for floats, ∞ / – for inf / NaN or None."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    return esc(value)


def significant(value: Any, digits: int = 3) -> str:
    """Floats to ``digits`` significant figures (per-example gains are ~1e-4 nats)."""
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.{digits}g}"
    return number(value)


def table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    digits: int = 3,
    formats: dict[str, Formatter] | None = None,
    raw: Sequence[str] = (),
    css: str = "",
) -> str:
    """An HTML table of ``rows`` (dicts) with ``columns`` in order.

    ``formats``: column -> function value → text (already escaped); ``raw``: columns whose
    values are trusted HTML fragments made by this package (never corpus text).
    """
    formats = formats or {}

    def cell(column: str, value: Any) -> str:
        if column in raw:
            return "" if value is None else str(value)
        if column in formats:
            return formats[column](value)
        return number(value, digits)

    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(c, r.get(c))}</td>" for c in columns) + "</tr>" for r in rows
    )
    klass = f' class="{esc(css)}"' if css else ""
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(png: bytes | None, alt: str, caption: str = "") -> str:
    """An ``<img>`` with the PNG embedded as a data URI ('' when there is no figure)."""
    if not png:
        return ""
    data = base64.b64encode(png).decode("ascii")
    text = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}">{text}</figure>'


def details(summary: str, body: str, open_: bool = False) -> str:
    """A collapsed block: ``summary`` (HTML) is shown, ``body`` on a click."""
    state = " open" if open_ else ""
    return f"<details{state}><summary>{summary}</summary>{body}</details>"


def section(anchor: str, title: str, body: str) -> str:
    """One top-level section with an anchor for the table of contents."""
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def page(title: str, header: str, contents: Sequence[tuple[str, str]], body: str) -> str:
    """The whole document. ``contents``: (anchor, title) of each section for the navigation."""
    nav = " · ".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t in contents)
    return _PAGE.format(title=esc(title), header=header, nav=nav, body=body)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1150px;
  margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.4; }}
h1 {{ margin-bottom: 0.2em; }}
h2 {{ border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }}
nav {{ font-size: 13px; margin: 0.5em 0 1em; }}
.runinfo {{ color: #555; font-size: 13px; }}
.verdict {{ font-size: 17px; padding: 0.7em 1em; border-left: 5px solid #7f8c8d;
  background: #f6f7f8; }}
.verdict.win {{ border-color: #27ae60; }} .verdict.lose {{ border-color: #c0392b; }}
.note {{ color: #8a5a00; background: #fff6e0; padding: 0.3em 0.6em; }}
table {{ border-collapse: collapse; margin: 0.8em 0; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; vertical-align: top; }}
th {{ background: #f3f3f3; }} td:first-child {{ text-align: left; }}
table.examples th:nth-last-child(-n+2), table.examples td:nth-last-child(2) {{ text-align: left; }}
table.examples td:last-child {{ text-align: left; font-family: ui-monospace, monospace;
  font-size: 12px; max-width: 560px; white-space: pre-wrap; word-break: break-all; }}
dl.glossary {{ display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px;
  font-size: 13px; margin: 0.4em 0; }}
dl.glossary dt {{ font-weight: 600; font-family: ui-monospace, monospace; }}
dl.glossary dd {{ margin: 0; }}
h3.glossary {{ font-size: 14px; margin: 0.8em 0 0.2em; }}
figure {{ margin: 1em 0; }} figcaption {{ font-size: 13px; color: #555; }}
img {{ max-width: 100%; display: block; }}
details {{ margin: 0.8em 0; }} summary {{ cursor: pointer; font-weight: 600; }}
pre {{ background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 12px; }}
</style></head><body>
<h1>{title}</h1>
{header}
<nav>{nav}</nav>
{body}
</body></html>
"""
