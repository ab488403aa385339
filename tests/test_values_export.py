"""The all-types table through --polars and --to (.parquet, .csv, .arrow) in a non-UTC session, against psql.

Every file is read back: Parquet and Arrow cell by cell as ``test_values_arrow.py`` compares --arrow tables (the
Parquet file holds intervals as structs of months, days and nanoseconds), CSV as text, which must be psql's own
text for every cell. The session runs in Asia/Kathmandu (+05:45, +05:41:16 before 1920): the text of
``timestamp with time zone`` values that fall back to text, and of ``tstzrange``, is what psql shows there.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pandas as pd
import polars
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from pgvalues import NULL, psql_rows
from test_values import QUERY, shell, table, ticket  # noqa: F401  # the module's fixtures
from test_values_arrow import ISO, check_cell, in_zone, run, want
from traitlets import TraitError

from kerb_jupyter.sql.arrowtext import INTERVAL_PARTS
from kerb_jupyter.sql.arrowtypes import Decoder, plan_column

ZONE = "Asia/Kathmandu"


@pytest.fixture(scope="module")
def rows(sandbox, ticket, table):  # noqa: F811
    return psql_rows(sandbox, ticket, QUERY, len(table), tz=ZONE, options=ISO)


@pytest.fixture
def arrow_table(shell, table):  # noqa: F811
    """The --arrow table in the session's zone: the Arrow type of each column, checked against psql there."""
    in_zone(shell, ZONE)
    result = run(shell, f"%kerbsql analytics --arrow {QUERY}")
    assert result.column_names == table
    return result


def read_ipc(path: Any) -> pa.Table:
    with pa.ipc.open_file(path) as reader:
        return reader.read_all()


def check_table(got: pa.Table, rows: list[list[str]], arrow_table: pa.Table, what: str) -> None:
    """Each cell of ``got`` (read back from a file) is psql's value in the type the --arrow table has."""
    assert got.num_rows == len(rows) and got.column_names == arrow_table.column_names, what
    for j, field in enumerate(arrow_table.schema):
        pg_type = field.metadata[b"pg_type"].decode()
        assert got.schema.field(j).metadata[b"pg_type"].decode() == pg_type, (what, field.name)
        for i, value in enumerate(got.column(j).to_pylist()):
            check_cell(value, want(rows[i][j], field.type, pg_type, False), f"{what}, row {i + 1}, {field.name}")


def test_parquet_holds_every_type_intervals_as_structs(shell, rows, arrow_table, tmp_path, capsys):  # noqa: F811
    capsys.readouterr()
    run(shell, f"%kerbsql analytics --to {tmp_path / 'all.parquet'} {QUERY}")
    said = capsys.readouterr().out
    assert "column 'c_interval' (interval) is written to Parquet, which has no month-day-nano type, as " \
           "struct<months: int32, days: int32, nanoseconds: int64>" in said
    got = pq.read_table(tmp_path / "all.parquet")
    assert got.schema.field("c_interval").type == INTERVAL_PARTS
    assert got.schema.field("c_interval_array").type == pa.list_(INTERVAL_PARTS)
    assert got.schema.field("x_timestamp_0_with_time_zone").type == pa.timestamp("us", ZONE)
    check_table(got, rows, arrow_table, "Parquet")
    assert got.column("c_interval").to_pylist()[0] == {"months": 14, "days": 3, "nanoseconds": 14706789000000}


def test_arrow_files_hold_every_type_as_the_arrow_table(shell, rows, arrow_table, tmp_path):  # noqa: F811
    run(shell, f"%kerbsql analytics --to {tmp_path / 'all.arrow'} {QUERY}")
    got = read_ipc(tmp_path / "all.arrow")
    assert got.schema.remove_metadata() == arrow_table.schema.remove_metadata()
    check_table(got, rows, arrow_table, "Arrow IPC")


def test_csv_files_hold_psqls_text_in_the_sessions_zone(shell, table, rows, tmp_path):  # noqa: F811
    in_zone(shell, ZONE)
    run(shell, f"%kerbsql analytics --to {tmp_path / 'all.csv'} {QUERY}")
    got = pcsv.read_csv(tmp_path / "all.csv", convert_options=pcsv.ConvertOptions(
        column_types=dict.fromkeys(table, pa.string()), null_values=[""], strings_can_be_null=True,
        quoted_strings_can_be_null=False), parse_options=pcsv.ParseOptions(newlines_in_values=True))
    assert got.column_names == table and got.num_rows == len(rows)
    for j, name in enumerate(table):
        for i, value in enumerate(got.column(j).to_pylist()):
            assert (NULL if value is None else value) == rows[i][j], f"CSV, row {i + 1}, {name}"
    assert rows[0][table.index("x_tstzrange")] == '["2026-01-01 05:45:00+05:45",)'  # the session's zone, as psql


def test_polars_holds_every_value(shell, rows, arrow_table):  # noqa: F811
    frame = run(shell, f"%kerbsql analytics --polars {QUERY}")
    assert isinstance(frame, polars.DataFrame) and frame.columns == arrow_table.column_names
    assert frame.schema["x_timestamp_0_with_time_zone"] == polars.Datetime("us", ZONE)
    for j, field in enumerate(arrow_table.schema):
        pg_type = field.metadata[b"pg_type"].decode()
        for i, value in enumerate(frame.get_column(field.name).to_list()):
            check_cell(value, want(rows[i][j], field.type, pg_type, False), f"polars, row {i + 1}, {field.name}")


def test_text_fallbacks_and_typed_instants_are_in_the_sessions_zone(shell, capsys):  # noqa: F811
    """infinity makes a timestamptz column text: each value as psql shows it in Kathmandu, never in UTC."""
    in_zone(shell, ZONE)
    sql = ("SELECT g, CASE WHEN g = 2 THEN 'infinity' ELSE timestamptz '2000-01-01 00:00+00' END AS t, "
           "timestamptz '1900-01-01 00:00+00' + g * interval '1 hour' AS typed, "
           "tstzrange(timestamptz '2000-01-01 00:00+00', NULL) AS r FROM generate_series(1, 2) g ORDER BY g")
    for option in ("--arrow", "--dataframe", "--polars"):
        out = run(shell, f"%kerbsql analytics {option} {sql}")
        assert "column 't' (timestamptz) holds 'infinity'" in capsys.readouterr().out
        got = out.to_pylist() if option == "--arrow" else out.to_dict("records") if option == "--dataframe" \
            else out.to_dicts()
        assert [(r["t"], r["r"]) for r in got] == [("2000-01-01 05:45:00+05:45", '["2000-01-01 05:45:00+05:45",)'),
                                                   ("infinity", '["2000-01-01 05:45:00+05:45",)')], option
        typed = [r["typed"] for r in got]
        assert [str(v.utcoffset()) for v in typed] == ["5:41:16", "5:41:16"], option  # local mean time, as psql
        assert typed[0] == dt.datetime(1900, 1, 1, 1, tzinfo=dt.timezone.utc), option


@pytest.mark.parametrize("setting, arrow_zone, offset", [("UTC+3", "Etc/GMT+3", "-03"),
                                                         ("<+02:30>-02:30", "UTC", "+02:30"),
                                                         ("CET-1CEST,M3.5.0,M10.5.0/3", "UTC", "+02")])
def test_a_posix_session_zone_becomes_its_iana_name(shell, sandbox, ticket, setting, arrow_zone, offset,  # noqa: F811
                                                    capsys):
    """A POSIX zone of whole hours is its Etc/GMT name; one polars cannot take (+02:30) or with rules: UTC, said so."""
    in_zone(shell, setting)
    sql = "SELECT timestamptz '2026-06-01 12:00+00' AS t, ARRAY[timestamptz '2026-06-01 12:00+00'] AS a"
    text = psql_rows(sandbox, ticket, sql, 2, tz=setting)[0]
    assert text[0] == f"2026-06-01 {12 + int(offset[:3]):02d}:{offset[4:] or '00'}:00{offset}"
    for option in ("--arrow", "--polars"):
        got = run(shell, f"%kerbsql analytics {option} {sql}")
        said = capsys.readouterr().out
        if option == "--polars":
            assert got.schema["t"] == polars.Datetime("us", arrow_zone)
            got = got.to_arrow()
        assert got.schema.field("t").type == pa.timestamp("us", arrow_zone)
        assert got.schema.field("a").type.value_type == pa.timestamp("us", arrow_zone)
        value, element = got.column("t")[0].as_py(), got.column("a")[0].as_py()[0]
        assert value == element == dt.datetime(2026, 6, 1, 12, tzinfo=dt.timezone.utc)
        if arrow_zone == "UTC":
            assert f"column 't' (timestamptz) is in UTC: the session's time zone {setting!r} is not one" in said
            assert "column 'a' (_timestamptz) is in UTC" in said
        else:
            check_cell(value, want(text[0], got.schema.field("t").type, "timestamptz", False), "t")
            assert element.utcoffset() == value.utcoffset() and "kerbsql:" not in said


def test_zero_row_parquet_with_intervals(shell, tmp_path):  # noqa: F811
    run(shell, f"%kerbsql analytics --to {tmp_path / 'none.parquet'} "
               "SELECT c_interval, c_interval_array, c_timestamptz FROM kv_all WHERE false")
    got = pq.read_table(tmp_path / "none.parquet")
    assert got.num_rows == 0 and got.schema.types[:2] == [INTERVAL_PARTS, pa.list_(INTERVAL_PARTS)]


def test_dtype_backend_takes_pandas_names(shell):  # noqa: F811
    magics: Any = shell.magics_manager.registry["KerbSqlMagics"]
    sql = "SELECT 1::int8 AS i, NULL::float8 AS f"
    for name in ("numpy_nullable", "numpy"):
        run(shell, f"%config KerbSqlMagics.dtype_backend = '{name}'")
        frame = run(shell, f"%kerbsql analytics --dataframe {sql}")
        assert [str(t) for t in frame.dtypes] == ["Int64", "Float64"], name
        frame = run(shell, f"%%kerbsql analytics --dataframe\nSELECT 1;\n{sql}")  # the usual path, then converted
        assert [str(t) for t in frame.dtypes] == ["Int64", "Float64"], name
    run(shell, "%config KerbSqlMagics.dtype_backend = 'pyarrow'")
    frame = run(shell, f"%kerbsql analytics --dataframe {sql}")
    assert [t for t in frame.dtypes] == [pd.ArrowDtype(pa.int64()), pd.ArrowDtype(pa.float64())]
    with pytest.raises(TraitError, match=r"expected any of \['numpy_nullable', 'pyarrow', 'numpy'\], not the str 'np'"):
        magics.dtype_backend = "np"
    assert magics.dtype_backend == "pyarrow"


def test_a_late_infinity_turns_earlier_blocks_into_the_sessions_text(sandbox, ticket):  # noqa: F811
    """Blocks decoded as typed instants before ``infinity`` arrives become text as psql shows them in the session
    (+05:41:16 before 1920, +05:30 after), not UTC. The Decoder gets COPY's blocks as COPY writes them in that zone
    (when blocks break depends on the network, so the blocks are cut here)."""
    sql = ("SELECT g, CASE WHEN g = 3000 THEN 'infinity' ELSE timestamptz '1900-01-01 00:00:00.5+00' + g * interval "
           "'100 hours' END AS t, ARRAY[timestamptz '2000-01-01 00:00+00'] AS a FROM generate_series(1, 3000) g "
           "ORDER BY g")
    rows = psql_rows(sandbox, ticket, sql, 3, tz=ZONE)
    quoted = [(g, t, '"' + a.replace('"', '""') + '"') for g, t, a in rows]  # CSV, as COPY quotes it
    blocks = ["".join(f"{g},{t},{a}\n" for g, t, a in part).encode() for part in (quoted[:2000], quoted[2000:])]
    decoder = Decoder([plan_column("g", 23, -1, {}), plan_column("t", 1184, -1, {}), plan_column("a", 1185, -1, {})],
                      ZONE)
    first, second = decoder.decode(blocks[0]), decoder.decode(blocks[1])
    assert first[1].type == pa.timestamp("us", ZONE) and second[1].type == pa.string()
    assert decoder.finish_column(1, [first[1], second[1]]).to_pylist() == [t for _, t, _ in rows]
    assert rows[0][1].endswith("+05:41:16") and rows[-2][1].endswith("+05:30")
    assert decoder.finish_column(2, [first[2], second[2]]).to_pylist() == [
        [dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)]] * 3000


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_wide_decimals_and_column_less_results_go_into_files(shell, tmp_path, suffix):  # noqa: F811
    """decimal256 (numeric(50, 10)), not in the all-types table, and a result with rows but no columns."""
    target = tmp_path / f"wide{suffix}"
    run(shell, f"%kerbsql analytics --to {target} SELECT 12345678901234567890123456789012345678.5::numeric(50,10) "
               "AS big, NULL::numeric(50,10) AS none")
    got = pq.read_table(target) if suffix == ".parquet" else read_ipc(target)
    assert got.schema.field("big").type == pa.decimal256(50, 10)
    assert got.to_pylist() == [{"big": Decimal("12345678901234567890123456789012345678.5000000000"), "none": None}]
    run(shell, f"%kerbsql analytics --to {tmp_path / ('none' + suffix)} SELECT FROM generate_series(1, 3)")
    assert (tmp_path / ("none" + suffix)).exists()
