"""The C COPY reader (copyreader/, ``kerb_jupyter_copy``) against real PostgreSQL over GSSAPI: used when installed,
the same results as the pure-Python loop, and Ctrl-C, --timeout, errors mid-COPY, GSS encryption, tag and audit as
on that loop. scripts/setup installs the extension, so these tests require it."""

from __future__ import annotations

import json
import signal
import threading
import uuid
from typing import Any

import kerb_jupyter_copy  # no skip: scripts/setup installs it; without it these tests must fail
import pyarrow as pa
import pytest
from conftest import kerbsql_shell, write_config
from test_values import QUERY, table, ticket  # noqa: F401  # the all-types table and its fixtures

from kerb_jupyter.core.errors import ConfigError
from kerb_jupyter.sql import arrow, copystream
from kerb_jupyter.sql.query import QueryOptions


@pytest.fixture
def shell(sandbox, ticket, tmp_path, monkeypatch):  # noqa: F811
    """A real IPython shell (the extension's reader in force), an audit log, and clusters with and without GSS
    encryption on the same server."""
    info = sandbox.cluster_config("analytics")
    clusters = {"analytics": info, "plain": {**info, "gssencmode": "disable"},
                "sealed": {**info, "gssencmode": "require"}}
    config = write_config(tmp_path / "kerb_jupyter.json", sandbox, clusters=clusters,
                          audit_log=str(tmp_path / "audit.jsonl"))
    monkeypatch.delenv(copystream.READER_ENV, raising=False)
    with kerbsql_shell(monkeypatch, ticket, config) as sh:
        yield sh


def run(shell, code: str) -> Any:
    result = shell.run_cell(code)
    assert result.error_before_exec is None
    return result.result


def both_ways(shell, monkeypatch, code: str) -> tuple[Any, Any]:
    """``code`` run with the C reader (proved by its block counter), then with the Python loop."""
    before = kerb_jupyter_copy.blocks_read()
    fast = run(shell, code)
    assert kerb_jupyter_copy.blocks_read() > before, "the C reader was not used"
    monkeypatch.setenv(copystream.READER_ENV, "python")
    before = kerb_jupyter_copy.blocks_read()
    slow = run(shell, code)
    assert kerb_jupyter_copy.blocks_read() == before
    monkeypatch.delenv(copystream.READER_ENV)
    return fast, slow


def same_values(a: pa.ChunkedArray, b: pa.ChunkedArray) -> bool:
    """Equal, NaN included (Arrow's equals says NaN != NaN): floats compared as their exact text."""
    if a.type != b.type:
        return False
    value = a.type.value_type if pa.types.is_list(a.type) else a.type
    if pa.types.is_floating(value):
        text = pa.list_(pa.string()) if pa.types.is_list(a.type) else pa.string()
        a, b = a.cast(text), b.cast(text)
    return bool(a.equals(b))


def connection(shell, cluster: str = "analytics") -> Any:
    shell.run_cell(f"%kerbsql {cluster} SELECT 1")
    return shell.magics_manager.registry["KerbSqlMagics"].session.connection(cluster)


def test_the_extension_is_installed_bound_to_psycopgs_libpq_and_chosen(monkeypatch):
    import psycopg

    assert kerb_jupyter_copy.LIBPQ_VERSION == psycopg.pq.version()
    assert copystream.copy_reader() is kerb_jupyter_copy.read_block
    monkeypatch.setenv(copystream.READER_ENV, "c")
    assert copystream.copy_reader() is kerb_jupyter_copy.read_block
    monkeypatch.setenv(copystream.READER_ENV, "python")
    assert copystream.copy_reader() is None
    monkeypatch.setenv(copystream.READER_ENV, "fortran")
    with pytest.raises(ConfigError, match="KERB_JUPYTER_COPY_READER='fortran': use auto, c or python"):
        copystream.copy_reader()


def test_all_types_are_identical_through_both_readers(shell, table, monkeypatch, capsys):  # noqa: F811
    fast, slow = both_ways(shell, monkeypatch, f"%kerbsql analytics --arrow {QUERY}")
    assert fast.column_names == table and fast.num_rows > 0
    assert fast.schema.equals(slow.schema, check_metadata=True)
    assert [c for c in fast.column_names if not same_values(fast.column(c), slow.column(c))] == []
    notes = capsys.readouterr().out
    assert notes.count("kerbsql: column") % 2 == 0 and notes.count("kerbsql: column") > 0  # the same notes twice
    for backend in ("numpy", "pyarrow"):
        run(shell, f"%config KerbSqlMagics.dtype_backend = '{backend}'")
        fast, slow = both_ways(shell, monkeypatch, f"%kerbsql analytics --dataframe {QUERY}")
        assert list(fast.columns) == table and list(fast.dtypes) == list(slow.dtypes)
        for j in range(fast.shape[1]):  # exact text of every cell: NaN inside lists compares too
            assert [repr(v) for v in fast.iloc[:, j]] == [repr(v) for v in slow.iloc[:, j]], (backend, table[j])


def test_many_small_blocks_through_both_readers(shell, monkeypatch):
    conn = connection(shell)
    sql = ("SELECT g, g::text || E'\\n,\"' AS t, (g % 7)::numeric AS n, CASE WHEN g % 3 = 0 THEN NULL ELSE g END "
           "AS maybe, repeat('ü', g % 50) AS pad FROM generate_series(1, 20000) g")
    tables = []
    for reader in ("c", "python"):
        monkeypatch.setenv(copystream.READER_ENV, reader)
        pieces = arrow.Collector()
        pieces.block_bytes = 4000
        arrow.run_copy(conn, sql, {}, QueryOptions(), consumer=pieces)
        assert pieces.table is not None and pieces.table.column("t").num_chunks > 50
        tables.append(pieces.table)
    assert tables[0].equals(tables[1]) and tables[0].num_rows == 20000
    assert tables[0].column("pad").to_pylist()[48] == "ü" * 49


def test_an_error_mid_copy_leaves_the_connection_clean(shell, capsys):
    before = kerb_jupyter_copy.blocks_read()
    pid = run(shell, "%kerbsql analytics SELECT pg_backend_pid()").rows[0][0]
    # ~60 MB before the error: whole blocks were read and parsed by then
    run(shell, "%kerbsql analytics --arrow SELECT repeat('x', 200) AS pad, 1 / (g - 300000) AS boom "
               "FROM generate_series(1, 400000) g")
    assert "SQL error 22012: division by zero" in capsys.readouterr().err
    assert kerb_jupyter_copy.blocks_read() > before
    assert run(shell, "%kerbsql analytics SELECT pg_backend_pid()").rows[0][0] == pid  # the same session
    assert run(shell, "%kerbsql analytics SHOW IntervalStyle").rows == [("postgres",)]  # settings restored
    run(shell, "%kerbsql analytics BEGIN")
    run(shell, "%kerbsql analytics --arrow SELECT 1 / (g - 20000) FROM generate_series(1, 30000) g")
    assert "division by zero" in capsys.readouterr().err
    run(shell, "%kerbsql analytics SELECT 1")
    assert "current transaction is aborted" in capsys.readouterr().err
    run(shell, "%kerbsql analytics ROLLBACK")
    assert run(shell, "%kerbsql analytics --arrow SELECT 42 AS x").to_pylist() == [{"x": 42}]


def test_statement_timeout_before_and_during_the_rows(shell, capsys):
    run(shell, "%kerbsql analytics --dataframe --timeout 0.3 SELECT pg_sleep(3)")
    assert "SQL error 57014: canceling statement due to statement timeout" in capsys.readouterr().err
    before = kerb_jupyter_copy.blocks_read()
    run(shell, "%kerbsql analytics --arrow --timeout 1 SELECT g, md5(g::text), CASE WHEN g = 150000 THEN "
               "pg_sleep(5) END FROM generate_series(1, 200000) g")
    assert "SQL error 57014: canceling statement due to statement timeout" in capsys.readouterr().err
    assert kerb_jupyter_copy.blocks_read() > before  # rows were read in C before the timeout
    assert run(shell, "%kerbsql analytics SHOW statement_timeout").rows == [("0",)]


def interrupt_soon(delay: float) -> threading.Timer:
    main = threading.get_ident()
    timer = threading.Timer(delay, lambda: signal.pthread_kill(main, signal.SIGINT))
    timer.start()
    return timer


@pytest.mark.parametrize("sql", ["SELECT pg_sleep(30)",  # Ctrl-C while the C reader waits for a first row
                                 "SELECT g, md5(g::text) FROM generate_series(1, 100000000) g"])  # while rows flow
def test_ctrl_c_cancels_the_copy_and_keeps_the_connection(shell, tmp_path, capsys, sql):
    pid = run(shell, "%kerbsql analytics SELECT pg_backend_pid()").rows[0][0]
    interrupt_soon(1.0)
    out = run(shell, f"%kerbsql analytics --arrow {sql}")
    assert out.status == "CANCELLED" and "kerbsql: cancelled" in capsys.readouterr().out
    assert run(shell, "%kerbsql analytics SELECT pg_backend_pid()").rows[0][0] == pid
    assert run(shell, "%kerbsql analytics SHOW IntervalStyle").rows == [("postgres",)]
    assert run(shell, "%kerbsql analytics SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY (%' "
                      "AND pid <> pg_backend_pid() AND state = 'active'").rows == [(0,)]
    audit = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    word = "pg_sleep" if "pg_sleep" in sql else "generate_series"  # the log keeps the statement's shape
    assert [r["outcome"] for r in audit if word in r["statement"]] == ["cancelled"]


def test_with_and_without_gss_encryption(shell, monkeypatch):
    sql = "SELECT g, md5(g::text) AS h, g * 0.5 AS half FROM generate_series(1, 300000) g"
    seen = {}
    for cluster in ("plain", "sealed"):
        enc = run(shell, f"%kerbsql {cluster} --arrow SELECT gss_authenticated AS auth, encrypted FROM "
                         "pg_stat_gssapi WHERE pid = pg_backend_pid()")
        seen[cluster] = enc.to_pylist()
        fast, slow = both_ways(shell, monkeypatch, f"%kerbsql {cluster} --arrow {sql}")
        assert fast.num_rows == 300000 and fast.equals(slow)
    assert seen == {"plain": [{"auth": True, "encrypted": False}], "sealed": [{"auth": True, "encrypted": True}]}


def test_tag_application_name_and_audit_with_the_c_reader(shell, sandbox, tmp_path):
    marker = f"creader_{uuid.uuid4().hex[:8]}"
    shell.user_ns.update(marker=marker, city="Dublin")
    before = kerb_jupyter_copy.blocks_read()
    df = run(shell, "%%kerbsql analytics --dataframe\nSELECT count(*) AS n, :marker AS m FROM trips "
                    "WHERE city = :city")
    assert df.to_dict("records") == [{"n": 200, "m": marker}] and kerb_jupyter_copy.blocks_read() > before
    [line] = [x for x in sandbox.servers["analytics"].log_text().splitlines() if marker in x]
    assert "app=kerb_jupyter:alice@KERB.TEST" in line and "/*app='kerb_jupyter'" in line and "COPY (" in line
    records = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert records[-1]["outcome"] == "ok" and records[-1]["rows"] == 1


def test_a_connection_killed_mid_copy_is_replaced_and_the_statement_run_again(shell, sandbox):
    """The C reader waits mid-COPY (the server sleeps after 50,000 rows) when the backend is terminated: the magic
    reconnects and runs the statement again, as it does after any lost connection."""
    pid = run(shell, "%kerbsql analytics SELECT pg_backend_pid()").rows[0][0]
    killer = threading.Timer(1.0, lambda: sandbox.servers["analytics"].admin(f"SELECT pg_terminate_backend({pid})"))
    killer.start()
    again = run(shell, "%kerbsql analytics --arrow SELECT g, md5(g::text), pg_backend_pid() AS pid, CASE WHEN "
                       "g = 50000 THEN pg_sleep(2) END AS nap FROM generate_series(1, 100000) g")
    killer.join()
    assert again.num_rows == 100000 and set(again.column("pid").to_pylist()) != {pid}


def test_empty_and_zero_column_results(shell):
    empty = run(shell, "%kerbsql analytics --arrow SELECT g FROM generate_series(1, 10) g WHERE false")
    assert empty.num_rows == 0 and empty.schema.field("g").type == pa.int32()
    assert run(shell, "%kerbsql analytics --dataframe SELECT FROM generate_series(1, 3)").shape == (3, 0)
    big = run(shell, "%kerbsql analytics --arrow SELECT 1 AS n, repeat('x', 20000000) AS big")  # one row > a block
    assert big.num_rows == 1 and len(big.column("big")[0].as_py()) == 20_000_000
