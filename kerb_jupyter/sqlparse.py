"""A small SQL lexer: split a cell into statements and turn ``:name`` into psycopg placeholders.

It understands what can hide a ``;`` or a ``:name``: single-quoted strings (with ``''``), E'' strings
(with backslash escapes), double-quoted identifiers, dollar-quoted bodies, ``--`` and nested ``/* */``
comments, and ``::`` casts. It does not parse SQL beyond that.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

_DOLLAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"(?<![A-Za-z0-9_$])\d+(\.\d+)?(e[+-]?\d+)?", re.IGNORECASE)


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
    """Statements of a cell, without their ``;``; empty and comment-only statements are dropped."""
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


def bind_names(sql: str) -> tuple[str, list[str]]:
    """Replace ``:name`` with ``%(name)s`` outside strings and comments; escape literal ``%``.

    Returns the SQL for psycopg and the names used, in order of first use. ``::`` casts are kept.
    With no names, the SQL is returned unchanged (psycopg then sends it without placeholders).
    """
    names: list[str] = []
    pieces: list[str] = []
    for kind, s, e in _tokens(sql):
        # Every literal % is doubled (psycopg reads % as a placeholder once there are parameters).
        text = sql[s:e].replace("%", "%%")
        pieces.append(_bind_code(text, names) if kind == "code" else text)
    if not names:
        return sql, []
    return "".join(pieces), names


def _bind_code(text: str, names: list[str]) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ":" and i + 1 < len(text) and text[i + 1] == ":":
            out.append("::")
            i += 2
            continue
        if c == ":" and (i == 0 or text[i - 1] != ":"):
            m = _NAME.match(text, i + 1)
            if m:
                if m.group(0) not in names:
                    names.append(m.group(0))
                out.append(f"%({m.group(0)})s")
                i = m.end()
                continue
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
