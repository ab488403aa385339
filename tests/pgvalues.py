"""The all-types table's data and the comparisons with psql used by test_values.py (no fixtures here)."""

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


def literal(text: str, sql_type: str) -> str:
    return "'" + text.replace("'", "''") + "'::" + sql_type


def all_columns(base: list[list[str]]) -> list[tuple[str, str, list[str]]]:
    """(column, SQL type, SQL expression per row) for every type: scalars, then an array of each."""
    scalars = [(f"c_{n}", COLUMN_TYPE.get(n, n), SAMPLES[n], has == "t") for n, has in base]
    scalars += [(f"x_{re.sub(r'[^a-z0-9]+', '_', t)}", t, v, t == "kv_mood") for t, v in EXTRA.items()]
    columns = []
    for name, sql_type, values, has_array in scalars:
        columns.append((name, sql_type, [literal(v, sql_type) for v in values]))
        if has_array:
            columns.append((f"{name}_array", f"{sql_type}[]",
                            [f"ARRAY[{literal(v, sql_type)}, NULL]" for v in values]))
    return columns


def psql(sandbox, cache, sql: str, stdin: bool = False, tz: str = TZ, datestyle: str = "ISO, MDY",
         options: str = "") -> str:
    server = sandbox.servers["analytics"]
    env = {**os.environ, "KRB5CCNAME": f"FILE:{cache}", "KRB5_CONFIG": str(sandbox.realm.krb5_conf),
           "PGHOST": "localhost", "PGPORT": str(server.port), "PGDATABASE": "analytics",
           "PGUSER": sandbox.principal, "PGGSSENCMODE": "prefer", "PGTZ": tz, "PGDATESTYLE": datestyle,
           "PGOPTIONS": options}
    done = subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", "-At", "-z", "-0", "-P", f"null={NULL}",
                           *([] if stdin else ["-c", sql])], input=sql.encode() if stdin else None,
                          env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def psql_rows(sandbox, cache, sql: str, ncols: int, stdin: bool = False, tz: str = TZ,
              datestyle: str = "ISO, MDY", options: str = "") -> list[list[str]]:
    """Rows as psql -At prints them (fields and records NUL-separated: no PostgreSQL text holds a NUL)."""
    out = psql(sandbox, cache, sql, stdin, tz, datestyle, options)
    fields = out.removesuffix("\x00").split("\x00") if out else []
    assert len(fields) % ncols == 0, out
    return [fields[i:i + ncols] for i in range(0, len(fields), ncols)]


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
