"""One statement's rows at the speed of COPY: ``COPY (query) TO STDOUT (FORMAT csv)`` into Arrow.

The statement runs on the cell's own psycopg connection (GSSAPI: ADBC's libpq cannot), with the same
``:name`` binding, sqlcommenter tag, statement timeout, audit record and Ctrl-C cancellation as
``query.run_sql``. Its result description gives the Arrow types (``arrowtypes``); CSV blocks of a few MB, read by
``copystream`` (in C when the ``kerb_jupyter_copy`` extension is installed), are parsed by pyarrow on a worker
thread while the next block streams in. No IPython here.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Protocol

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from psycopg import errors as pgerrors

from ..core.errors import ConfigError
from ..core.tagging import tag_statement
from .arrowtext import interval_parts, with_interval_parts
from .arrowtypes import ColumnPlan, Decoder, PgType, lookup_sql, plan_column, unknown_oids
from .copystream import BLOCK_BYTES, stream
from .query import ConnectionLost, QueryOptions, Step, bind_step, format_db_error, plan_cell
from .results import Column, ResultSet
from .sqlparse import code_words, first_keyword

# Session settings that make COPY's text unambiguous for the parsers (restored afterwards). TimeZone stays the
# session's: timestamptz text carries its offset, and fallbacks and ranges read as psql shows them there.
SESSION = {"DateStyle": "ISO, MDY", "IntervalStyle": "iso_8601", "extra_float_digits": "1",
           "bytea_output": "hex", "client_encoding": "UTF8"}
_OK = psycopg.pq.ExecStatus.COMMAND_OK


def copy_step(cell: str) -> Step | None:
    """The cell's statement if it is one that COPY can stream (SELECT, WITH, VALUES, TABLE, DML ... RETURNING)."""
    plan = plan_cell(cell)
    if len(plan) != 1:
        return None
    step = plan[0]
    if step.plain_query:
        return step
    returning = first_keyword(step.original) in ("INSERT", "UPDATE", "DELETE") and "RETURNING" in code_words(
        step.original)
    return step if returning else None


class Consumer(Protocol):
    """Where the blocks go: ``start`` once per attempt, ``work`` per block (worker thread), ``finish`` at the end."""

    notes: list[str]
    block_bytes: int

    def start(self, decoder: Decoder) -> None: ...
    def work(self, block: bytearray) -> None: ...
    def finish(self, rows: int, nbytes: int) -> None: ...
    def abort(self) -> None: ...


def run_copy(conn: psycopg.Connection[Any], cell: str, namespace: Mapping[str, Any], opts: QueryOptions,
             cluster: str = "", *, consumer: Consumer) -> list[ResultSet]:
    """Like ``query.run_sql`` for a cell that ``copy_step`` accepts; the rows go to ``consumer``.

    Raises ConfigError (a missing ``:name``), DatabaseError (SQL error, or a value Arrow cannot hold, naming
    column and value), ConnectionLost; KeyboardInterrupt after psycopg cancelled the COPY on the server.
    """
    step = copy_step(cell)
    if step is None:
        raise ConfigError("this cell cannot be streamed with COPY: one SELECT/WITH/VALUES/TABLE statement, "
                          "or INSERT/UPDATE/DELETE ... RETURNING")
    params = bind_step(step, namespace)
    started = time.perf_counter()
    try:
        result = _run(conn, step, params, opts, cluster, consumer)
    except BaseException as err:
        consumer.abort()
        if opts.observer is not None:
            opts.observer(step.original, None, err, time.perf_counter() - started)
        if not isinstance(err, psycopg.Error):
            raise
        if conn.broken or conn.closed:
            last = (str(err).strip().splitlines() or [type(err).__name__])[-1]
            raise ConnectionLost(f"the connection to cluster {cluster!r} was lost: {last}",
                                 statements_done=0) from None
        raise format_db_error(err, step.text) from None
    if opts.observer is not None:
        opts.observer(step.original, result, None, result.elapsed)
    return [result]


def _run(conn: psycopg.Connection[Any], step: Step, params: dict[str, Any] | None, opts: QueryOptions,
         cluster: str, consumer: Consumer) -> ResultSet:
    started = time.perf_counter()
    # COPY takes no parameters: they are merged as literals, client-side (the same text is described and run).
    inner = psycopg.ClientCursor(conn).mogrify(step.text, params) if params is not None else step.text
    saved = _set_session(conn, opts.timeout)
    try:
        columns = describe(conn, inner, sent=None if params else step.text)
        plans = plan_columns(conn, columns)
        consumer.start(Decoder(plans, conn.info.parameter_status("TimeZone") or "UTC"))
        sql = tag_statement(f"COPY ({inner}\n) TO STDOUT (FORMAT csv)", opts.comment, False)
        rows, nbytes = stream(conn, sql, consumer.work, consumer.block_bytes)
        consumer.finish(rows, nbytes)
    except BaseException:
        with contextlib.suppress(psycopg.Error):  # the first error is the one to report
            _restore_session(conn, saved)
        raise
    _restore_session(conn, saved)
    result = ResultSet(statement=step.original, cluster=cluster, status=f"COPY {rows}", rowcount=rows,
                       columns=[Column(p.name, p.type_name) for p in plans])
    result.elapsed = time.perf_counter() - started
    return result


def _set_session(conn: psycopg.Connection[Any], timeout: float | None) -> list[tuple[str, str]]:
    wanted = dict(SESSION)
    if timeout:
        wanted["statement_timeout"] = str(int(timeout * 1000))
    rows = conn.execute(  # one round trip: each row reads the old value, then sets the new one
        "SELECT n, current_setting(n), set_config(n, v, false) FROM unnest(%s::text[], %s::text[]) AS s(n, v)",
        [list(wanted), list(wanted.values())]).fetchall()
    return [(n, old) for n, old, _ in rows]


def _restore_session(conn: psycopg.Connection[Any], saved: list[tuple[str, str]]) -> None:
    if conn.closed or conn.broken or conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
        return  # the user's ROLLBACK restores settings changed inside the aborted transaction
    conn.execute("SELECT set_config(n, v, false) FROM unnest(%s::text[], %s::text[]) AS s(n, v)",
                 [[n for n, _ in saved], [v for _, v in saved]])


def describe(conn: psycopg.Connection[Any], sql: str, sent: str | None) -> list[tuple[str, int, int]]:
    """(name, type OID, typmod) of each result column, from a server-side Describe (nothing runs)."""
    pgconn, encoding = conn.pgconn, conn.info.encoding
    res = pgconn.prepare(b"", sql.encode(encoding))
    if res.status == _OK:
        res = pgconn.describe_prepared(b"")
    if res.status != _OK:
        err = pgerrors.error_from_result(res, encoding=encoding)
        if sent is not None:
            err._kerb_sent = sent  # type: ignore[attr-defined]  # lets format_db_error put a caret
        raise err
    return [((res.fname(i) or b"?").decode(encoding), res.ftype(i), res.fmod(i)) for i in range(res.nfields)]


def plan_columns(conn: psycopg.Connection[Any], columns: list[tuple[str, int, int]]) -> list[ColumnPlan]:
    """Column plans; types not known by OID (enums, domains, arrays of them) are read from pg_type."""
    types: dict[int, PgType] = {}
    wanted = unknown_oids([oid for _, oid, _ in columns])
    for _ in range(3):  # a domain over an array of an enum needs three rounds
        if not wanted:
            break
        for oid, name, kind, element, base, category, labels in conn.execute(lookup_sql(), [wanted]).fetchall():
            types[oid] = PgType(name, kind, element, base, tuple(labels), category)
        wanted = [o for o in unknown_oids([t.element for t in types.values()] + [t.base for t in types.values()])
                  if o and o not in types]
    return [plan_column(name, oid, typmod, types) for name, oid, typmod in columns]


class Collector:
    """Keeps every block in memory and builds one ``pyarrow.Table`` (``--dataframe``, ``--arrow``, ``--polars``)."""

    block_bytes = BLOCK_BYTES

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.table: pa.Table | None = None
        self._decoder: Decoder | None = None
        self._chunks: list[list[pa.ChunkedArray]] = []

    def start(self, decoder: Decoder) -> None:
        self._decoder, self.table = decoder, None
        self._chunks = [[] for _ in decoder.plans]

    def work(self, block: bytearray) -> None:
        assert self._decoder is not None
        for chunks, column in zip(self._chunks, self._decoder.decode(block)):
            chunks.append(column)

    def finish(self, rows: int, nbytes: int) -> None:
        decoder = self._decoder
        assert decoder is not None
        columns = [decoder.finish_column(i, chunks) for i, chunks in enumerate(self._chunks)]
        self._chunks = []
        if columns:  # each field says its PostgreSQL type (to_output's numpy-backed pandas reads it)
            self.table = pa.Table.from_arrays(columns, schema=pa.schema(
                [pa.field(p.name, c.type, metadata={"pg_type": p.type_name}) for p, c in zip(decoder.plans, columns)]))
        else:  # SELECT FROM t: rows without columns
            rows_only = pa.RecordBatch.from_struct_array(pa.array([{}] * max(rows, 0), pa.struct([])))
            self.table = pa.Table.from_batches([rows_only])
        self.notes = decoder.notes

    def abort(self) -> None:
        self._chunks = []


def to_output(table: pa.Table, kind: str, dtype_backend: str = "numpy") -> Any:
    """The table as ``kind``: "arrow" (itself), "polars", or "pandas" with numpy or pyarrow-backed dtypes.

    For numpy-backed pandas the table is consumed (not usable afterwards)."""
    if kind == "arrow":
        return table
    if kind == "polars":
        try:
            import polars
        except ImportError:
            raise ConfigError("--polars needs polars: pip install 'kerb_jupyter[polars]'") from None
        return polars.from_arrow(for_polars(table))
    if dtype_backend == "pyarrow":
        import pandas as pd

        return table.to_pandas(types_mapper=pd.ArrowDtype)
    return numpy_frame(table)


def numpy_frame(table: pa.Table) -> Any:
    """pandas with the dtypes of the psycopg path (README): nullable Int16/32/64 and boolean, Float64 with NaN and
    NULL apart, datetime64[us]; lists, numeric and uuid as Python objects; timestamptz in its zone. Consumes the table.
    """
    import pandas as pd

    names = table.column_names
    if not names:
        return table.to_pandas()
    table = table.rename_columns([str(i) for i in range(len(names))])  # types_mapper mixes up duplicate names
    objects: dict[int, Any] = {}
    for i, field in enumerate(table.schema):
        pg_type = (field.metadata or {}).get(b"pg_type", b"").decode()
        if pa.types.is_floating(field.type):
            objects[i] = _floats(table.column(i))
        elif pa.types.is_list(field.type) or (pg_type in ("numeric", "uuid") and pa.types.is_string(field.type)):
            objects[i] = _objects(table.column(i), pg_type)
        elif pa.types.is_dictionary(field.type):  # enums: str, as on the psycopg path (not category)
            table = table.set_column(i, field.with_type(pa.string()), table.column(i).cast(pa.string()))
    rest = table.select([i for i in range(len(names)) if i not in objects])
    del table
    nullable = {pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(), pa.int64(): pd.Int64Dtype(),
                pa.bool_(): pd.BooleanDtype()}
    # Frees each Arrow column once converted: the peak is not table + DataFrame.
    frame = rest.to_pandas(types_mapper=nullable.get, split_blocks=True, self_destruct=True)
    for i, values in sorted(objects.items()):
        frame.insert(i, str(i), values)
    frame.columns = names
    return frame


def _exact64(column: Any) -> Any:
    """float4 as float64 with its shortest digits (0.1, as psql prints it; not 0.10000000149011612)."""
    return pc.cast(pc.cast(column, pa.string()), pa.float64())


def _floats(column: pa.ChunkedArray) -> Any:
    import pandas as pd

    if column.type == pa.float32():
        column = _exact64(column)
    data = pc.fill_null(column, 0.0).to_numpy()
    return pd.arrays.FloatingArray(data, pc.is_null(column).to_numpy(zero_copy_only=False))


def _objects(column: pa.ChunkedArray, pg_type: str) -> Any:
    """Python lists (of exact values), Decimal for numeric text (NaN, Infinity), uuid.UUID: an object array."""
    import numpy as np

    if pa.types.is_list(column.type) and column.type.value_type == pa.float32():
        column = pa.chunked_array([pa.ListArray.from_arrays(c.offsets, _exact64(c.values), mask=c.is_null())
                                   for c in column.chunks], pa.list_(pa.float64()))
    make = {"numeric": Decimal, "_numeric": Decimal, "uuid": uuid.UUID, "_uuid": uuid.UUID}.get(pg_type)
    values = column.to_pylist()
    if make is not None and pa.types.is_list(column.type):
        values = [None if v is None else [make(x) if isinstance(x, str) else x for x in v] for v in values]
    elif make is not None:
        values = [None if v is None else make(v) for v in values]
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def for_polars(table: pa.Table) -> pa.Table:
    """polars reads neither month_day_nano intervals nor decimal256: structs of the three parts, and text."""
    for i, field in enumerate(table.schema):
        if field.type != (parts := with_interval_parts(field.type)):  # also interval[]
            column = pa.chunked_array([interval_parts(c) for c in table.column(i).chunks], parts)
            table = table.set_column(i, pa.field(field.name, parts), column)
        elif pa.types.is_decimal256(field.type):
            print(f"kerbsql: column {field.name!r} ({field.type}) is text in polars, which has no decimal that wide")
            text = [None if d is None else format(d, "f") for d in table.column(i).to_pylist()]  # no 1E-10
            table = table.set_column(i, pa.field(field.name, pa.string()), pa.array(text, pa.string()))
    return table


def result_output(result: ResultSet, kind: str, dtype_backend: str = "numpy") -> Any:
    """A ResultSet fetched the usual way (several statements, --limit) as ``kind``; Arrow types from the values."""
    if not result.has_rows:
        return result
    if kind == "pandas" and dtype_backend == "numpy":
        return result.to_pandas()
    columns = list(zip(*result.rows)) if result.rows else [() for _ in result.columns]
    table = pa.Table.from_arrays([pa.array(list(c)) for c in columns], names=[c.name for c in result.columns])
    return to_output(table, kind, dtype_backend)
