"""How campaign figures are shown: ε as x/255, percentages, tables, and the report's building blocks.

A report is a list of :class:`Section` s, each a list of :class:`Block` s (a paragraph, a table, an image, a
list); the jinja2 templates in ``templates/`` render the same sections as ``report.html`` and ``summary.md``.
Text is plain: the templates escape it (HTML) or neutralise tags (Markdown); ```code``` spans are the only
inline markup.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

import pandas as pd

PERCENT = ("robust_accuracy", "ci_low", "ci_high", "clean_accuracy", "full_token_accuracy", "attack_success_rate",
           "csfr", "csfr_low", "csfr_high", "compression_only_failure_rate", "accuracy", "gap")


def format_eps(eps: float) -> str:
    """0.0313... -> "8/255" when ε is a multiple of 1/255 (how ε is usually quoted), else 4 significant digits."""
    if eps == 0:
        return "0"
    k = eps * 255
    if abs(k - round(k)) < 1e-6:
        return f"{Fraction(round(k), 255)}" if round(k) % 255 == 0 else f"{round(k)}/255"
    return f"{eps:.4g}"


def percent(value) -> str:
    """A fraction as a percentage with one decimal; "–" for a missing value."""
    return "–" if value is None or pd.isna(value) else f"{100 * value:.1f}"


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """Percentages with one decimal, ε as x/255, other floats with 3 decimals (a copy)."""
    out = table.copy()
    for col in out.columns:
        if col == "eps":
            out[col] = out[col].map(format_eps)
        elif col in PERCENT or str(col).endswith("_accuracy"):
            out[col] = out[col].map(percent)
        elif pd.api.types.is_float_dtype(out[col]):
            out[col] = out[col].map(lambda v: "–" if pd.isna(v) else f"{v:.3f}")
    return out


# ---------------------------------------------------------------------------------------------- report blocks
@dataclass
class Table:
    """Cells as display strings."""

    columns: list[str]
    rows: list[list[str]]

    @classmethod
    def of(cls, table: pd.DataFrame | list[dict], formatted: bool = False) -> "Table":
        """From a DataFrame (``formatted``: its cells are already display strings) or from rows of dicts."""
        frame = pd.DataFrame(table) if isinstance(table, list) else table
        shown = frame if formatted or isinstance(table, list) else display_table(frame)
        cells = shown.map(lambda v: "–" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v))
        return cls([str(c) for c in shown.columns], cells.values.tolist())


@dataclass
class Block:
    """``kind``: "p", "note", "warn", "verdict", "gate" (paragraphs), "table", "image", "list" or "pre"."""

    kind: str
    text: str = ""
    table: Table | None = None
    image: str | None = None  # base64 PNG
    items: list[str] = field(default_factory=list)


@dataclass
class Section:
    title: str
    blocks: list[Block]
    anchor: str | None = None


def paragraph(text: str, kind: str = "note") -> Block:
    return Block(kind, text=text)


def table_block(table: pd.DataFrame | list[dict], formatted: bool = False) -> Block:
    return Block("table", table=Table.of(table, formatted))


def image_block(alt: str, png_base64: str) -> Block:
    return Block("image", text=alt, image=png_base64)


# ---------------------------------------------------------------------------------------------- rendering
@lru_cache(maxsize=None)
def _environment(kind: str):
    import html
    import re

    import jinja2
    from markupsafe import Markup

    from ..safe_io import md_cell, md_text

    env = jinja2.Environment(loader=jinja2.PackageLoader("robustvtc.campaign", "templates"),
                             autoescape=kind == "html", trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True, undefined=jinja2.StrictUndefined)

    def inline(text: str):  # escaped text with `code` spans
        return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(str(text))))
    env.filters.update(inline=inline, md=md_text, md_cell=md_cell)
    return env


def render(template: str, **context) -> str:
    """Render ``templates/<template>`` (``report.html.j2`` with HTML autoescaping, ``summary.md.j2`` without)."""
    return _environment("html" if template.endswith(".html.j2") else "md").get_template(template).render(**context)
