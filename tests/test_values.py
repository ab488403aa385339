"""Every PostgreSQL type, in every output of %%kerbsql, against what psql itself prints for the same cells.

One table has a column of every base type the server's pg_type reports (plus arrays of each, an enum, a
domain, a composite, a range over the enum, and a few typmods and built-in ranges), rows of ordinary values,
edge values (including values Python cannot hold) and NULLs. A base type this file has no values for fails the
test by name: a type added by a later server version shows up here, it does not pass silently.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import pandas as pd
import pytest
from conftest import kerbsql_shell, write_config
from pgvalues import (
    BOOL,
    FLOAT4,
    FLOAT8,
    INT2,
    INT4,
    INT8,
    INTERNAL,
    OID,
    SAMPLES,
    TIMESTAMPTZ,
    TZ,
    USER_TYPES,
    all_columns,
    check_display,
    check_values,
    literal,
    psql,
    psql_rows,
    python_value,
    same,
)

from kerb_jupyter.core import tickets


@pytest.fixture(scope="module")
def ticket(sandbox, tmp_path_factory):
    cache = tmp_path_factory.mktemp("values") / "krb5cc"
    tickets.acquire_with_keytab(sandbox.principal, sandbox.keytab, cache)
    return cache


@pytest.fixture(scope="module")
def table(sandbox, ticket):
    """The all-types table, created over psql with the test ticket; yields its column names."""
    psql(sandbox, ticket, USER_TYPES)
    rows = psql_rows(sandbox, ticket, "SELECT typname, CASE WHEN typarray <> 0 THEN 't' ELSE 'f' END FROM pg_type "
                     "WHERE typtype = 'b' AND typnamespace = 'pg_catalog'::regnamespace AND typcategory <> 'A' "
                     "ORDER BY oid", 2)
    base = [r for r in rows if r[0] not in INTERNAL]
    names = [r[0] for r in base]
    print(f"\n{len(names)} base types in pg_type (internal, not tested: {sorted(INTERNAL)}):\n{' '.join(names)}")
    unknown = [n for n in names if n not in SAMPLES]
    assert not unknown, f"base types of this server without test values: add them to SAMPLES: {unknown}"
    columns = all_columns(base)
    nrows = max(len(v) for _, _, v in columns) + 1  # the last row is all NULLs
    ddl = "CREATE TABLE kv_all (id int PRIMARY KEY, " + ", ".join(f"{c} {t}" for c, t, _ in columns) + ");"
    inserts = [f"INSERT INTO kv_all VALUES ({i}, " + ", ".join(v[i] if i < len(v) else "NULL" for _, _, v in columns)
               + ");" for i in range(nrows)]
    psql(sandbox, ticket, "\n".join([ddl, *inserts]))
    yield ["id"] + [c for c, _, _ in columns]
    psql(sandbox, ticket, USER_TYPES.split("CREATE")[0])


@pytest.fixture
def shell(sandbox, ticket, tmp_path, monkeypatch):
    config = write_config(tmp_path / "kerb_jupyter.json", sandbox)
    with kerbsql_shell(monkeypatch, ticket, config) as sh:
        yield sh


def kerbsql(shell, options: str, sql: str, tz: str = TZ) -> Any:
    res = shell.run_cell(f"%%kerbsql analytics {options}\nSET TIME ZONE '{tz}';\n{sql}")
    assert res.success, res.error_in_exec
    return res.result


QUERY = "SELECT * FROM kv_all ORDER BY id"


@pytest.fixture(scope="module")
def expected(sandbox, ticket, table):
    """psql's rows of the table, and each column's (type OID, type name) as the result reports them."""
    rows = psql_rows(sandbox, ticket, QUERY, len(table))
    types = psql_rows(sandbox, ticket, """
        SELECT a.attname, CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END,
               format_type(CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END,
                           CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END)
        FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
        WHERE a.attrelid = 'kv_all'::regclass AND a.attnum > 0 ORDER BY a.attnum""", 3)
    assert [t[0] for t in types] == table
    return rows, [(int(t[1]), t[2]) for t in types]


def test_the_display_is_what_psql_prints(shell, table, expected):
    result = kerbsql(shell, "", QUERY)  # the display path: streamed, at most display_limit rows
    assert not result.truncated
    check_display(result, expected, table)
    check_values(result, expected)


def test_out_variables_hold_exact_python_values(shell, table, expected):
    kerbsql(shell, "-o r --quiet", QUERY)  # the fetch-everything path
    result = shell.user_ns["r"]
    check_values(result, expected)
    check_display(result, expected, table)


def test_inside_a_transaction_through_a_server_cursor(shell, table, expected):
    shell.run_cell("%kerbsql analytics BEGIN")
    result = kerbsql(shell, "--limit 100", QUERY)
    shell.run_cell("%kerbsql analytics ROLLBACK")
    check_display(result, expected, table)
    check_values(result, expected)


def test_dataframes_hold_the_same_values_with_exact_dtypes(shell, table, expected):
    frame = kerbsql(shell, "--dataframe", QUERY)
    rows, types = expected
    assert list(frame.columns) == table and len(frame) == len(rows)
    dtypes = {INT2: "Int16", INT4: "Int32", INT8: "Int64", OID: "Int64", FLOAT4: "Float64", FLOAT8: "Float64",
              BOOL: "boolean"}
    for j, (oid, name) in enumerate(types):
        column = frame.iloc[:, j]
        if oid in dtypes:
            assert str(column.dtype) == dtypes[oid], (table[j], name, column.dtype)
        for i, text in enumerate(row[j] for row in rows):
            want, got = python_value(text, oid), column.iloc[i]
            if want is None:
                assert got is None or got is pd.NA or got is pd.NaT or (isinstance(got, float) and math.isnan(got)), \
                    (table[j], i, got)
                continue
            if oid in (INT2, INT4, INT8, OID):
                got = int(got)
            elif oid in (FLOAT4, FLOAT8) or oid == BOOL:
                got = float(got) if oid != BOOL else bool(got)
            elif isinstance(got, pd.Timestamp):
                got = got.to_pydatetime()
            assert same(got, want), f"DataFrame row {i + 1}, column {table[j]} ({name}): {got!r} != {want!r}"


def test_other_statements_show_as_psql_does(shell, sandbox, ticket, table):
    """Anonymous records, untyped literals, SHOW, VALUES and UPDATE ... RETURNING (fetched at once, rows in no
    particular order) reach the outputs as psql prints them; headers as psql's \\gdesc names the types."""
    returning = "id, c_date, x_kv_mood, c_money, c_timestamptz_array, c_float4"
    statements = {
        "SELECT ROW(1, 'a b', NULL::int, ROW(2.5::float4, 'I''m, \"fine\"'::kv_mood)) AS r, 'plain' AS u, NULL AS n":
            None,
        "SHOW TimeZone": None,
        "VALUES ('sad'::kv_mood, 12.5::money, '[1,2)'::int4range, interval '1 mon', 1.5::numeric(4,1))": None,
        f"UPDATE kv_all SET id = id WHERE id < 4 RETURNING {returning}":
            f"SELECT {returning} FROM kv_all WHERE id < 4 ORDER BY id",
    }
    for sql, same_rows in statements.items():
        result = kerbsql(shell, "", sql)
        result.rows.sort(key=lambda r: r[0] if isinstance(r[0], int) else 0)
        rows = psql_rows(sandbox, ticket, same_rows or sql, len(result.columns))
        described = psql_rows(sandbox, ticket, sql + " \\gdesc", 2, stdin=True)
        oids = psql_rows(sandbox, ticket, "SELECT " + ", ".join(f"{literal(t, 'regtype')}::oid" for _, t in described),
                         len(described))[0]
        types = [(int(o), t) for o, (_, t) in zip(oids, described)]
        check_display(result, (rows, types), [n for n, _ in described])
        check_values(result, (rows, types))


def test_empty_results_name_their_types_with_modifiers(shell, table, expected):
    _, types = expected
    result = kerbsql(shell, "", "SELECT x_numeric_12_2_, x_kv_mood, c_timestamptz, c_bpchar, x_kv_posint "
                                "FROM kv_all WHERE false")  # streamed: no row, so the server describes it
    want = {n: t for n, (_, t) in zip(table, types)}
    assert [(c.name, c.type_name) for c in result.columns] == [(c.name, want[c.name]) for c in result.columns]
    assert [c.type_name for c in result.columns] == ["numeric(12,2)", "kv_mood", "timestamp with time zone",
                                                     "character(5)", "integer"]  # a domain reports its base type


def test_type_names_are_looked_up_once_per_connection(sandbox, ticket, table, tmp_path, monkeypatch):
    """The arrow path's entry point: built-in names come with the connection's set-up, a user type costs one
    query the first time only (counted in libpq's own protocol trace)."""
    from kerb_jupyter.core.config import ClusterConfig
    from kerb_jupyter.sql import db, pgtypes

    monkeypatch.setenv("KRB5CCNAME", f"FILE:{ticket}")
    cluster = ClusterConfig(name="analytics", **sandbox.cluster_config("analytics"))
    with db.connect(cluster, sandbox.principal) as conn:
        pgtypes.prepare(conn)
        mood = conn.execute("SELECT 'kv_mood'::regtype::oid::int").fetchone()[0]
        trace = tmp_path / "trace"
        with trace.open("w") as f:
            conn.pgconn.trace(f.fileno())
            first = pgtypes.type_names(conn, [16, 1184, 1700, 1042])
            queries_builtin = trace.read_text().count("\tParse\t")
            assert pgtypes.type_names(conn, [mood, 16]) == {mood: "kv_mood", 16: "boolean"}
            assert pgtypes.type_name(conn, 1700, (12 << 16) + 2 + 4) == "numeric(12,2)"
            after_user = trace.read_text().count("\tParse\t")
            pgtypes.type_names(conn, [mood])
            pgtypes.type_name(conn, 1700, (12 << 16) + 2 + 4)
            conn.pgconn.untrace()
        again = trace.read_text().count("\tParse\t")
    assert first == {16: "boolean", 1184: "timestamp with time zone", 1700: "numeric", 1042: "bpchar"}
    assert (queries_builtin, after_user, again) == (0, 2, 2)


# Integer extremes, NaN vs NULL, -0, float4 display, timestamps at both ends: one SELECT shared with the COPY path.
EDGE_ROWS = """
        SELECT * FROM (VALUES
            (9223372036854775807::int8, 'NaN'::float8, true, 32767::int2, '-2147483648'::int4, 4294967295::oid,
             timestamp '2026-01-01 00:00:00.000001', timestamptz '0001-01-01 12:00+00', 0.1::float4),
            (NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
            (9007199254740993, '-0'::float8, false, 0::int2, 0, 0::oid, timestamp '9999-12-31 23:59:59',
             timestamptz '2026-06-01 12:00+00', 'Infinity'::float4)
        ) AS t(i8, f8, b, i2, i4, o, ts, tstz, f4) ORDER BY i8 NULLS LAST"""


def test_dataframe_dtypes_keep_integers_nan_and_timestamps_exact(shell):
    frame = kerbsql(shell, "--dataframe", EDGE_ROWS)
    assert {c: str(t) for c, t in frame.dtypes.items()} == {
        "i8": "Int64", "f8": "Float64", "b": "boolean", "i2": "Int16", "i4": "Int32", "o": "Int64",
        "ts": "datetime64[us]", "tstz": f"datetime64[us, {TZ}]", "f4": "Float64"}
    assert frame.i8.tolist() == [9007199254740993, 9223372036854775807, pd.NA]  # exact, never float64
    f8 = frame.f8.array
    assert math.isnan(f8[1]) and f8[2] is pd.NA and math.copysign(1, f8[0]) == -1  # NaN is not NULL
    assert frame.f4.tolist()[:2] == [math.inf, 0.1]
    assert frame.ts[1] == pd.Timestamp("2026-01-01 00:00:00.000001") and frame.ts[0].year == 9999
    assert frame.tstz[1].utcoffset() == dt.timedelta(hours=5, minutes=53, seconds=28)  # local mean time, year 1
    assert frame.b.tolist() == [False, True, pd.NA]


def test_a_value_python_cannot_hold_deep_in_a_big_result_is_text_for_that_value_alone(shell):
    """-o fetches everything with the fast loaders; the chunk with ``infinity`` is loaded again, in place."""
    kerbsql(shell, "-o big --quiet", """
        SELECT g, CASE WHEN g IN (15000, 25000) THEN 'infinity'::date ELSE date '2000-01-01' + g END AS d,
               CASE WHEN g = 15001 THEN '24:00:00'::time ELSE time '12:00' END AS t
        FROM generate_series(1, 25000) AS g ORDER BY g""")
    rows = shell.user_ns["big"].rows
    assert [r[0] for r in rows] == list(range(1, 25001))
    assert all(r[1] == ("infinity" if r[0] in (15000, 25000) else dt.date(2000, 1, 1) + dt.timedelta(days=r[0]))
               for r in rows)
    assert [r[2] for r in rows if not isinstance(r[2], dt.time)] == ["24:00:00"] and rows[15000][2] == "24:00:00"


@pytest.mark.parametrize("zone", ["<+02:30>-02:30", "UTC+3"])
def test_a_session_time_zone_python_does_not_know_keeps_psqls_offsets(shell, sandbox, ticket, table, zone, caplog):
    """psycopg would show such timestamps in UTC (and warn); each value keeps the offset PostgreSQL gives it."""
    sql = "SELECT id, c_timestamptz, c_timestamptz_array FROM kv_all ORDER BY id"
    rows = psql_rows(sandbox, ticket, sql, 3, tz=zone)
    types = [(INT4, "integer"), (TIMESTAMPTZ, "timestamp with time zone"), (1185, "timestamp with time zone[]")]
    for options in ("", "-o r --quiet"):
        result = kerbsql(shell, options, sql, tz=zone) or shell.user_ns["r"]
        check_display(result, (rows, types), ["id", "c_timestamptz", "c_timestamptz_array"])
        check_values(result, (rows, types))
    assert isinstance(result.rows[0][1], dt.datetime) and "unknown PostgreSQL timezone" not in caplog.text


@pytest.mark.parametrize("style", ["SQL, DMY", "German", "Postgres, MDY"])
def test_a_non_iso_datestyle_shows_as_psql_shows_it(shell, sandbox, ticket, table, expected, style):
    """psycopg would parse these styles into dates the table then shows in ISO: they stay the session's text."""
    names = ["id", "c_date", "c_date_array", "c_time", "c_timestamp", "c_timestamptz", "c_timestamptz_array"]
    sql = f"SELECT {', '.join(names)} FROM kv_all ORDER BY id"
    rows = psql_rows(sandbox, ticket, sql, len(names), datestyle=style)
    types = [expected[1][table.index(n)] for n in names]
    for options in ("", "-o r --quiet"):
        result = kerbsql(shell, options, f"SET DateStyle = '{style}';\n{sql}") or shell.user_ns["r"]
        check_display(result, (rows, types), names)
        check_values(result, (rows, types))
    assert isinstance(result.rows[0][3], dt.time)  # time does not depend on DateStyle


def test_type_name_lookups_carry_the_statement_tag(shell, sandbox, table):
    """The catalog queries made for headers are tagged like the user's statements (log_statement = all)."""
    def lookups() -> tuple[int, int]:
        lines = [x for x in sandbox.servers["analytics"].log_text().splitlines() if "format_type(" in x]
        tagged = sum("/*app='kerb_jupyter'" in x for x in lines)
        return tagged, len(lines) - tagged
    before = lookups()
    kerbsql(shell, "", "SELECT x_kv_mood, x_kv_pair FROM kv_all")  # a new connection: built-ins, then user types
    after = lookups()
    assert after[0] >= before[0] + 2 and after[1] == before[1]


def test_dataframes_keep_duplicate_column_names_and_empty_results_typed(shell):
    frame = kerbsql(shell, "--dataframe", "SELECT 1 AS a, NULL::int8 AS a, 'x' AS b")
    assert list(frame.columns) == ["a", "a", "b"] and [str(t) for t in frame.dtypes[:2]] == ["Int32", "Int64"]
    empty = kerbsql(shell, "--dataframe", "SELECT 1::int2 AS n, 1.5::float8 AS f WHERE false")
    assert len(empty) == 0 and [str(t) for t in empty.dtypes] == ["Int16", "Float64"]
