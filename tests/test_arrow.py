"""The COPY -> Arrow fast path (--dataframe, --arrow, --polars) against real PostgreSQL over GSSAPI."""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from decimal import Decimal
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import run

from kerb_jupyter.sql import arrow
from kerb_jupyter.sql.arrowtext import parse_array, parse_interval
from kerb_jupyter.sql.query import QueryOptions


@pytest.fixture
def plain(sandbox, shell):
    """A plain psycopg connection with psycopg's own binary loaders (the reference), over the shell's ticket."""
    info = sandbox.cluster_config("analytics")
    with psycopg.connect(**{k: info[k] for k in ("host", "port", "dbname", "gssencmode")}, user=sandbox.principal,
                         autocommit=True) as conn:
        yield conn


TYPES_SQL = r"""
DROP TABLE IF EXISTS every_type; DROP TYPE IF EXISTS mood; DROP DOMAIN IF EXISTS positive;
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy, "really"');
CREATE DOMAIN positive AS int CHECK (VALUE > 0);
CREATE TABLE every_type (
  id int, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8, n numeric(12, 4), nbig numeric(50, 10), nfree numeric,
  t text, vc varchar(20), c char(3), nm name, b bool, d date, tm time, ts timestamp, tstz timestamptz,
  iv interval, u uuid, by bytea, j json, jb jsonb, m mood, dom positive,
  ai int[], at text[], af float8[], an numeric[], ad date[], atz timestamptz[], ab bool[], am mood[]);
INSERT INTO every_type VALUES
 (1, -32768, -2147483648, -9223372036854775808, 'NaN', 'Infinity', 12345678.1234,
  '1234567890123456789012345678901234567890.0123456789', '0.000000000000000000000000000001',
  '', '', '', 'n', true, '0044-03-15', '00:00:00', '1999-01-08 04:05:06.000001', '2026-03-29 01:30:00+01',
  '1 year 2 mons 3 days 04:05:06.5', '12345678-1234-5678-1234-567812345678', '\x', '{"a": [1, "x"]}',
  '{"k": null}', 'sad', 1, '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}'),
 (2, 32767, 2147483647, 9223372036854775807, '-Infinity', '-1.5e-300', -0.0001,
  '-0.0000000001', '123456789012345678901234567890123456789012345678901234567890',
  'comma, "quote" and \ backslash', 'new
line', 'ab', 'name', false, '2026-11-22', '23:59:59.999999', '2026-11-22 04:30:00', '1900-01-01 00:00:00-05',
  '-1 days +02:00:00', '00000000-0000-0000-0000-000000000000', '\x00ff0a2c22', '[]', '"text"',
  'happy, "really"', 2147483647, '{1,NULL,-3}', '{"a,b","c\"d",NULL,"NULL","","\\"}', '{NaN,Infinity,1.5}',
  '{1.5,NULL,-100000000000000000000}', '{2026-01-01,NULL}', '{"2026-01-01 00:00:00+00",NULL}', '{t,f,NULL}',
  '{sad,"happy, \"really\""}'),
 (3, 0, 0, 0, 3.4028235e+38, 'NaN', 0, 0, '-1.5',
  'unicode ☃ Zoë 日本 😀', 'NULL', 'NA ', 'x', NULL, '2000-02-29', '12:00:00', '2000-01-01 00:00:00',
  '2000-01-01 00:00:00+05:30', '0 seconds', NULL, NULL, 'null', '{"nested": {"a": 1}}', 'ok', NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (4, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (5, 1, 1, 1, 1.5, 0.1, 1, 1, 1, E'tab\there\r\nCRLF', ' lead', 'z', 'y', true, '1970-01-01', '04:05:06',
  '1970-01-01 00:00:00', '1970-01-01 00:00:00+00', '-1 years -2 mons +3 days -04:05:06.000001', NULL,
  '\x5c', '{}', '{}', 'sad', 3, '{0}', '{" x "}', '{-0}', '{0.000001}', '{1999-12-31}', '{}', '{f}', '{}');
"""


def same(fast: Any, slow: Any, is_json: bool = False) -> bool:
    """One cell of the fast path equals the psycopg path's (json/uuid as text, intervals as psycopg maps them)."""
    if is_json and fast is not None:  # Arrow keeps the JSON text; psycopg parses it (JSON null -> None)
        return bool(json.loads(fast) == slow)
    if fast is None or slow is None:
        return fast is None and slow is None
    if isinstance(slow, float):
        return (math.isnan(slow) and math.isnan(fast)) or fast == slow
    if isinstance(slow, dt.timedelta):  # psycopg: a month is 30 days, a year 365
        years, months = divmod(abs(fast.months), 12)
        days = (365 * years + 30 * months) * (1 if fast.months >= 0 else -1) + fast.days
        return dt.timedelta(days=days, microseconds=fast.nanoseconds // 1000) == slow
    if isinstance(slow, bytes) and isinstance(fast, str):  # psycopg's binary loader knows no enum: raw bytes
        return fast.encode() == slow
    if isinstance(slow, uuid.UUID):
        return uuid.UUID(fast) == slow
    if isinstance(slow, Decimal) and isinstance(fast, str):
        return Decimal(fast) == slow
    if isinstance(slow, list):
        return isinstance(fast, list) and len(fast) == len(slow) and all(map(same, fast, slow))
    return bool(fast == slow)


def test_every_type_is_exact_cell_by_cell(shell, sandbox, plain, capsys):
    sandbox.servers["analytics"].admin(f'SET ROLE "{sandbox.principal}";' + TYPES_SQL, dbname="analytics")
    run(shell, "%kerbsql analytics SET TimeZone = 'America/New_York'")  # the instants must not care
    plain.execute("SET TimeZone = 'Asia/Kolkata'")
    with plain.cursor(binary=True) as cur:  # the psycopg path: fetchall() with psycopg's binary loaders
        cur.execute("SELECT * FROM every_type ORDER BY id")
        slow_rows, slow_names = cur.fetchall(), [d.name for d in cur.description]
    table = run(shell, "%kerbsql analytics --arrow SELECT * FROM every_type ORDER BY id")
    assert isinstance(table, pa.Table) and table.num_rows == len(slow_rows) == 5
    assert table.column_names == slow_names
    fast_rows = table.to_pylist()
    for fast, slow_row in zip(fast_rows, slow_rows):
        for (name, value), expected in zip(fast.items(), slow_row):
            if name != "am":  # psycopg returns an array of an unregistered enum as raw binary: checked below
                assert same(value, expected, name in ('j', 'jb')), (name, value, expected)
    assert [r["am"] for r in fast_rows] == [[], ["sad", 'happy, "really"'], None, None, []]
    types = {f.name: f.type for f in table.schema}
    assert types["i2"] == pa.int16() and types["i8"] == pa.int64() and types["f4"] == pa.float32()
    assert types["n"] == pa.decimal128(12, 4) and types["nbig"] == pa.decimal256(50, 10)
    assert types["nfree"] == pa.string()  # 60 integer digits + 30 decimals: no exact decimal: text, with a note
    said = capsys.readouterr().out
    assert "column 'nfree' (numeric) has NaN, Infinity or more than 76 digits: returned as text" in said
    assert types["b"] == pa.bool_() and types["d"] == pa.date32() and types["tm"] == pa.time64("us")
    assert types["ts"] == pa.timestamp("us") and types["tstz"] == pa.timestamp("us", "America/New_York")
    assert types["iv"] == pa.month_day_nano_interval() and types["by"] == pa.binary()
    assert types["m"] == pa.dictionary(pa.int32(), pa.string()) and types["dom"] == pa.int32()
    assert types["ai"] == pa.list_(pa.int32()) and types["atz"] == pa.list_(pa.timestamp("us", "America/New_York"))
    assert types["t"] == types["j"] == types["u"] == pa.string()
    assert table.column("m").type.value_type == pa.string()
    assert table.column("m").chunk(0).dictionary.to_pylist() == ["sad", "ok", 'happy, "really"']  # enum order
    assert run(shell, "%kerbsql analytics SHOW TimeZone").rows == [("America/New_York",)]  # restored
    polars = pytest.importorskip("polars")
    frame = run(shell, "%kerbsql analytics --polars SELECT id, iv, nbig, m FROM every_type ORDER BY id")
    assert isinstance(frame, polars.DataFrame) and frame.height == 5
    assert frame["iv"][0] == {"months": 14, "days": 3, "nanoseconds": 14706500000000}
    assert frame["nbig"][1] == "-0.0000000001" and frame["m"].to_list()[:2] == ["sad", 'happy, "really"']
    assert "column 'nbig' (decimal256(50, 10)) is text in polars" in capsys.readouterr().out


def test_many_blocks_give_the_same_table_as_one(conn):
    sql = ("SELECT g, g::text || E'\\n,\"' AS t, (g % 7)::numeric AS n, CASE WHEN g % 3 = 0 THEN NULL ELSE g END "
           "AS maybe FROM generate_series(1, 5000) g")
    whole, pieces = arrow.Collector(), arrow.Collector()
    pieces.block_bytes = 1000
    arrow.run_copy(conn, sql, {}, QueryOptions(), consumer=whole)
    arrow.run_copy(conn, sql, {}, QueryOptions(), consumer=pieces)
    assert pieces.table is not None and whole.table is not None
    assert pieces.table.column("t").num_chunks > 10
    assert pieces.table.equals(whole.table) and whole.table.num_rows == 5000
    assert whole.table.column("n").type == pa.decimal128(38, 0)


def test_values_arrow_cannot_hold_make_their_column_text_with_a_note(shell, capsys):
    """Never an error for the whole result: that column is PostgreSQL's text (every value of it), said in a note."""
    cases = {"SELECT 1 AS ok, 'infinity'::timestamp AS ts": ("ts", "timestamp", "'infinity'", ["infinity"]),
             "SELECT '-infinity'::date AS d": ("d", "date", "'-infinity'", ["-infinity"]),
             "SELECT 'NaN'::numeric(5, 2) AS n": ("n", "numeric", "'NaN'", ["NaN"]),
             "SELECT 'NaN'::numeric(50, 2) AS n": ("n", "numeric", "'NaN'", ["NaN"]),
             "SELECT '24:00:00'::time AS tm": ("tm", "time", "'24:00:00'", ["24:00:00"]),
             "SELECT ARRAY['infinity'::date, '2026-01-01'] AS ad": ("ad", "_date", "'infinity'",
                                                                     ["{infinity,2026-01-01}"]),
             "SELECT ARRAY[[1,2],[3,4]] AS grid": ("grid", "_int4", "'{{1,2},{3,4}}'", ["{{1,2},{3,4}}"])}
    for sql, (column, type_name, value, text) in cases.items():
        table = run(shell, f"%kerbsql analytics --arrow {sql}")
        out = capsys.readouterr().out
        assert f"kerbsql: column {column!r} ({type_name}) holds {value}, which Arrow cannot: the whole column is " \
               "returned as PostgreSQL's text" in out, (sql, out)
        assert table.column(column).type == pa.string() and table.column(column).to_pylist() == text, sql
    frame = run(shell, "%kerbsql analytics --dataframe SELECT 'NaN'::numeric(5, 2) AS n, 1.5::numeric(5,2) AS m")
    run(shell, "%kerbsql analytics CREATE TEMP TABLE once (d date)")  # DML ... RETURNING: run once, never again
    returned = run(shell, "%kerbsql analytics --arrow INSERT INTO once VALUES ('infinity'), ('2026-01-01') RETURNING d")
    assert returned.column("d").to_pylist() == ["infinity", "2026-01-01"]
    assert run(shell, "%kerbsql analytics SELECT count(*) FROM once").rows == [(2,)]
    n, m = frame.iloc[0]
    assert isinstance(n, Decimal) and n.is_nan() and repr(m) == "Decimal('1.50')"  # numeric text: Decimals


def test_a_value_arrow_cannot_hold_after_earlier_blocks_keeps_the_earlier_text_exact(conn):
    """The column turns text at its 5th block: the blocks decoded before are PostgreSQL's text as well."""
    sql = ("SELECT g, CASE WHEN g = 4000 THEN 'infinity' ELSE timestamptz '2026-01-01 00:00:00.5+00' + g * "
           "interval '1 day' END AS ts, CASE WHEN g = 4500 THEN NULL ELSE ARRAY[(g * 0.25)::float4] END AS af, "
           "CASE WHEN g = 4999 THEN '-infinity' ELSE date '2000-01-01' END AS d FROM generate_series(1, 5000) g")
    pieces = arrow.Collector()
    pieces.block_bytes = 1000
    arrow.run_copy(conn, sql, {}, QueryOptions(), consumer=pieces)
    assert pieces.table is not None and pieces.table.column("ts").num_chunks > 10
    conn.execute("SET TIME ZONE 'UTC'")
    want = {r[0]: r[1:] for r in conn.execute(
        sql.replace("END AS ts", "END::text AS ts").replace("END AS d", "END::text AS d")
        .replace("END AS af", "END::text AS af")).fetchall()}
    conn.execute("RESET TIME ZONE")
    got = pieces.table.to_pylist()
    assert [(r["ts"], r["d"]) for r in got] == [(want[g][0], want[g][2]) for g in range(1, 5001)]
    assert pieces.table.column("af").type == pa.list_(pa.float32())  # fits: stays typed
    assert sum("holds" in n for n in pieces.notes) == 2


def test_types_without_arrow_form_are_text_with_a_note(shell, capsys):
    table = run(shell, "%kerbsql analytics --arrow SELECT point(1, 2) AS p, '12:00+02'::timetz AS tz, "
                       "'NaN'::numeric AS n, int4range(1, 5) AS r")
    said = capsys.readouterr().out
    assert table.to_pylist() == [{"p": "(1,2)", "tz": "12:00:00+02", "n": "NaN", "r": "[1,5)"}]
    assert "column 'p' has type point, which has no Arrow mapping here: returned as text" in said
    assert "column 'n' (numeric) has NaN, Infinity or more than 76 digits: returned as text" in said


def test_outputs_pandas_backends_and_polars(shell):
    sql = "SELECT g AS id, g * 0.5 AS half, md5(g::text) AS label FROM generate_series(1, 100) g"
    df = run(shell, f"%kerbsql analytics --dataframe {sql}")
    assert df.shape == (100, 3) and str(df["id"].dtype) == "Int32"
    assert df["label"].iloc[0] == "c4ca4238a0b923820dcc509a6f75849b"
    run(shell, "%config KerbSqlMagics.dtype_backend = 'pyarrow'")
    df = run(shell, f"%kerbsql analytics --dataframe {sql}")
    assert str(df["id"].dtype) == "int32[pyarrow]" and str(df["half"].dtype).startswith("decimal128")
    polars = pytest.importorskip("polars")
    frame = run(shell, f"%kerbsql analytics --polars {sql}")
    assert isinstance(frame, polars.DataFrame) and frame.height == 100 and frame["id"].sum() == 5050
    out = run(shell, f"%kerbsql analytics -o kept --quiet --arrow {sql}")
    assert out is None and shell.user_ns["kept"].num_rows == 100


def test_parameters_tag_application_name_and_audit(shell, sandbox, tmp_path):
    marker = f"copy_{uuid.uuid4().hex[:8]}"
    shell.user_ns.update(city="Dublin", pct="100%", day=dt.date(2026, 1, 1), marker=marker)
    df = run(shell, "%%kerbsql analytics --dataframe\nSELECT count(*) AS n, :pct AS pct, :marker AS m, :day AS d, "
                    "'50%' AS lit FROM trips WHERE city = :city")
    assert df.to_dict("records") == [{"n": 200, "pct": "100%", "m": marker, "d": dt.date(2026, 1, 1), "lit": "50%"}]
    [line] = [x for x in sandbox.servers["analytics"].log_text().splitlines() if marker in x]
    assert "app=kerb_jupyter:alice@KERB.TEST" in line and "/*app='kerb_jupyter'" in line and "COPY (" in line
    assert "'Dublin'" in line  # merged client-side: COPY takes no parameters
    records = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert records[-1]["outcome"] == "ok" and records[-1]["rows"] == 1
    assert "Dublin" not in records[-1]["statement"] and records[-1]["statement"].startswith("SELECT count(*)")


def test_missing_parameter_and_sql_errors(shell, capsys):
    run(shell, "%kerbsql analytics --dataframe SELECT :nope")
    assert "the query uses :nope but there is no variable named 'nope'" in capsys.readouterr().err
    run(shell, "%%kerbsql analytics --arrow\nSELECT id,\n  missing_column FROM trips")
    err = capsys.readouterr().err
    assert "SQL error 42703" in err and "LINE 2:   missing_column FROM trips" in err
    run(shell, "%kerbsql analytics --arrow SELECT 1 / (g - 3000) FROM generate_series(1, 5000) g")
    assert "SQL error 22012: division by zero" in capsys.readouterr().err


def test_statement_timeout_and_settings_are_restored(shell, capsys):
    run(shell, "%kerbsql analytics --dataframe --timeout 0.2 SELECT pg_sleep(2)")
    assert "SQL error 57014: canceling statement due to statement timeout" in capsys.readouterr().err
    assert run(shell, "%kerbsql analytics SHOW statement_timeout").rows == [("0",)]
    assert run(shell, "%kerbsql analytics SHOW IntervalStyle").rows == [("postgres",)]


def test_statements_copy_cannot_run_keep_the_usual_path(shell):
    run(shell, "%kerbsql analytics CREATE TABLE IF NOT EXISTS ret (x int)")
    df = run(shell, "%%kerbsql analytics --dataframe\nTRUNCATE ret;\nINSERT INTO ret VALUES (1), (2);\n"
                    "SELECT * FROM ret")
    assert df["x"].tolist() == [1, 2]
    table = run(shell, "%kerbsql analytics --arrow --limit 1 SELECT x FROM ret ORDER BY x")
    assert table.to_pylist() == [{"x": 1}]
    ddl = run(shell, "%kerbsql analytics --dataframe CREATE TEMP TABLE nothing (x int)")
    assert ddl.status == "CREATE TABLE"
    returned = run(shell, "%kerbsql analytics --arrow INSERT INTO ret VALUES (3) RETURNING x * 10 AS y")
    assert returned.to_pylist() == [{"y": 30}]
    assert run(shell, "%kerbsql analytics SELECT count(*) FROM ret").rows == [(3,)]  # inserted exactly once
    run(shell, "%kerbsql analytics DROP TABLE ret")
    assert arrow.copy_step("SELECT 1; SELECT 2") is None and arrow.copy_step("SELECT 1 INTO t") is None
    assert arrow.copy_step("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d") is None


def test_empty_zero_column_and_huge_row_results(shell, tmp_path):
    table = run(shell, "%kerbsql analytics --arrow SELECT id, city, distance_km, 1 AS id FROM trips WHERE false")
    assert table.num_rows == 0 and table.column_names == ["id", "city", "distance_km", "id"]
    assert table.schema.field(2).type == pa.decimal128(8, 2)
    assert run(shell, "%kerbsql analytics --dataframe SELECT FROM generate_series(1, 3)").shape == (3, 0)
    big = run(shell, "%kerbsql analytics --arrow SELECT 1 AS n, repeat('x', 3000000) AS big")  # > pyarrow's block
    assert big.num_rows == 1 and len(big.column("big")[0].as_py()) == 3_000_000
    run(shell, f"%kerbsql analytics --to {tmp_path / 'empty.parquet'} SELECT id, city FROM trips WHERE false")
    assert pq.read_table(tmp_path / "empty.parquet").schema.names == ["id", "city"]


def test_parsers_of_interval_and_array_text():
    assert parse_interval("P1Y2M3DT4H5M6.5S") == (14, 3, 14706500000000)
    assert parse_interval("P-1Y-2M3DT-4H-5M-6.000001S") == (-14, 3, -14706000001000)
    assert parse_interval("PT0S") == (0, 0, 0)
    assert parse_array('{1,NULL,"NULL","a\\"b","c,d"}') == ["1", None, "NULL", 'a"b', "c,d"]
    assert parse_array("[0:1]={7,8}") == ["7", "8"]
    with pytest.raises(ValueError, match="one dimension"):
        parse_array("{{1},{2}}")


def test_without_pyarrow_dataframe_keeps_the_row_path_and_the_rest_says_why(shell, monkeypatch, capsys):
    import sys

    import kerb_jupyter.sql

    for name in ("pyarrow", "kerb_jupyter.sql.arrow", "kerb_jupyter.sql.export"):
        monkeypatch.setitem(sys.modules, name, None)  # as if pyarrow were not installed
        monkeypatch.delattr(kerb_jupyter.sql, name.rpartition(".")[2], raising=False)  # `from .sql import arrow`
    df = run(shell, "%kerbsql analytics --dataframe SELECT 1 AS x, 'a' AS y")
    assert df.to_dict("records") == [{"x": 1, "y": "a"}]
    run(shell, "%kerbsql analytics --arrow SELECT 1")
    assert "--dataframe, --arrow, --polars and --to need pyarrow: pip install 'kerb_jupyter[pandas]'" in (
        capsys.readouterr().err)


def test_inside_a_transaction_and_after_a_lost_connection(shell, sandbox):
    run(shell, "%kerbsql analytics BEGIN")
    run(shell, "%kerbsql analytics CREATE TEMP TABLE tx_rows AS SELECT 1 AS x")
    table = run(shell, "%kerbsql analytics --arrow SELECT x, now() = statement_timestamp() AS fresh FROM tx_rows")
    assert table.to_pylist() == [{"x": 1, "fresh": False}]  # ran inside the open transaction
    run(shell, "%kerbsql analytics ROLLBACK")
    assert run(shell, "%kerbsql analytics SHOW DateStyle").rows == [("ISO, MDY",)]
    pid = run(shell, "%kerbsql analytics SELECT pg_backend_pid()").rows[0][0]
    sandbox.servers["analytics"].admin(f"SELECT pg_terminate_backend({pid})")
    again = run(shell, "%kerbsql analytics --arrow SELECT pg_backend_pid() AS pid")
    assert again.num_rows == 1 and again.column("pid")[0].as_py() != pid  # reconnected once, as the usual path
