"""Reports of an experiment: Markdown and a self-contained HTML page, the paper's claims beside measurements.

>>> from robustlab.report import write_report
>>> write_report("results/paper-mnist-quick")  # doctest: +SKIP
{'markdown': ..., 'html': ..., 'figures': ...}
"""

from robustlab.report.build import Document, build_document, render_html, render_markdown, write_report
from robustlab.report.data import load_claims, load_results

__all__ = [
    "Document",
    "build_document",
    "load_claims",
    "load_results",
    "render_html",
    "render_markdown",
    "write_report",
]
