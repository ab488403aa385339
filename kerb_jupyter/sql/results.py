"""A query result as shown in a notebook: bounded rows, column names and types, HTML and text forms."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from .pgtext import cell_text, pandas_column


@dataclass
class Column:
    """A result column: its name, its type as psql names it (``numeric(12,2)``), the type's OID and modifier."""

    name: str
    type_name: str
    oid: int = 0
    typmod: int = -1


@dataclass
class ResultSet:
    """Rows fetched for one statement. ``truncated`` means the server had more rows than were fetched."""

    statement: str
    columns: list[Column] = field(default_factory=list)
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    truncated: bool = False
    rowcount: int = -1
    status: str = ""
    elapsed: float = 0.0
    cluster: str = ""

    @property
    def has_rows(self) -> bool:
        return bool(self.columns)

    def to_pandas(self) -> Any:
        """A DataFrame with one column per result column; dtypes as in the README (integers stay exact)."""
        import pandas as pd

        frame = pd.DataFrame({i: pandas_column([r[i] for r in self.rows], c.oid)
                              for i, c in enumerate(self.columns)})
        frame.columns = [c.name for c in self.columns]  # by position: SELECT 1 AS a, 2 AS a keeps both
        return frame

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Any:
        return iter(self.rows)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        return self.rows[i]

    def summary(self) -> str:
        if not self.has_rows:
            count = f", {self.rowcount} row{'s' if self.rowcount != 1 else ''}" if self.rowcount >= 0 else ""
            return f"{self.status or 'OK'}{count} ({self.elapsed * 1000:.1f} ms on {self.cluster})"
        more = "+" if self.truncated else ""
        return (f"{len(self.rows)}{more} row{'s' if len(self.rows) != 1 else ''} "
                f"({self.elapsed * 1000:.1f} ms on {self.cluster})")

    def footer(self) -> str:
        if self.truncated:
            return (f"Showing the first {len(self.rows)} rows; more were not fetched "
                    "(use --limit N, or -o VAR / --dataframe to fetch all).")
        return self.summary()

    def __repr__(self) -> str:
        if not self.has_rows:
            return self.summary()
        names = [c.name for c in self.columns]
        oids = [c.oid for c in self.columns]
        cells = [[_text(v, o) for v, o in zip(row, oids)] for row in self.rows]
        widths = [max([len(n)] + [len(r[i]) for r in cells]) for i, n in enumerate(names)]
        line = " | ".join(n.ljust(w) for n, w in zip(names, widths))
        sep = "-+-".join("-" * w for w in widths)
        body = [" | ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
        return "\n".join([line, sep, *body, self.footer()])

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        # Both forms at once: IPython then skips its generic pretty-printer for text/plain.
        return {"text/plain": repr(self), "text/html": self._repr_html_()}

    def _repr_html_(self) -> str:
        if not self.has_rows:
            return f"<div class='kerbsql-status'>{html.escape(self.summary())}</div>"
        head = "".join(
            f"<th title='{html.escape(c.type_name)}'>{html.escape(c.name)}"
            f"<br><small>{html.escape(c.type_name)}</small></th>"
            for c in self.columns
        )
        oids = [c.oid for c in self.columns]
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_text(v, o))}</td>" for v, o in zip(row, oids)) + "</tr>"
            for row in self.rows
        )
        return (f"<table class='kerbsql'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
                f"<div class='kerbsql-footer'><small>{html.escape(self.footer())}</small></div>")


def _text(value: Any, oid: int) -> str:
    """A cell as psql prints it, cut at 200 characters for display."""
    text = cell_text(value, oid)
    return text if len(text) <= 200 else text[:199] + "…"
