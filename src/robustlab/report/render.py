"""Rendering a report :class:`~robustlab.report.document.Document`: Markdown, and one self-contained HTML page.

Markdown links its figures (``figures/*.png``); HTML inlines CSS and figures (base64 PNG), with no script
and no external resource. Text from the experiment file is escaped in both.
"""

from __future__ import annotations

import base64
import html

from robustlab.report.document import Document, Figure, Heading, Paragraph, Table


def _md(text: str) -> str:
    """Text for markdown: raw HTML escaped, since viewers that render HTML in markdown would run it.

    Names and labels come from the experiment file (an experiment called ``<script>...</script>``);
    ``&lt;`` displays as ``<`` in every viewer.
    """
    return html.escape(text, quote=False)


def _md_cell(text: str) -> str:
    return _md(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(doc: Document, figure_dir: str = "figures") -> str:
    lines = [f"# {_md(doc.title)}", ""]
    for block in doc.blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + _md(block.text), ""]
        elif isinstance(block, Paragraph):
            lines += [_md(block.text), ""]
        elif isinstance(block, Table):
            lines.append("| " + " | ".join(map(_md_cell, block.header)) + " |")
            lines.append("|" + "---|" * len(block.header))
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in block.rows]
            lines += ["", *([f"_{_md(block.caption)}_", ""] if block.caption else [])]
        elif isinstance(block, Figure):
            caption = _md(block.caption)
            alt = caption.replace("[", "\\[").replace("]", "\\]")
            lines += [f"![{alt}]({figure_dir}/{block.name}.png)", "", f"_{caption}_", ""]
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f0f0f0}td:first-child,td:nth-child(2){text-align:left}
tr.claimed{background:#fff6e0}figure{margin:1em 0}figcaption,.caption{font-size:12px;color:#555}
img{max-width:100%}
"""


def render_html(doc: Document) -> str:
    """One self-contained page: inline CSS, figures as base64 PNG data URIs, no script, no external URL."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(doc.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(doc.title)}</h1>",
    ]
    for block in doc.blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{esc(block.text)}</p>")
        elif isinstance(block, Table):
            parts.append(
                "<table><thead><tr>"
                + "".join(f"<th>{esc(h)}</th>" for h in block.header)
                + "</tr></thead><tbody>"
            )
            for row in block.rows:
                css = ' class="claimed"' if len(row) > 1 and row[1] == "claimed (paper)" else ""
                parts.append(f"<tr{css}>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
            parts.append("</tbody></table>")
            if block.caption:
                parts.append(f'<p class="caption">{esc(block.caption)}</p>')
        elif isinstance(block, Figure):
            data = base64.b64encode(block.png).decode("ascii")
            parts.append(
                f'<figure><img alt="{esc(block.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(block.caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)
