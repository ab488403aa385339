"""Reading a running ``COPY ... TO STDOUT``: its rows in blocks for a consumer thread, the connection left clean.

The C extension ``kerb_jupyter_copy`` (built by ``kerb-jupyter wheelhouse``, optional) reads the rows in blocks
of N MB without the GIL; without it, a Python loop does (the same blocks, slower: one libpq call per row). Either
way the COPY runs inside psycopg's copy context, which cancels it on the server on Ctrl-C, and the COPY's final
result (an error mid-COPY, the row count) is collected here. No pyarrow, no IPython.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg
from psycopg import errors as pgerrors

from ..core.errors import ConfigError

BLOCK_BYTES = 8 << 20  # CSV bytes per parsed block: big enough for pyarrow's threads, small enough to bound memory
READER_ENV = "KERB_JUPYTER_COPY_READER"  # "auto" (default), "c" (the extension or an error), "python"
ReadBlock = Callable[[int, int], tuple[int, bytearray]]
_OK = psycopg.pq.ExecStatus.COMMAND_OK


def stream(conn: psycopg.Connection[Any], sql: str, work: Callable[[bytearray], None],
           block_bytes: int = BLOCK_BYTES) -> tuple[int, int]:
    """Run the COPY and hand its CSV to ``work`` in blocks of whole rows, on one worker thread, in order.

    Returns (rows, bytes). The rows are read by the C extension (``copy_reader``) when installed, else in Python.
    """
    pipeline = Pipeline(work)
    read = copy_reader()
    try:
        with conn.cursor() as cur, cur.copy(sql) as copy:
            if read is not None:
                rows, total = _read_in_c(conn, read, pipeline, block_bytes)
            else:
                rows, total = _read_in_python(conn, cur, copy, pipeline, block_bytes)
        pipeline.finish()
    except KeyboardInterrupt:
        _drain(conn)
        raise
    finally:
        pipeline.close()
    return rows, total


def copy_reader() -> ReadBlock | None:
    """``kerb_jupyter_copy.read_block`` (the C extension) when installed and not turned off, else None.

    ``KERB_JUPYTER_COPY_READER=python`` always reads in Python; ``=c`` raises ConfigError when the extension is
    missing (auto falls back silently: the result is the same, only slower)."""
    wanted = os.environ.get(READER_ENV, "auto").strip().lower() or "auto"
    if wanted not in ("auto", "c", "python"):
        raise ConfigError(f"{READER_ENV}={wanted!r}: use auto, c or python")
    if wanted == "python":
        return None
    try:
        from kerb_jupyter_copy import read_block
    except ImportError as err:
        if wanted == "c":
            raise ConfigError(f"{READER_ENV}=c, but the COPY reader extension cannot be used: {err} "
                              "(install the kerb_jupyter_copy wheel `kerb-jupyter wheelhouse` builds, or "
                              "`pip install ./copyreader` in a source checkout)") from None
        return None
    reader: ReadBlock = read_block  # typed here too: mypy sees Any where the extension is not installed
    return reader


def _read_in_c(conn: psycopg.Connection[Any], read: ReadBlock, pipeline: Pipeline,
               block_bytes: int) -> tuple[int, int]:
    """Blocks of ``block_bytes`` filled in C without the GIL; the COPY's result is then collected here (libpq
    holds it: psycopg's copy context sees a finished COPY). Ctrl-C raises from ``read`` with the COPY running."""
    pgconn, total = conn.pgconn, 0
    while True:
        # pgconn_ptr: the PGconn's address (None once closed); psycopg's PGconn protocol does not declare it
        status, block = read(getattr(pgconn, "pgconn_ptr", None) or 0, block_bytes)
        if status < 0:  # the result first: an error mid-COPY is reported without parsing the last block
            rows = _end_copy(pgconn, status, conn.info.encoding)
        if block:
            total += len(block)
            pipeline.submit(block)
        if status < 0:
            return rows, total


def _read_in_python(conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any], copy: psycopg.Copy,
                    pipeline: Pipeline, block_bytes: int) -> tuple[int, int]:
    """The fallback: rows already buffered by libpq are taken without psycopg's per-row wait machinery; when none
    are, ``copy.read()`` waits (and on Ctrl-C psycopg cancels the COPY on the server)."""
    pgconn = conn.pgconn
    get = pgconn.get_copy_data
    buf, total = bytearray(), 0
    data: Any
    while True:
        n, data = get(1)
        if n > 0:
            buf += data
            continue
        if n < 0:
            rows = _end_copy(pgconn, n, conn.info.encoding)
            break
        if len(buf) >= block_bytes:  # checked when libpq's buffer runs dry, not per row
            total += len(buf)
            pipeline.submit(buf)
            buf = bytearray()
        data = copy.read()
        if not data:
            rows = cur.rowcount
            break
        buf += data
    if buf:
        total += len(buf)
        pipeline.submit(buf)
    return rows, total


def _drain(conn: psycopg.Connection[Any]) -> None:
    """After Ctrl-C: a COPY interrupted before its first row is left running by psycopg; cancel and finish it."""
    pgconn = conn.pgconn
    if conn.closed or pgconn.transaction_status != psycopg.pq.TransactionStatus.ACTIVE:
        return
    conn.cancel_safe()
    while pgconn.get_copy_data(0)[0] >= 0:
        pass
    while pgconn.get_result() is not None:
        pass


def _end_copy(pgconn: Any, n: int, encoding: str) -> int:
    """The COPY's last message was taken by our loop: read its final result here (psycopg did not see it)."""
    if n == -2:
        raise psycopg.OperationalError((pgconn.error_message or b"").decode(encoding, "replace").strip())
    res = pgconn.get_result()
    while pgconn.get_result() is not None:
        pass
    if res is None or res.status != _OK:
        raise pgerrors.error_from_result(res, encoding=encoding)
    return int(res.command_tuples or 0)


class Pipeline:
    """``work(block)`` on one worker thread, in order; at most ``depth`` blocks wait (bounded memory)."""

    def __init__(self, work: Callable[[bytearray], None], depth: int = 2) -> None:
        self._work = work
        self._depth = depth
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kerbsql-arrow")
        self._pending: deque[Future[None]] = deque()

    def submit(self, block: bytearray) -> None:
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()  # re-raises the worker's error here, which cancels the COPY
        self._pending.append(self._pool.submit(self._work, block))

    def finish(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)
