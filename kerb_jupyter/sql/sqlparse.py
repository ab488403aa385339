"""A small SQL lexer: split a cell into statements and turn ``:name`` into psycopg placeholders.

It understands what can hide a ``;`` or a ``:name``: single-quoted strings (with ``''``), E'' strings
(with backslash escapes), double-quoted identifiers, dollar-quoted bodies, ``--`` and nested ``/* */``
comments, ``::`` casts and array slices: directly inside a subscript (``a[1:n]``, ``a[:n]``) a ``:`` is always
the slice colon, never a parameter (write ``a[(:i)]`` to index with a parameter); ``ARRAY[:x]`` is a
constructor and binds. It does not parse SQL beyond that.

SQL runs as written: libpq stops reading a statement at its first NUL character, so a cell containing one (or a
text value bound to it) is refused before anything is sent (``refuse_nul``, ``refuse_nul_values``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import DatabaseError

_DOLLAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"(?<![A-Za-z0-9_$])\d+(\.\d+)?(e[+-]?\d+)?", re.IGNORECASE)


def refuse_nul(sql: str) -> None:
    """Raises DatabaseError (code ``nul_in_sql``) when ``sql`` contains a NUL character: libpq would send only
    the text before it (``DELETE FROM t<NUL> WHERE id = 1`` deletes every row)."""
    at = sql.find("\x00")
    if at >= 0:
        line = sql.count("\n", 0, at) + 1
        column = at - (sql.rfind("\n", 0, at) + 1) + 1
        raise DatabaseError(f"the SQL contains a NUL character (line {line}, column {column}); PostgreSQL would "
                            "run only the text before it, so nothing was run", code="nul_in_sql")


def refuse_nul_values(params: Mapping[str, Any]) -> None:
    """Raises DatabaseError (code ``nul_in_sql``) when a text value to bind (also inside a list, tuple or dict)
    contains a NUL character. ``bytes`` are sent as bytea, length-delimited, and may contain any byte."""
    for name, value in params.items():
        if _has_nul(value, 0):
            raise DatabaseError(f"the value of :{name} contains a NUL character, which PostgreSQL text cannot hold; "
                                "nothing was run", code="nul_in_sql")


def _has_nul(value: Any, depth: int) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if depth > 20:
        return False
    if isinstance(value, list | tuple | set | frozenset):
        return any(_has_nul(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return any(_has_nul(k, depth + 1) or _has_nul(v, depth + 1) for k, v in value.items())
    return False


def _tokens(sql: str) -> Iterator[tuple[str, int, int]]:
    """Yield (kind, start, end) for 'code', 'string', 'ident', 'comment' and 'semicolon' spans."""
    i, n = 0, len(sql)
    start = 0
    while i < n:
        c = sql[i]
        nxt = sql[i + 1] if i + 1 < n else ""
        end = -1
        kind = ""
        if c == "'":
            escapes = i > 0 and sql[i - 1] in "eE" and (i < 2 or not (sql[i - 2].isalnum() or sql[i - 2] == "_"))
            end, kind = _quoted(sql, i, "'", escapes), "string"
        elif c == '"':
            end, kind = _quoted(sql, i, '"', False), "ident"
        elif c == "-" and nxt == "-":
            nl = sql.find("\n", i)
            end, kind = (n if nl < 0 else nl), "comment"
        elif c == "/" and nxt == "*":
            end, kind = _block_comment(sql, i), "comment"
        elif c == "$":
            m = _DOLLAR.match(sql, i)
            if m and not (i > 0 and (sql[i - 1].isalnum() or sql[i - 1] == "_")):
                close = sql.find(m.group(0), m.end())
                end, kind = (n if close < 0 else close + len(m.group(0))), "string"
        elif c == ";":
            end, kind = i + 1, "semicolon"
        if kind:
            if start < i:
                yield "code", start, i
            yield kind, i, end
            i = start = end
        else:
            i += 1
    if start < n:
        yield "code", start, n


def _quoted(sql: str, i: int, q: str, backslash: bool) -> int:
    j = i + 1
    while j < len(sql):
        if backslash and sql[j] == "\\":
            j += 2
            continue
        if sql[j] == q:
            if j + 1 < len(sql) and sql[j + 1] == q:
                j += 2
                continue
            return j + 1
        j += 1
    return len(sql)


def _block_comment(sql: str, i: int) -> int:
    depth, j = 0, i
    while j < len(sql):
        if sql.startswith("/*", j):
            depth, j = depth + 1, j + 2
        elif sql.startswith("*/", j):
            depth, j = depth - 1, j + 2
            if depth == 0:
                return j
        else:
            j += 1
    return len(sql)


def split_statements(sql: str) -> list[str]:
    """Statements of a cell, without their ``;``; empty and comment-only statements are dropped.

    Raises DatabaseError (code ``nul_in_sql``) for a cell containing a NUL character."""
    refuse_nul(sql)
    out: list[str] = []
    current: list[str] = []
    meaningful = False
    for kind, s, e in _tokens(sql):
        if kind == "semicolon":
            if meaningful:
                out.append("".join(current).strip())
            current, meaningful = [], False
            continue
        current.append(sql[s:e])
        if kind != "comment" and sql[s:e].strip():
            meaningful = True
    if meaningful:
        out.append("".join(current).strip())
    return out


@dataclass
class _Scan:
    """What the binder remembers across tokens: the last non-blank character and word, and open brackets."""

    prev: str = ""
    word: str = ""
    nesting: list[bool] = field(default_factory=list)  # True: directly inside a subscript a[...]; False: ( or ARRAY[

    def operand_before(self) -> bool:
        return self.prev.isalnum() or self.prev in "_)]\"'$"

    def in_subscript(self) -> bool:  # where a ':' can only be a slice colon
        return bool(self.nesting) and self.nesting[-1]


def bind_names(sql: str) -> tuple[str, list[str]]:
    """Replace ``:name`` with ``%(name)s`` outside strings and comments; escape literal ``%``.

    Returns the SQL for psycopg and the names used, in order of first use. ``::`` casts and slice bounds
    (``a[1:n]``) are kept. With no names, the SQL is returned unchanged (psycopg then sends it without
    placeholders). Raises DatabaseError (code ``nul_in_sql``) for SQL containing a NUL character.
    """
    refuse_nul(sql)
    names: list[str] = []
    pieces: list[str] = []
    scan = _Scan()
    for kind, s, e in _tokens(sql):
        # Every literal % is doubled (psycopg reads % as a placeholder once there are parameters).
        text = sql[s:e].replace("%", "%%")
        if kind == "code":
            text = _bind_code(text, names, scan)
        elif kind in ("string", "ident"):
            scan.prev, scan.word = "'", ""
        pieces.append(text)
    if not names:
        return sql, []
    return "".join(pieces), names


def _bind_code(text: str, names: list[str], scan: _Scan) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ":" and i + 1 < len(text) and text[i + 1] == ":":
            out.append("::")
            scan.prev, scan.word = ":", ""
            i += 2
            continue
        if c == ":" and not scan.in_subscript():
            m = _NAME.match(text, i + 1)
            if m:
                if m.group(0) not in names:
                    names.append(m.group(0))
                out.append(f"%({m.group(0)})s")
                scan.prev, scan.word = "x", ""  # a parameter is an operand
                i = m.end()
                continue
        m = _NAME.match(text, i) if c.isalpha() or c == "_" else None
        if m and not (i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_$")):
            out.append(m.group(0))
            scan.prev, scan.word = m.group(0)[-1], m.group(0).upper()
            i = m.end()
            continue
        if c == "[":
            scan.nesting.append(scan.operand_before() and scan.word != "ARRAY")
        elif c == "(":
            scan.nesting.append(False)
        elif c in ")]" and scan.nesting:
            scan.nesting.pop()
        if not c.isspace():
            scan.prev, scan.word = c, scan.word if c.isalnum() or c in "_$" else ""
        out.append(c)
        i += 1
    return "".join(out)


def first_keyword(sql: str) -> str:
    """The statement's first keyword, upper-case, skipping comments (``SELECT``, ``WITH``, ...)."""
    for kind, s, e in _tokens(sql):
        if kind == "code" and sql[s:e].strip():
            m = _NAME.search(sql, s, e)
            return m.group(0).upper() if m else ""
        if kind != "comment" and sql[s:e].strip():
            return ""
    return ""


def code_words(sql: str) -> list[str]:
    """Upper-cased words outside strings, quoted identifiers and comments."""
    return [m.group(0).upper() for kind, s, e in _tokens(sql) if kind == "code" for m in _NAME.finditer(sql, s, e)]


def fingerprint_text(sql: str) -> str:
    """The statement with literals replaced by ``?`` and white space folded: the same query, whatever values."""
    out: list[str] = []
    for kind, s, e in _tokens(sql):
        text = sql[s:e]
        if kind == "comment":
            continue
        if kind == "string":
            out.append("?")
        elif kind == "code":
            out.append(_NUMBER.sub("?", text))
        else:
            out.append(text)
    return " ".join("".join(out).split())
