"""%%kerbsql in a real IPython shell against two real PostgreSQL clusters with one real ticket."""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import threading
import time
import uuid
from decimal import Decimal

import pytest
from conftest import kerbsql_shell, write_config

from kerb_jupyter.core import tickets
from kerb_jupyter.sandbox.procs import free_port
from kerb_jupyter.sql.results import ResultSet


@pytest.fixture
def shell(sandbox, tmp_path, monkeypatch):
    """A real IPython shell with the extension loaded, a fresh ticket in a FILE cache, and a config file."""
    cache = tmp_path / "state" / "krb5cc"
    tickets.acquire_with_keytab(sandbox.principal, sandbox.keytab, cache)
    clusters = {n: sandbox.cluster_config(n) for n in sandbox.servers}
    clusters["closed"] = {"host": "localhost", "port": free_port(), "dbname": "x", "connect_timeout": 2}
    clusters["untagged"] = {**sandbox.cluster_config("analytics"), "tagging": False}
    clusters["byip"] = {**sandbox.cluster_config("analytics"), "host": "127.0.0.1"}  # no SPN for that name
    config = write_config(tmp_path / "kerb_jupyter.json", sandbox, clusters=clusters,
                          audit_log=str(tmp_path / "audit" / "audit.jsonl"))
    with kerbsql_shell(monkeypatch, cache, config) as sh:
        yield sh


def run(shell, code: str):
    result = shell.run_cell(code)
    return result.result, result


def test_several_statements_ddl_dml_and_row_counts(shell, capsys):
    out, res = run(shell, """%%kerbsql analytics
CREATE TEMP TABLE t (id int, name text);
INSERT INTO t VALUES (1, 'a'), (2, 'b;c'), (3, $$d;'e$$);
UPDATE t SET name = upper(name) WHERE id > 1;
SELECT id, name FROM t ORDER BY id""")
    assert res.success, res.error_in_exec
    assert out.rows == [(1, "a"), (2, "B;C"), (3, "D;'E")]
    shown = capsys.readouterr().out
    assert "CREATE TABLE" in shown and "INSERT 0 3, 3 rows" in shown and "UPDATE 2, 2 rows" in shown


def test_line_form_and_list(shell):
    out, _ = run(shell, "%kerbsql finance SELECT 'it''s' AS quoted, 1 + 1 AS two")
    assert out.rows == [("it's", 2)]
    shell.user_ns["x"] = "INJECTED"
    out, _ = run(shell, "%kerbsql finance SELECT $$a{x}$x$$ AS dollar, '{x}' AS braces")
    assert out.rows == [("a{x}$x", "{x}")]  # no IPython variable expansion in SQL
    listing, _ = run(shell, "%kerbsql --list")
    assert [r[0] for r in listing.rows] == ["analytics", "finance", "closed", "untagged", "byip"]


PARAMS = {
    "i": 42, "f": 2.5, "d": Decimal("1.10"), "s": "O'Brien; DROP TABLE trips; --", "n": None, "b": True,
    "day": dt.date(2026, 11, 22), "ts": dt.datetime(2026, 11, 22, 4, 30, tzinfo=dt.timezone.utc),
    "arr": [1, 2, 3], "raw": b"\x00\xff", "u": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "pct": "100%", "uni": "Zoë ☃",
}


def test_parameters_of_many_types_are_bound_not_pasted(shell):
    shell.user_ns.update(PARAMS)
    out, res = run(shell, "%%kerbsql analytics -o r\nSELECT " + ", ".join(f":{k} AS {k}" for k in PARAMS)
                   + ", '%s :notaparam' AS literal, 1::int AS cast")
    assert res.success, res.error_in_exec
    row = dict(zip([c.name for c in out.columns], out.rows[0]))
    for k, v in PARAMS.items():
        assert row[k] == v, k
    assert row["literal"] == "%s :notaparam" and row["cast"] == 1
    # The trips table survived the would-be injection.
    assert run(shell, "%kerbsql analytics SELECT count(*) FROM trips")[0].rows == [(1000,)]


def test_missing_parameter_is_a_clear_error_and_nothing_runs(shell, capsys):
    run(shell, "%%kerbsql analytics\nCREATE TEMP TABLE guard (x int);\nSELECT :nope")
    err = capsys.readouterr().err
    assert "UsageError: the query uses :nope but there is no variable named 'nope'" in err
    run(shell, "%kerbsql analytics SELECT * FROM guard")
    assert "relation \"guard\" does not exist" in capsys.readouterr().err  # the CREATE never ran


def test_sql_error_shows_sqlstate_message_and_position(shell, capsys):
    run(shell, "%%kerbsql analytics\nSELECT 1;\nSELECT city,\n  nonexistent_column\nFROM trips")
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "SQL error 42703: column \"nonexistent_column\" does not exist" in err
    assert "LINE 2:   nonexistent_column" in err
    caret = err.splitlines()[err.splitlines().index("LINE 2:   nonexistent_column") + 1]
    assert caret.index("^") == len("LINE 2:   ")


def test_debug_switch_shows_the_real_exception(shell):
    _, res = run(shell, "%kerbsql nope SELECT 1")
    assert type(res.error_in_exec).__name__ == "UsageError"  # one line, no traceback
    run(shell, "%config KerbSqlMagics.debug = True")
    _, res = run(shell, "%kerbsql nope SELECT 1")
    assert type(res.error_in_exec).__name__ == "UnknownClusterError"  # IPython shows its traceback


def test_explicit_transactions_are_honoured(shell):
    run(shell, "%%kerbsql analytics\nCREATE TABLE IF NOT EXISTS tx_test (x int); TRUNCATE tx_test")
    run(shell, "%%kerbsql analytics\nBEGIN;\nINSERT INTO tx_test VALUES (1);")
    # Another connection does not see the uncommitted row.
    run(shell, "%kerbsql finance SELECT 1")
    run(shell, "%%kerbsql analytics\nROLLBACK")
    assert run(shell, "%kerbsql analytics SELECT count(*) FROM tx_test")[0].rows == [(0,)]
    run(shell, "%%kerbsql analytics\nBEGIN; INSERT INTO tx_test VALUES (2); COMMIT;")
    assert run(shell, "%kerbsql analytics SELECT count(*) FROM tx_test")[0].rows == [(1,)]
    run(shell, "%kerbsql analytics DROP TABLE tx_test")


def test_limits_truncation_and_display(shell):
    out, _ = run(shell, "%kerbsql analytics --limit 5 SELECT id, city FROM trips ORDER BY id")
    assert len(out.rows) == 5 and out.truncated
    html = out._repr_html_()
    assert "<th title='integer'>id<br><small>integer</small></th>" in html
    assert "Showing the first 5 rows" in html
    assert "Showing the first 5 rows" in repr(out)
    run(shell, "%config KerbSqlMagics.display_limit = 7")
    assert len(run(shell, "%kerbsql analytics SELECT id FROM trips")[0].rows) == 7
    everything, _ = run(shell, "%kerbsql analytics -o allrows --quiet SELECT id FROM trips")
    assert everything is None and len(shell.user_ns["allrows"].rows) == 1000


def test_dataframe(shell):
    df, _ = run(shell, "%kerbsql finance --dataframe SELECT city, count(*) AS n FROM trips GROUP BY city ORDER BY city")
    assert list(df.columns) == ["city", "n"] and df["n"].sum() == 1000


def test_statement_timeout(shell, capsys):
    run(shell, "%kerbsql analytics --timeout 0.2 SELECT pg_sleep(2)")
    assert "SQL error 57014: canceling statement due to statement timeout" in capsys.readouterr().err
    assert run(shell, "%kerbsql analytics SHOW statement_timeout")[0].rows == [("0",)]


def test_dead_connection_is_replaced_once(shell, sandbox):
    pid, _ = run(shell, "%kerbsql analytics SELECT pg_backend_pid()")
    sandbox.servers["analytics"].admin(f"SELECT pg_terminate_backend({pid.rows[0][0]})")
    again, res = run(shell, "%kerbsql analytics SELECT pg_backend_pid()")
    assert res.success and again.rows[0][0] != pid.rows[0][0]


def test_stopped_database_gives_a_clear_message(shell, capsys):
    run(shell, "%kerbsql closed SELECT 1")
    err = capsys.readouterr().err
    assert re.search(r"UsageError: cannot reach cluster 'closed' \(localhost:\d+\)", err), err


def test_expired_ticket_gives_an_actionable_message(shell, sandbox, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "short" / "krb5cc"
    tickets.acquire_with_keytab(sandbox.principal, sandbox.keytab, cache, lifetime=1)
    (cache.parent / "state.json").write_text(json.dumps({"state": "expired", "last_error": {
        "code": "kdc_unreachable", "message": "cannot reach the KDC", "at": "2026-11-22T09:50:00Z"}}))
    config = json.loads((tmp_path / "kerb_jupyter.json").read_text())
    config["state_dir"] = str(cache.parent)
    (tmp_path / "kerb_jupyter.json").write_text(json.dumps(config))
    monkeypatch.setenv("KRB5CCNAME", f"FILE:{cache}")
    shell.run_cell("%unload_ext kerb_jupyter")
    shell.run_cell("%reload_ext kerb_jupyter")
    time.sleep(1.5)
    run(shell, "%kerbsql finance SELECT 1")
    err = capsys.readouterr().err
    assert f"the ticket for {sandbox.principal} expired at" in err
    assert "the server's keeper reports: cannot reach the KDC (since 2026-11-22T09:50:00Z)" in err


def test_result_object_is_plain_python(shell):
    out, _ = run(shell, "%kerbsql analytics SELECT 1 AS a, NULL::text AS b")
    assert isinstance(out, ResultSet) and list(out) == [(1, None)] and out[0] == (1, None)
    assert "NULL" in repr(out)


def test_audit_log_has_one_record_per_statement_and_no_values(shell, tmp_path):
    shell.user_ns["secret_value"] = "hunter2-not-in-the-log"
    run(shell, "%%kerbsql analytics\nSELECT :secret_value AS s, 'literal-not-in-log' AS l;\nSELECT 1/0")
    path = tmp_path / "audit" / "audit.jsonl"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    text = path.read_text()
    assert "hunter2" not in text and "literal-not-in-log" not in text
    records = [json.loads(line) for line in text.splitlines()]
    assert [r["outcome"] for r in records] == ["ok", "sql_22012"]
    first = records[0]
    assert first["principal"] == "alice@KERB.TEST" and first["cluster"] == "analytics" and first["rows"] == 1
    assert first["statement"] == "SELECT :secret_value AS s, ? AS l" and len(first["fingerprint"]) == 16
    assert set(first) >= {"time", "identity", "principal", "cluster", "fingerprint", "rows", "duration_ms", "outcome"}


def test_sqlalchemy_engine_with_pandas(shell, sandbox):
    import pandas as pd

    from kerb_jupyter.core.config import load_settings
    from kerb_jupyter.sql import db

    engine = db.sqlalchemy_engine(load_settings(), "finance")
    df = pd.read_sql("SELECT current_user AS who, count(*) AS n FROM trips", engine)
    assert df.to_dict("records") == [{"who": sandbox.principal, "n": 1000}]
    engine.dispose()


def test_tagging_can_be_turned_off_per_cluster(shell, sandbox):
    for cluster in ("analytics", "untagged"):
        marker = f"tagging_{cluster}_{uuid.uuid4().hex[:8]}"
        run(shell, f"%kerbsql {cluster} SELECT '{marker}'")
        [line] = [x for x in sandbox.servers["analytics"].log_text().splitlines() if marker in x]
        assert ("/*app='kerb_jupyter'" in line) == (cluster == "analytics"), line
        assert ("app=kerb_jupyter:alice@KERB.TEST" in line) == (cluster == "analytics"), line


def test_empty_results_still_have_columns(shell):
    out, _ = run(shell, "%kerbsql analytics SELECT id, city FROM trips WHERE false")
    assert [c.name for c in out.columns] == ["id", "city"] and out.rows == [] and not out.truncated
    shell.user_ns["town"] = "Nowhere"
    out, _ = run(shell, "%kerbsql analytics SELECT id, '100%' AS pct FROM trips WHERE city = :town")
    assert [(c.name, c.type_name) for c in out.columns] == [("id", "integer"), ("pct", "text")] and out.rows == []


def test_a_select_inside_a_transaction_uses_a_cursor_and_keeps_the_transaction(shell):
    run(shell, "%kerbsql analytics BEGIN")
    out, _ = run(shell, "%kerbsql analytics --limit 3 SELECT id FROM trips ORDER BY id")
    assert out.rows == [(1,), (2,), (3,)] and out.truncated
    still, _ = run(shell, "%kerbsql analytics SELECT now() = statement_timestamp() AS fresh, 1 AS one")
    assert still.rows[0][0] is False  # still inside the same transaction: now() is the transaction's start
    run(shell, "%kerbsql analytics COMMIT")


def test_an_unwritable_audit_log_stops_loudly(shell, tmp_path, capsys):
    blocker = tmp_path / "audit"
    blocker.mkdir(exist_ok=True)
    (blocker / "audit.jsonl").mkdir()  # a directory where the log file should be
    run(shell, "%%kerbsql analytics\nSELECT 1;\nSELECT 2")
    err = capsys.readouterr().err
    assert "UsageError: the audit log" in err and "could not be written" in err
    assert "the statement ran on analytics, the rest of the cell was not run" in err


def interrupt_soon(delay: float = 1.0) -> threading.Timer:
    """Ctrl-C in a second, delivered to this (the shell's) thread as a real SIGINT."""
    main = threading.get_ident()
    timer = threading.Timer(delay, lambda: signal.pthread_kill(main, signal.SIGINT))
    timer.start()
    return timer


def test_ctrl_c_cancels_and_keeps_the_connection(shell, capsys):
    pid = run(shell, "%kerbsql analytics SELECT pg_backend_pid()")[0].rows[0][0]
    interrupt_soon()
    out, _ = run(shell, "%kerbsql analytics SELECT pg_sleep(30)")
    said = capsys.readouterr().out
    assert "kerbsql: cancelled; the query was stopped on analytics" in said and "ROLLBACK" not in said
    assert out.status == "CANCELLED"
    assert run(shell, "%kerbsql analytics SELECT pg_backend_pid()")[0].rows[0][0] == pid


def test_ctrl_c_inside_a_transaction_says_it_is_aborted(shell, capsys):
    run(shell, "%kerbsql analytics BEGIN")
    interrupt_soon()
    run(shell, "%kerbsql analytics SELECT pg_sleep(30)")
    assert "Your open transaction is aborted: run ROLLBACK." in capsys.readouterr().out
    run(shell, "%kerbsql analytics SELECT 1")
    assert "SQL error 25P02: current transaction is aborted" in capsys.readouterr().err  # as in psql
    run(shell, "%kerbsql analytics ROLLBACK")
    assert run(shell, "%kerbsql analytics SELECT 1")[0].rows == [(1,)]


def test_a_changed_configuration_is_picked_up_without_a_restart(shell, sandbox, tmp_path, capsys):
    config_path = tmp_path / "kerb_jupyter.json"
    pid = run(shell, "%kerbsql analytics SELECT pg_backend_pid()")[0].rows[0][0]
    config = json.loads(config_path.read_text())
    config["clusters"]["reporting"] = sandbox.cluster_config("finance")
    config_path.write_text(json.dumps(config))
    out, _ = run(shell, "%kerbsql reporting SELECT current_database()")
    assert out.rows == [("finance",)]
    assert run(shell, "%kerbsql analytics SELECT pg_backend_pid()")[0].rows[0][0] == pid  # unchanged: kept
    config_path.write_text("{broken")
    run(shell, "%kerbsql analytics SELECT 1")
    assert "is not valid JSON" in capsys.readouterr().err


def test_a_host_without_a_service_principal_is_explained(shell, capsys):
    run(shell, "%kerbsql byip SELECT 1")
    err = capsys.readouterr().err
    assert "the KDC does not know the service principal postgres/127.0.0.1" in err, err
    assert "check the host name" in err
