"""The all-types table of test_values.py through the COPY -> Arrow fast path (--arrow, --dataframe), against psql.

The fast path runs COPY in the session's time zone with IntervalStyle = iso_8601, so psql is asked for the same
rows under those settings (in UTC and in Asia/Kathmandu, +05:45 and +05:41:16 before 1920); every cell of the
Arrow table and of the DataFrame is compared with the exact Python equivalent of psql's text, and the dtypes
with the README's table. A column holding a value Arrow cannot hold (infinity, BC dates, 24:00:00, NaN in
numeric) must be PostgreSQL's text for every value, as psql shows it in that session, with a note.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import uuid
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from pgvalues import NULL, _array, psql_rows, same
from test_values import EDGE_ROWS, QUERY, shell, table, ticket  # noqa: F401  # the module's fixtures

ISO = "-c IntervalStyle=iso_8601"  # with PGTZ = the session's zone: the settings the fast path's COPY runs with
ZONES = ["UTC", "Asia/Kathmandu"]
ELEMENTS = {1000: 16, 1001: 17, 1005: 21, 1007: 23, 1016: 20, 1028: 26, 1021: 700, 1022: 701, 1231: 1700,
            1182: 1082, 1183: 1083, 1115: 1114, 1185: 1184, 2951: 2950, 1187: 1186}
_ISO_INTERVAL = re.compile(r"P(?:(-?\d+)Y)?(?:(-?\d+)M)?(?:(-?\d+)D)?(?:T(?:(-?\d+)H)?(?:(-?\d+)M)?(?:(-?[\d.]+)S)?)?")


def run(shell, code: str) -> Any:  # noqa: F811  # the fixture's name
    result = shell.run_cell(code)
    assert result.success, result.error_in_exec
    return result.result


@pytest.fixture(scope="module", params=ZONES)
def zone(request) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def rows(sandbox, ticket, table, zone):  # noqa: F811
    """psql's rows of the table under the fast path's session settings, in the session's time zone."""
    return psql_rows(sandbox, ticket, QUERY, len(table), tz=zone, options=ISO)


def in_zone(shell, zone: str) -> None:  # noqa: F811
    """The session's time zone for the next cells (the fast path's COPY runs in it)."""
    run(shell, f"%kerbsql analytics SET TIME ZONE '{zone}'")


def interval(text: str) -> tuple[int, int, int]:
    """ISO 8601 interval text (as psql prints it here) -> (months, days, nanoseconds)."""
    m = _ISO_INTERVAL.fullmatch(text)
    assert m is not None, text
    years, months, days, hours, minutes = (int(g or 0) for g in m.groups()[:5])
    nanos = (hours * 3600 + minutes * 60) * 10**9 + int(Decimal(m.group(6) or 0) * 10**9)
    return years * 12 + months, days, nanos


def want(text: str | None, arrow_type: pa.DataType, pg_type: str, frame: bool) -> Any:
    """The value the fast path must give for psql's ``text``: in the Arrow table, or (``frame``) the DataFrame.

    A string column is psql's text itself (as a DataFrame: Decimal for numeric, UUID for uuid, as on the
    psycopg path); a typed column the exact Python value of that text."""
    if text is None or text == NULL:
        return None
    if pa.types.is_list(arrow_type):
        return [want(e, arrow_type.value_type, pg_type.removeprefix("_"), frame) for e in _array(text, 0)]
    if pa.types.is_string(arrow_type) or pa.types.is_dictionary(arrow_type):
        convert = {"numeric": Decimal, "uuid": uuid.UUID}.get(pg_type) if frame else None
        return convert(text) if convert else text
    if pa.types.is_integer(arrow_type):
        return int(text)
    if pa.types.is_floating(arrow_type):
        return float(text) if frame or arrow_type == pa.float64() else float(np.float32(text))
    if pa.types.is_boolean(arrow_type):
        return {"t": True, "f": False}[text]
    if pa.types.is_decimal(arrow_type):
        return Decimal(text)
    if pa.types.is_binary(arrow_type):
        return bytes.fromhex(text.removeprefix("\\x"))
    if pa.types.is_date(arrow_type):
        return dt.date.fromisoformat(text)
    if pa.types.is_time(arrow_type):
        return dt.time.fromisoformat(text)
    if pa.types.is_timestamp(arrow_type):
        value = dt.datetime.fromisoformat(text)  # psql's offset, which ``same`` compares
        assert (value.tzinfo is not None) == (arrow_type.tz is not None)
        return value
    if arrow_type == pa.month_day_nano_interval():
        return interval(text)
    raise AssertionError(f"no expectation for {arrow_type}")


def plain(value: Any) -> Any:
    """A DataFrame or Arrow cell as a plain Python value (NULL as None) for ``same``."""
    if isinstance(value, (list, np.ndarray)):
        return [plain(v) for v in value]
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, pd.DateOffset):
        return tuple(value.kwds.get(k, 0) for k in ("months", "days", "nanoseconds"))
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    if type(value).__name__ == "MonthDayNano":
        return (value.months, value.days, value.nanoseconds)
    if isinstance(value, dict) and list(value) == ["months", "days", "nanoseconds"]:  # Parquet's and polars' form
        return tuple(value.values())
    if isinstance(value, (np.integer, np.bool_, np.floating)):
        return value.item()
    return value


def check_cell(got: Any, expect: Any, where: str) -> None:
    got = plain(got)
    if isinstance(expect, list):
        assert isinstance(got, list) and len(got) == len(expect), f"{where}: {got!r} != {expect!r}"
        for k, (g, e) in enumerate(zip(got, expect)):
            check_cell(g, e, f"{where}[{k}]")
        return
    if isinstance(expect, Decimal) and expect.is_nan():
        assert isinstance(got, Decimal) and got.is_nan(), f"{where}: {got!r} != NaN"
        return
    assert same(got, expect), f"{where}: {got!r} != psql's {expect!r}"


FELL_BACK = {"date", "time", "timestamp", "timestamptz", "numeric"}  # types with kv_all values Arrow cannot hold


def test_arrow_tables_hold_every_value_as_psql_prints_it(shell, table, zone, rows, capsys):  # noqa: F811
    in_zone(shell, zone)
    result = run(shell, f"%kerbsql analytics --arrow {QUERY}")
    notes = capsys.readouterr().out
    assert isinstance(result, pa.Table) and result.column_names == table and result.num_rows == len(rows)
    for j, field in enumerate(result.schema):
        pg_type = field.metadata[b"pg_type"].decode()
        if field.name.startswith("c_") and pg_type.removeprefix("_") in FELL_BACK - {"numeric"}:
            assert field.type == pa.string(), (field.name, field.type)  # infinity, BC, 24:00:00 in every one
            assert f"column {field.name!r} ({pg_type}) holds " in notes, field.name
        for i, value in enumerate(result.column(j).to_pylist()):
            check_cell(value, want(rows[i][j], field.type, pg_type, False), f"row {i + 1}, column {field.name}")
    mapped = {n: str(result.schema.field(n).type) for n in ("c_int8", "c_float4", "c_bool", "c_bytea", "c_interval",
                                                              "x_kv_mood", "x_kv_posint", "x_numeric_12_2_",
                                                              "c_int8_array", "x_timestamp_0_with_time_zone")}
    assert mapped == {"c_int8": "int64", "c_float4": "float", "c_bool": "bool", "c_bytea": "binary",
                      "c_interval": "month_day_nano_interval", "x_kv_mood": "dictionary<values=string, indices=int32, "
                      "ordered=0>", "x_kv_posint": "int32", "x_numeric_12_2_": "decimal128(12, 2)",
                      "c_int8_array": "list<item: int64>", "x_timestamp_0_with_time_zone": f"timestamp[us, tz={zone}]"}


def test_dataframes_hold_every_value_with_the_psycopg_paths_dtypes(shell, table, zone, rows):  # noqa: F811
    in_zone(shell, zone)
    frame = run(shell, f"%kerbsql analytics --dataframe {QUERY}")
    arrow_table = run(shell, f"%kerbsql analytics --arrow {QUERY}")
    assert list(frame.columns) == table and len(frame) == len(rows)
    dtypes = {"int2": "Int16", "int4": "Int32", "int8": "Int64", "oid": "Int64", "float4": "Float64",
              "float8": "Float64", "bool": "boolean", "timestamp": "datetime64[us]",
              "timestamptz": f"datetime64[us, {zone}]"}  # the session's zone, as on the psycopg path
    for j, field in enumerate(arrow_table.schema):
        pg_type = field.metadata[b"pg_type"].decode()
        column = frame.iloc[:, j]
        if pg_type in dtypes and not pa.types.is_string(field.type):
            assert str(column.dtype) == dtypes[pg_type], (field.name, pg_type, column.dtype)
        elif pa.string() in (field.type, getattr(field.type, "value_type", 0)) and pg_type not in ("numeric", "uuid"):
            assert pd.api.types.is_string_dtype(column.dtype), (field.name, column.dtype)  # pandas' default
        else:
            assert column.dtype == object, (field.name, column.dtype)
        for i in range(len(frame)):
            expect = want(rows[i][j], field.type, pg_type, True)
            got = column.array[i]
            if expect is None and isinstance(got, float) and math.isnan(got) and column.dtype != "Float64":
                got = None  # pandas' str dtype spells NULL as NaN
            check_cell(got, expect, f"DataFrame row {i + 1}, column {field.name} ({pg_type})")


def test_int8_with_nulls_nan_and_timestamps_are_exact_through_copy(shell, capsys):  # noqa: F811
    in_zone(shell, "UTC")  # the server's default is Etc/UTC here: that name would be the zone
    frame = run(shell, "%%kerbsql analytics --dataframe" + EDGE_ROWS)
    assert "kerbsql:" not in capsys.readouterr().out  # nothing fell back
    assert {c: str(t) for c, t in frame.dtypes.items()} == {
        "i8": "Int64", "f8": "Float64", "b": "boolean", "i2": "Int16", "i4": "Int32", "o": "Int64",
        "ts": "datetime64[us]", "tstz": "datetime64[us, UTC]", "f4": "Float64"}
    assert frame.i8.tolist() == [9007199254740993, 9223372036854775807, pd.NA]  # exact, never float64
    f8 = frame.f8.array
    assert math.isnan(f8[1]) and f8[2] is pd.NA and math.copysign(1, f8[0]) == -1  # NaN is not NULL
    assert frame.f4.tolist()[:2] == [math.inf, 0.1]  # float4 0.1 is psql's 0.1, not 0.10000000149011612
    assert frame.ts[1] == pd.Timestamp("2026-01-01 00:00:00.000001") and frame.ts[0].year == 9999
    assert frame.tstz[1] == pd.Timestamp("0001-01-01 12:00", tz="UTC")
    assert frame.b.tolist() == [False, True, pd.NA] and frame.ts[2] is pd.NaT
    free = run(shell, "%kerbsql analytics --dataframe SELECT x FROM (VALUES (12.50::numeric), (1.5), (NULL)) t(x)")
    assert [repr(x) for x in free.x] == ["Decimal('12.50')", "Decimal('1.50')", "None"]  # the README's caveat
    dup = run(shell, "%kerbsql analytics --dataframe SELECT 1 AS a, NULL::int8 AS a, 1.5::float8 AS f, ARRAY[1] AS l")
    assert list(dup.columns) == ["a", "a", "f", "l"] and [str(t) for t in dup.dtypes] == ["Int32", "Int64", "Float64",
                                                                                         "object"]
    only_objects = run(shell, "%kerbsql analytics --dataframe SELECT 1.5::float8 AS f, ARRAY[1] AS l")
    assert only_objects.shape == (1, 2) and only_objects.l[0] == [1]
    one = run(shell, "%kerbsql analytics --arrow SELECT x FROM (VALUES (NULL::int8), (1), (NULL)) t(x)")
    assert one.column("x").to_pylist() == [None, 1, None]  # a one-column NULL row is an empty CSV line: kept


def test_infinity_makes_its_column_text_and_leaves_the_rest_typed(shell, capsys):  # noqa: F811
    for option in ("--dataframe", "--arrow"):
        out = run(shell, f"""%%kerbsql analytics {option}
            SELECT g, CASE WHEN g = 2 THEN 'infinity'::date ELSE date '2026-01-01' + g END AS d,
                   CASE WHEN g = 3 THEN '24:00:00'::time ELSE time '12:00' END AS t,
                   CASE WHEN g = 1 THEN NULL ELSE g::int8 END AS n
            FROM generate_series(1, 3) g ORDER BY g""")
        said = capsys.readouterr().out
        assert "column 'd' (date) holds 'infinity', which Arrow cannot" in said
        assert "column 't' (time) holds '24:00:00', which Arrow cannot" in said
        rows = out.to_dict("records") if option == "--dataframe" else out.to_pylist()
        assert [(r["d"], r["t"]) for r in rows] == [("2026-01-02", "12:00:00"), ("infinity", "12:00:00"),
                                                    ("2026-01-04", "24:00:00")]
        assert [plain(r["n"]) for r in rows] == [None, 2, 3]
    assert str(out.schema.field("n").type) == "int64"
