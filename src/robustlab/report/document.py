"""The report as a document: a title and a list of blocks (headings, paragraphs, tables, figures).

Sections are assembled once into a :class:`Document` and rendered twice (:mod:`robustlab.report.render`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Figure:
    name: str
    png: bytes
    caption: str


@dataclass
class Document:
    title: str
    blocks: list[Any] = field(default_factory=list)

    def add(self, *blocks: Any) -> None:
        self.blocks.extend(b for b in blocks if b is not None)
