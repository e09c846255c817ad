"""Rich tables that are printed whole, whatever the width.

Rich fits a table to the console by shrinking its widest columns and cutting what no longer fits
with "…": at 80 columns — the width of any output that is not a terminal, a log file or a pipe —
``letter_index`` became ``letter_in…`` and an interval lost its upper bound. :func:`print_table`
never cuts: each column gets at least its longest word, cells wrap between words, and when even
the longest words cannot sit side by side (a very narrow terminal) the table is printed as plain
rows, one ``column: value`` line per cell.
"""

from __future__ import annotations

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

_UNBOUNDED = 1_000_000  # a console width no table reaches: measures a column's natural width


def print_table(table: Table, console: Console | None = None) -> None:
    """Print ``table`` on ``console`` (default: stdout) without cutting any cell.

    The table's columns are set to wrap (``overflow="fold"``, only a word longer than its whole
    column is ever split) and, when the table is wider than the console, given widths that keep
    every word whole; a table whose words cannot fit is printed as :func:`plain_rows`.
    """
    console = console or Console()
    for column in table.columns:
        column.overflow, column.no_wrap = "fold", False
    if _fit_columns(table, console):
        console.print(table)
    else:
        plain_rows(table, console)


def _fit_columns(table: Table, console: Console) -> bool:
    """Give each column a width between its longest word and its longest line so the table fits
    the console; False when the longest words alone are too wide."""
    wide = console.options.update_width(_UNBOUNDED)
    shortest, longest = [], []
    for column in table.columns:
        cells = [column.header, *column.cells] if table.show_header else list(column.cells)
        sizes = [Measurement.get(console, wide, cell) for cell in cells] or [Measurement(0, 0)]
        shortest.append(max(m.minimum for m in sizes))
        longest.append(max(m.maximum for m in sizes))
    natural = Measurement.get(console, wide, table).maximum
    if natural <= console.width:
        return True  # rich lays it out at its natural widths
    room = console.width - (natural - sum(longest))  # less borders and padding
    if sum(shortest) > room:
        return False
    # Everyone gets their longest word; the room left goes to the columns that would wrap, in
    # proportion to how much each one wants (longest line − longest word).
    spare, wants = room - sum(shortest), [hi - lo for lo, hi in zip(shortest, longest)]
    total = sum(wants)
    widths = [lo + (spare * want // total if total else 0) for lo, want in zip(shortest, wants)]
    for column, width in zip(table.columns, widths):
        column.width = max(width, 1)
    return True


def plain_rows(table: Table, console: Console) -> None:
    """The table as text: its title, then per row its non-empty cells as ``column: value``
    separated by `` · `` (lines wrap between words, nothing is cut)."""
    if table.title:
        console.print(table.title, soft_wrap=False)
    names = [_text(column.header, console).plain.strip() for column in table.columns]
    columns = [list(column.cells) for column in table.columns]
    for r in range(table.row_count):
        parts = []
        for name, cells in zip(names, columns):
            text = _text(cells[r], console)
            if text.plain.strip():
                parts.append(Text.assemble(f"{name}: " if name else "", text))
        console.print(Text(" · ").join(parts))


def _text(cell, console: Console) -> Text:
    """A cell as rich Text: markup strings rendered (indentation dropped), other renderables as
    their plain text."""
    if isinstance(cell, Text):
        return cell.copy()
    if isinstance(cell, str):
        return console.render_str(cell.strip())
    return Text(str(cell))
