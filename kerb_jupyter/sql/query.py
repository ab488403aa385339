"""Run a cell's SQL on one connection: split, bind ``:name`` parameters, tag, execute, fetch (bounded).

No IPython here: the magic is a thin layer over ``run_sql``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import psycopg
from psycopg import sql as pgsql

from ..core.errors import ConfigError, DatabaseError
from ..core.tagging import tag_statement
from . import pgtypes
from .results import Column, ResultSet
from .sqlparse import bind_names, code_words, first_keyword, refuse_nul_values, split_statements

CURSOR_NAME = "kerbsql"
DECLARE_PREFIX = f'DECLARE "{CURSOR_NAME}" CURSOR FOR '  # how psycopg's ServerCursor wraps the query


class ConnectionLost(DatabaseError):
    """The server went away (restart, failover); ``statements_done`` ran before it did."""

    code = "connection_lost"

    def __init__(self, message: str, statements_done: int) -> None:
        super().__init__(message)
        self.statements_done = statements_done


@dataclass
class QueryOptions:
    limit: int | None = None  # rows fetched per statement; None = all
    timeout: float | None = None  # statement_timeout, seconds
    comment: str = ""  # sqlcommenter tag put in front of each statement
    # Called after every statement with (statement, result or None, error or None): the audit log's hook.
    observer: Callable[[str, ResultSet | None, BaseException | None, float], None] | None = None


def run_sql(
    conn: psycopg.Connection[Any], cell: str, namespace: Mapping[str, Any], opts: QueryOptions, cluster: str = ""
) -> list[ResultSet]:
    """Execute every statement of ``cell``; returns one ResultSet per statement.

    Raises ConfigError for a missing ``:name`` variable, DatabaseError (SQLSTATE, message, position) for a
    failed statement, ConnectionLost when the server went away. On KeyboardInterrupt psycopg cancels the
    running statement on the server; the connection stays usable (an explicit transaction the user had open
    is then aborted, as in psql, and waits for their ROLLBACK).
    """
    plan = plan_cell(cell)
    if not plan:
        raise ConfigError("the cell has no SQL statement to run")
    prepared = [bind_step(step, namespace) for step in plan]  # all names checked before anything runs
    pgtypes.prepare(conn, opts.comment)
    results: list[ResultSet] = []
    if opts.timeout:
        conn.execute(pgsql.SQL("SET statement_timeout = {}").format(int(opts.timeout * 1000)))
    try:
        for step, params in zip(plan, prepared):
            original, text = step.original, step.text
            started = time.perf_counter()
            try:
                results.append(_run_one(conn, step, params, opts, cluster))
            except BaseException as err:
                if opts.observer is not None:
                    opts.observer(original, None, err, time.perf_counter() - started)
                if not isinstance(err, psycopg.Error):
                    raise
                if conn.broken or conn.closed:
                    last = (str(err).strip().splitlines() or [type(err).__name__])[-1]
                    raise ConnectionLost(
                        f"the connection to cluster {cluster!r} was lost: {last}",
                        statements_done=len(results),
                    ) from None
                raise format_db_error(err, text) from None
            if opts.observer is not None:
                opts.observer(original, results[-1], None, results[-1].elapsed)
    finally:
        if opts.timeout and not conn.closed and not conn.broken:
            _reset_timeout(conn)
    return results


def _reset_timeout(conn: psycopg.Connection[Any]) -> None:
    if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
        return  # RESET would fail too; the user's ROLLBACK ends the transaction and SET LOCAL is not used
    conn.execute("RESET statement_timeout")


@dataclass(frozen=True)
class Step:
    """One statement of a cell, lexed once: the user's text, psycopg's text, its parameter names, and whether
    PostgreSQL would run it as a plain query (so its rows can be streamed or read through a cursor)."""

    original: str
    text: str
    names: tuple[str, ...]
    plain_query: bool


@functools.lru_cache(maxsize=256)
def plan_cell(cell: str) -> tuple[Step, ...]:
    """The statements of a cell (cached: re-running a cell does not lex it again)."""
    steps = []
    for statement in split_statements(cell):
        text, names = bind_names(statement)
        steps.append(Step(statement, text, tuple(names), cursor_safe(statement)))
    return tuple(steps)


def bind_step(step: Step, namespace: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``:name`` values of one statement from ``namespace`` (None without names).

    Raises ConfigError for a name the namespace lacks, and for NUL in a text value.
    """
    if not step.names:
        return None
    missing = [n for n in step.names if n not in namespace]
    if missing:
        raise ConfigError(
            f"the query uses :{missing[0]} but there is no variable named {missing[0]!r} in the notebook"
        )
    values = {n: namespace[n] for n in step.names}
    refuse_nul_values(values)  # libpq/PostgreSQL text cannot hold NUL: refuse before anything is sent
    return values


def _run_one(
    conn: psycopg.Connection[Any], step: Step, params: dict[str, Any] | None, opts: QueryOptions, cluster: str,
) -> ResultSet:
    tagged = tag_statement(step.text, opts.comment, params is not None)
    started = time.perf_counter()
    result = ResultSet(statement=step.original, cluster=cluster)
    bounded = opts.limit is not None and step.plain_query
    idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    use_cursor = bounded and not idle
    try:
        if bounded and idle:
            _fetch_streaming(conn, tagged, params, opts.limit or 0, result)
        elif use_cursor:
            _fetch_through_server_cursor(conn, tagged, params, opts.limit or 0, result)
        else:
            _fetch_at_once(conn, tagged, params, opts.limit, result)
    except psycopg.Error as err:
        if params is None:  # with parameters the server sees $n placeholders: no position mapping
            # What the server saw, so an error position maps back onto the user's statement.
            err._kerb_sent = (DECLARE_PREFIX if use_cursor else "") + tagged  # type: ignore[attr-defined]
        raise
    result.elapsed = time.perf_counter() - started
    return result


def _fetch_at_once(
    conn: psycopg.Connection[Any], sql: str, params: dict[str, Any] | None, limit: int | None, result: ResultSet
) -> None:
    with conn.cursor() as cur:
        cur.execute(sql, params, prepare=False)
        if cur.description is not None:
            result.columns = _columns(conn, cur)
            stop = cur.pgresult.ntuples if cur.pgresult is not None else 0
            if limit is not None:
                stop = min(stop, limit + 1)
            rows = _load_rows(conn, cur, stop)
            result.truncated = limit is not None and len(rows) > limit
            result.rows = rows[:limit] if limit is not None else rows
        result.rowcount = cur.rowcount
        result.status = cur.statusmessage or ""


LOAD_CHUNK = 10_000


def _load_rows(conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any], stop: int) -> list[tuple[Any, ...]]:
    """The first ``stop`` rows of the cursor's result, with psycopg's C loaders; a chunk holding a value
    Python cannot hold (``infinity``, a BC date) is loaded again keeping that value's text."""
    rows: list[tuple[Any, ...]] = []
    result = cur.pgresult
    for start in range(0, stop, LOAD_CHUNK):
        assert result is not None
        rows.extend(pgtypes.load_rows(conn, result, start, min(start + LOAD_CHUNK, stop)))
    return rows


def _fetch_streaming(
    conn: psycopg.Connection[Any], sql: str, params: dict[str, Any] | None, limit: int, result: ResultSet
) -> None:
    """Rows arrive in chunks and only ``limit + 1`` are kept; if more remain, the statement is cancelled.

    One round trip for small results, bounded memory for huge ones, and the tagged statement is what
    pg_stat_activity shows. Outside a transaction only: a cancel inside one would abort it.
    """
    described: list[tuple[str, int, int]] = []
    with conn.cursor() as cur:
        rows: list[tuple[Any, ...]] = []
        stream = cast(Generator[Any, None, None], cur.stream(sql, params, size=min(limit + 1, 1000)))
        try:
            for row in stream:
                if not rows:
                    described = _raw_columns(cur)
                rows.append(row)
                if len(rows) > limit:
                    break
        finally:
            stream.close()  # cancels the rest on the server, if any
    if rows:
        result.columns = _named(conn, described)  # after the stream: the name lookup is a query
    else:
        # psycopg's stream() drops the description of an empty result: ask the server for it (no execution).
        result.columns = _describe(conn, sql, params)
    result.truncated = len(rows) > limit
    result.rows = rows[:limit]
    result.rowcount = len(result.rows)
    result.status = f"SELECT {len(result.rows)}{'+' if result.truncated else ''}"


def _describe(conn: psycopg.Connection[Any], sql: str, params: dict[str, Any] | None) -> list[Column]:
    """Column names and types of a statement, from a server-side Describe of it (nothing runs)."""
    text = sql
    if params is not None:  # psycopg's %(name)s placeholders -> $n, %% -> %
        for i, name in enumerate(params, 1):
            text = text.replace(f"%({name})s", f"${i}")
        text = text.replace("%%", "%")
    pgconn = conn.pgconn
    encoding = conn.info.encoding
    prepared = pgconn.prepare(b"", text.encode(encoding))
    if prepared.status != psycopg.pq.ExecStatus.COMMAND_OK:
        return []  # e.g. a parameter whose type the server cannot infer without its value
    res = pgconn.describe_prepared(b"")
    if res.status != psycopg.pq.ExecStatus.COMMAND_OK:
        return []
    return _named(conn, [((res.fname(i) or b"?").decode(encoding), res.ftype(i), res.fmod(i))
                         for i in range(res.nfields)])


def _fetch_through_server_cursor(
    conn: psycopg.Connection[Any], sql: str, params: dict[str, Any] | None, limit: int, result: ResultSet
) -> None:
    """Inside the user's transaction: only ``limit + 1`` rows ever leave the server (DECLARE / FETCH)."""
    own_transaction = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    if own_transaction:
        conn.execute("BEGIN")
    ok = False
    try:
        with conn.cursor(name=CURSOR_NAME) as cur:
            cur.itersize = limit + 1
            cur.execute(sql, params)
            assert cur.description is not None
            rows = cur.fetchmany(limit + 1)
            result.columns = _columns(conn, cur)
        result.truncated = len(rows) > limit
        result.rows = rows[:limit]
        result.rowcount = len(result.rows)
        result.status = f"SELECT {len(result.rows)}{'+' if result.truncated else ''}"
        ok = True
    finally:
        if own_transaction and not conn.broken:
            conn.execute("COMMIT" if ok else "ROLLBACK")


def cursor_safe(statement: str) -> bool:
    """A plain query that PostgreSQL accepts in DECLARE CURSOR (no SELECT INTO, no data-modifying WITH)."""
    keyword = first_keyword(statement)
    if keyword not in ("SELECT", "WITH", "VALUES", "TABLE"):
        return False
    words = set(code_words(statement))
    return not words & {"INTO", "INSERT", "UPDATE", "DELETE", "MERGE"}


def _raw_columns(cur: psycopg.Cursor[Any]) -> list[tuple[str, int, int]]:
    """(name, type OID, type modifier) of each column of the cursor's current result."""
    res = cur.pgresult
    return [(d.name, d.type_code, res.fmod(i) if res is not None else -1)
            for i, d in enumerate(cur.description or ())]


def _named(conn: psycopg.Connection[Any], described: list[tuple[str, int, int]]) -> list[Column]:
    names = pgtypes.column_type_names(conn, [(oid, mod) for _, oid, mod in described])
    return [Column(n, t, oid, mod) for (n, oid, mod), t in zip(described, names)]


def _columns(conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any]) -> list[Column]:
    return _named(conn, _raw_columns(cur))


def format_db_error(err: psycopg.Error, statement: str | None = None) -> DatabaseError:
    """One or a few lines: SQLSTATE, message, and a caret under the error position in the statement."""
    diag = err.diag
    state = diag.sqlstate or "?"
    msg = diag.message_primary or str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    lines = [f"SQL error {state}: {msg}"]
    if diag.message_detail:
        lines.append(f"DETAIL: {diag.message_detail}")
    if diag.message_hint:
        lines.append(f"HINT: {diag.message_hint}")
    pos = diag.statement_position
    if pos and statement and diag.internal_query is None and hasattr(err, "_kerb_sent"):
        lines.extend(_caret(statement, int(pos) - _prefix_len(statement, err)))
    return DatabaseError("\n".join(lines), code=f"sql_{state}")


def _prefix_len(statement: str, err: psycopg.Error) -> int:
    sent = getattr(err, "_kerb_sent", None)
    return len(sent) - len(statement) if isinstance(sent, str) and sent.endswith(statement) else 0


def _caret(statement: str, pos: int) -> list[str]:
    if pos < 1 or pos > len(statement) + 1:
        return []
    before = statement[: pos - 1]
    line_no = before.count("\n")
    line = statement.splitlines()[line_no] if statement.splitlines() else statement
    col = len(before) - (before.rfind("\n") + 1)
    return [f"LINE {line_no + 1}: {line}", " " * (len(f'LINE {line_no + 1}: ') + col) + "^"]
