"""Every PostgreSQL type, in every output of %%kerbsql, against what psql itself prints for the same cells.

One table has a column of every base type the server's pg_type reports (plus arrays of each, an enum, a
domain, a composite, a range over the enum, and a few typmods and built-in ranges), rows of ordinary values,
edge values (including values Python cannot hold) and NULLs. A base type this file has no values for fails the
test by name: a type added by a later server version shows up here, it does not pass silently.
"""

from __future__ import annotations

import datetime as dt
import html.parser
import math
import os
import re
import subprocess
import uuid
from decimal import Decimal
from typing import Any

import pandas as pd
import pytest
from conftest import write_config
from IPython.core.interactiveshell import InteractiveShell

from kerb_jupyter import tickets

# Types whose values exist only in system catalogs: their input functions refuse every literal.
INTERNAL = {"pg_node_tree", "pg_ndistinct", "pg_dependencies", "pg_mcv_list", "pg_brin_bloom_summary",
            "pg_brin_minmax_multi_summary", "gtsvector"}

# Ordinary and edge values of every base type, as SQL literals' text. The column type of a few is narrowed.
SAMPLES: dict[str, list[str]] = {
    "bool": ["true", "false"],
    "bytea": ["\\x00ff10", "\\x", "\\x5c22"],
    "char": ["a", "", "\\"],
    "name": ["pg_class", "x" * 63, "with space"],
    "int8": ["9223372036854775807", "-9223372036854775808", "9007199254740993", "0"],
    "int2": ["32767", "-32768", "0"],
    "int4": ["2147483647", "-2147483648", "0"],
    "regproc": ["now", "-"],
    "text": ["hello", "", " spaced ", "two\nlines", "NULL", 'quote"back\\slash', "Zoë ☃", "tab\there"],
    "oid": ["4294967295", "0", "1259"],
    "tid": ["(0,1)", "(4294967295,65535)"],
    "xid": ["42", "4294967295"],
    "cid": ["7", "0"],
    "json": ['{"a": [1, 2.50, "x"],   "b":null}', "1e2", '"\\u00e9"'],
    "xml": ['<a x="1">t</a>', "plain text", "<b/>"],
    "point": ["(1.5,-2)", "(1e300,0.1)", "(NaN,-0)"],
    "lseg": ["[(0,0),(1,1)]"],
    "path": ["((0,0),(1,1),(2,0))", "[(0,0),(1e-5,3)]"],
    "box": ["(1,1),(0,0)"],
    "polygon": ["((0,0),(1,1),(1,0))"],
    "line": ["{1,-1,0}"],
    "cidr": ["192.168.100.128/25", "::1/128", "10/8"],
    "float4": ["0.1", "1e6", "123456", "-0", "Infinity", "-Infinity", "NaN", "3.4028235e38", "1e-45",
               "0.0001", "1.5e-5"],
    "float8": ["0.1", "1e15", "123456789012345", "-0", "Infinity", "-Infinity", "NaN", "1.7976931348623157e308",
               "5e-324", "0.0001", "0.00001", "100", "1e16"],
    "circle": ["<(1,2),3>"],
    "macaddr8": ["08:00:2b:01:02:03:04:05"],
    "money": ["12.50", "-92233720368547758.08", "0"],
    "macaddr": ["08:00:2b:01:02:03"],
    "inet": ["127.0.0.1", "192.168.0.1/24", "::ffff:1.2.3.4"],
    "aclitem": ["pg_monitor=r/pg_monitor"],
    "bpchar": ["ab", "", "abcde"],
    "varchar": ["hello", "", "x,y"],
    "date": ["2026-11-22", "0001-01-01", "9999-12-31", "infinity", "-infinity", "0044-03-15 BC",
             "10000-01-01", "5874897-12-31"],
    "time": ["04:05:06.789", "00:00:00", "24:00:00", "23:59:59.999999"],
    "timestamp": ["2026-11-22 04:30:00", "2026-11-22 04:30:00.5", "infinity", "-infinity",
                  "0044-03-15 12:00:00 BC", "10000-01-01 00:00:00", "9999-12-31 23:59:59.999999",
                  "0001-01-01 00:00:00"],
    "timestamptz": ["2026-11-22 04:30:00+00", "2026-06-01 12:00:00.123+02", "infinity", "-infinity",
                    "0044-03-15 12:00:00+00 BC", "10000-01-01 00:00:00+00", "9999-12-31 12:00:00+00",
                    "0001-01-01 12:00:00+00"],
    "interval": ["1 year 2 mons 3 days 04:05:06.789", "-1 days +23:00:00", "00:00:00", "178000000 years"],
    "timetz": ["04:05:06.789+05:30", "00:00:00-14:59", "24:00:00+00"],
    "bit": ["1010", "0000"],
    "varbit": ["101", ""],
    "numeric": ["12.50", "-0.000001", "NaN", "Infinity", "-Infinity", "1e-20",
                "123456789012345678901234567890.123456789", "0", "1e20"],
    "refcursor": ["c1"],
    "regprocedure": ["abs(integer)"],
    "regoper": ["||/"],
    "regoperator": ["+(integer,integer)"],
    "regclass": ["pg_class", "pg_catalog.pg_type"],
    "regtype": ["integer", "timestamp with time zone"],
    "uuid": ["12345678-1234-5678-1234-567812345678", "00000000-0000-0000-0000-000000000000"],
    "txid_snapshot": ["10:20:10,14,15"],
    "pg_lsn": ["16/B374D848", "0/0"],
    "tsvector": ["a fat cat sat", "'it''s':1A"],
    "tsquery": ["fat & (rat | cat)"],
    "regconfig": ["english"],
    "regdictionary": ["simple"],
    "jsonb": ['{"b": 1, "a": [1e2, null, 1.50]}', "[]"],
    "jsonpath": ["$.a[*] ? (@ > 1)"],
    "regnamespace": ["pg_catalog"],
    "regrole": ["pg_monitor"],
    "regcollation": ['"C"'],
    "pg_snapshot": ["10:20:10,14,15"],
    "xid8": ["18446744073709551615", "0"],
}
COLUMN_TYPE = {"bit": "bit(4)", "bpchar": "char(5)", "char": '"char"'}
USER_TYPES = """
DROP TABLE IF EXISTS kv_all; DROP TYPE IF EXISTS kv_moodrange, kv_pair, kv_mood CASCADE;
DROP DOMAIN IF EXISTS kv_posint;
CREATE TYPE kv_mood AS ENUM ('sad', 'ok', 'happy', 'I''m, "fine"');
CREATE DOMAIN kv_posint AS int4 CHECK (VALUE > 0);
CREATE TYPE kv_pair AS (a int, b text);
CREATE TYPE kv_moodrange AS RANGE (subtype = kv_mood);
"""
EXTRA = {  # column type -> values: user types, typmods shown in headers, built-in ranges (infinite bounds)
    "kv_mood": ["sad", "I'm, \"fine\"", "happy"],
    "kv_posint": ["1", "2147483647"],
    "kv_pair": ["(1,x)", "(,)", '(2,"a,b")'],
    "kv_moodrange": ["[sad,happy)", "empty", "(,ok]"],
    "numeric(12,2)": ["12.5", "-9999999999.99"],
    "varchar(10)": ["abc"],
    "timestamp(0) with time zone": ["2026-11-22 04:30:00.6+00"],
    "daterange": ["[2020-01-01,infinity)", "(,)"],
    "tstzrange": ["[2026-01-01 00:00+00,)"],
    "int8multirange": ["{[1,5), [10,20)}"],
}
NULL = "<NULL>"  # what psql prints for NULL here
TZ = "Asia/Kolkata"  # +05:30 today, +05:53:28 (local mean time) in year 1: offsets with minutes and seconds


@pytest.fixture(scope="module")
def ticket(sandbox, tmp_path_factory):
    cache = tmp_path_factory.mktemp("values") / "krb5cc"
    tickets.acquire_with_keytab(sandbox.principal, sandbox.keytab, cache)
    return cache


def _lit(text: str, sql_type: str) -> str:
    return "'" + text.replace("'", "''") + "'::" + sql_type


def all_columns(base: list[list[str]]) -> list[tuple[str, str, list[str]]]:
    """(column, SQL type, SQL expression per row) for every type: scalars, then an array of each."""
    scalars = [(f"c_{n}", COLUMN_TYPE.get(n, n), SAMPLES[n], has == "t") for n, has in base]
    scalars += [(f"x_{re.sub(r'[^a-z0-9]+', '_', t)}", t, v, t == "kv_mood") for t, v in EXTRA.items()]
    columns = []
    for name, sql_type, values, has_array in scalars:
        columns.append((name, sql_type, [_lit(v, sql_type) for v in values]))
        if has_array:
            columns.append((f"{name}_array", f"{sql_type}[]",
                            [f"ARRAY[{_lit(v, sql_type)}, NULL]" for v in values]))
    return columns


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


def psql(sandbox, cache, sql: str, stdin: bool = False, tz: str = TZ, datestyle: str = "ISO, MDY") -> str:
    server = sandbox.servers["analytics"]
    env = {**os.environ, "KRB5CCNAME": f"FILE:{cache}", "KRB5_CONFIG": str(sandbox.realm.krb5_conf),
           "PGHOST": "localhost", "PGPORT": str(server.port), "PGDATABASE": "analytics",
           "PGUSER": sandbox.principal, "PGGSSENCMODE": "prefer", "PGTZ": tz, "PGDATESTYLE": datestyle}
    done = subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", "-At", "-z", "-0", "-P", f"null={NULL}",
                           *([] if stdin else ["-c", sql])], input=sql.encode() if stdin else None,
                          env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def psql_rows(sandbox, cache, sql: str, ncols: int, stdin: bool = False, tz: str = TZ,
              datestyle: str = "ISO, MDY") -> list[list[str]]:
    """Rows as psql -At prints them (fields and records NUL-separated: no PostgreSQL text holds a NUL)."""
    out = psql(sandbox, cache, sql, stdin, tz, datestyle)
    fields = out.removesuffix("\x00").split("\x00") if out else []
    assert len(fields) % ncols == 0, out
    return [fields[i:i + ncols] for i in range(0, len(fields), ncols)]


@pytest.fixture
def shell(sandbox, ticket, tmp_path, monkeypatch):
    config = write_config(tmp_path / "kerb_jupyter.json", sandbox)
    monkeypatch.setenv("KRB5CCNAME", f"FILE:{ticket}")
    monkeypatch.setenv("KERB_JUPYTER_CONFIG", str(config))
    sh = InteractiveShell.instance()
    sh.run_cell("%load_ext kerb_jupyter")
    yield sh
    sh.run_cell("%unload_ext kerb_jupyter")
    InteractiveShell.clear_instance()


def kerbsql(shell, options: str, sql: str, tz: str = TZ) -> Any:
    res = shell.run_cell(f"%%kerbsql analytics {options}\nSET TIME ZONE '{tz}';\n{sql}")
    assert res.success, res.error_in_exec
    return res.result


QUERY = "SELECT * FROM kv_all ORDER BY id"
BOOL, BYTEA, INT8, INT2, INT4, OID, FLOAT4, FLOAT8, NUMERIC = 16, 17, 20, 21, 23, 26, 700, 701, 1700
DATE, TIME, TIMESTAMP, TIMESTAMPTZ, UUID = 1082, 1083, 1114, 1184, 2950
ARRAYS = {1000: BOOL, 1001: BYTEA, 1005: INT2, 1007: INT4, 1016: INT8, 1028: OID, 1021: FLOAT4, 1022: FLOAT8,
          1231: NUMERIC, 1009: 25, 1015: 1043, 1014: 1042, 1003: 19, 1182: DATE, 1183: TIME, 1115: TIMESTAMP,
          1185: TIMESTAMPTZ, 2951: UUID}


def python_value(text: str, oid: int) -> Any:
    """The exact Python equivalent of psql's text for a value of type ``oid`` (independent of kerb_jupyter):
    the documented Python type where it holds the value exactly, else the text itself."""
    if text == NULL:
        return None
    if oid == BOOL:
        return {"t": True, "f": False}[text]
    if oid in (INT2, INT4, INT8, OID):
        return int(text)
    if oid in (FLOAT4, FLOAT8):
        return float(text)
    if oid == NUMERIC:
        return Decimal(text)
    if oid == BYTEA:
        return bytes.fromhex(text.removeprefix("\\x"))
    if oid == UUID:
        return uuid.UUID(text)
    if oid == DATE and re.fullmatch(r"\d{4}-\d\d-\d\d", text):
        return dt.date.fromisoformat(text)
    if oid == TIME and re.fullmatch(r"([01]\d|2[0-3]):\d\d:\d\d(\.\d+)?", text):
        return dt.time.fromisoformat(text)
    if oid in (TIMESTAMP, TIMESTAMPTZ) and re.fullmatch(r"\d{4}-\d\d-\d\d [\d:.]+([+-][\d:]+)?", text):
        value = dt.datetime.fromisoformat(text)
        assert (value.tzinfo is not None) == (oid == TIMESTAMPTZ)
        return value
    if oid in ARRAYS and text.startswith("{"):
        return _array(text, ARRAYS[oid])
    return text


def _array(text: str, element: int) -> list[Any]:
    """PostgreSQL's array text (``{1,NULL,"a b"}``, nested) as Python lists of element values."""
    stack: list[list[Any]] = [[]]
    i = 1
    while i < len(text):
        ch = text[i]
        if ch == "{":
            stack.append([])
        elif ch == "}":
            done = stack.pop()
            if not stack:
                return done
            stack[-1].append(done)
        elif ch == '"':
            j, chars = i + 1, []
            while text[j] != '"':
                if text[j] == "\\":
                    j += 1
                chars.append(text[j])
                j += 1
            stack[-1].append(python_value("".join(chars), element))
            i = j
        elif ch != ",":
            j = i
            while text[j] not in ",}":
                j += 1
            item = text[i:j]
            stack[-1].append(None if item == "NULL" else python_value(item, element))
            i = j - 1
        i += 1
    raise AssertionError(f"unterminated array {text!r}")


def same(got: Any, want: Any) -> bool:
    """Equal and of the same type; NaN equals NaN; numerics keep their scale; aware datetimes their offset."""
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(same, got, want))
    if type(got) is not type(want):
        return False
    if isinstance(want, float) and math.isnan(want):
        return math.isnan(got)
    if isinstance(want, float):
        return got == want and math.copysign(1, got) == math.copysign(1, want)
    if isinstance(want, Decimal):
        return str(got) == str(want)
    if isinstance(want, dt.datetime):
        return got == want and got.utcoffset() == want.utcoffset()
    return bool(got == want)


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


class Cells(html.parser.HTMLParser):
    """The header and body cells of a result's HTML table, as text."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.head: list[str] = []
        self._cell: list[str] | None = None
        self._in_head = False

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag == "thead":
            self._in_head = True
        elif tag == "tr" and not self._in_head:
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "thead":
            self._in_head = False
        elif tag in ("td", "th") and self._cell is not None:
            (self.head if tag == "th" else self.rows[-1]).append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def shown(text: str) -> str:
    """A psql cell as the table shows it: NULL spelled out, long values cut at 200 characters."""
    text = "NULL" if text == NULL else text
    return text if len(text) <= 200 else text[:199] + "…"


def check_display(result, expected, table) -> None:
    rows, types = expected
    assert [(c.name, c.type_name) for c in result.columns] == [(n, t) for n, (_, t) in zip(table, types)]
    page = Cells()
    page.feed(result._repr_html_())
    assert page.head == [n + t for n, (_, t) in zip(table, types)]  # name, then the type under it
    want = [[shown(v) for v in row] for row in rows]
    for i, (got_row, want_row) in enumerate(zip(page.rows, want)):
        for name, got, cell in zip([c.name for c in result.columns], got_row, want_row):
            assert got == cell, f"HTML, row {i + 1}, column {name}: {got!r} != psql's {cell!r}"
    assert len(page.rows) == len(want)
    names = [c.name for c in result.columns]
    widths = [max([len(n)] + [len(r[j]) for r in want]) for j, n in enumerate(names)]
    lines = [" | ".join(n.ljust(w) for n, w in zip(names, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(r, widths)) for r in want]
    assert repr(result).split("\n")[:-1] == "\n".join(lines).split("\n")


def check_values(result, expected) -> None:
    rows, types = expected
    for i, (got_row, psql_row) in enumerate(zip(result.rows, rows)):
        for j, (got, text) in enumerate(zip(got_row, psql_row)):
            want = python_value(text, types[j][0])
            assert same(got, want), f"row {i + 1}, column {result.columns[j].name}: {got!r} != {want!r} ({text!r})"
    assert len(result.rows) == len(rows)


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
        oids = psql_rows(sandbox, ticket, "SELECT " + ", ".join(f"{_lit(t, 'regtype')}::oid" for _, t in described),
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
    from kerb_jupyter import db, pgtypes
    from kerb_jupyter.config import ClusterConfig

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


def test_dataframe_dtypes_keep_integers_nan_and_timestamps_exact(shell):
    frame = kerbsql(shell, "--dataframe", """
        SELECT * FROM (VALUES
            (9223372036854775807::int8, 'NaN'::float8, true, 32767::int2, '-2147483648'::int4, 4294967295::oid,
             timestamp '2026-01-01 00:00:00.000001', timestamptz '0001-01-01 12:00+00', 0.1::float4),
            (NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
            (9007199254740993, '-0'::float8, false, 0::int2, 0, 0::oid, timestamp '9999-12-31 23:59:59',
             timestamptz '2026-06-01 12:00+00', 'Infinity'::float4)
        ) AS t(i8, f8, b, i2, i4, o, ts, tstz, f4) ORDER BY i8 NULLS LAST""")
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
