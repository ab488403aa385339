"""Hostile SQL through a real shell on real PostgreSQL: NUL, array slices, options that undo GSSAPI, timeouts."""

from __future__ import annotations

import pytest
from conftest import kerbsql_shell, write_config
from IPython.core.error import UsageError

from kerb_jupyter.core import tickets
from kerb_jupyter.magic import parse_timeout


@pytest.fixture
def shell(sandbox, tmp_path, monkeypatch):
    cache = tmp_path / "state" / "krb5cc"
    tickets.acquire_with_keytab(sandbox.principal, sandbox.keytab, cache)
    clusters = {n: sandbox.cluster_config(n) for n in sandbox.servers}
    clusters["loose"] = {**sandbox.cluster_config("analytics"), "options": {"require_auth": "password"}}
    config = write_config(tmp_path / "kerb_jupyter.json", sandbox, clusters=clusters,
                          audit_log=str(tmp_path / "audit.jsonl"))
    with kerbsql_shell(monkeypatch, cache, config) as sh:
        sh.run_cell("%%kerbsql analytics\nCREATE TEMP TABLE victims (id int, name text);\n"
                    "INSERT INTO victims VALUES (1, 'a'), (2, 'b'), (3, 'c')")
        yield sh


def kerbsql(shell, cell: str):
    res = shell.run_cell(cell)
    return res.result, res.error_in_exec


def count(shell) -> int:
    out, err = kerbsql(shell, "%%kerbsql analytics\nSELECT count(*) FROM victims")
    assert err is None, err
    return int(out.rows[0][0])


@pytest.mark.parametrize("cell", [
    "DELETE FROM victims\x00 WHERE id = 1",
    "INSERT INTO victims VALUES (4, 'd');\nDELETE FROM victims WHERE id = 1 \x00OR true",
    "SELECT 1; -- a comment\x00\nDELETE FROM victims",
])
def test_nul_in_a_statement_runs_nothing(shell, tmp_path, cell):
    audited = (tmp_path / "audit.jsonl").read_text()
    _, err = kerbsql(shell, "%%kerbsql analytics\n" + cell)
    assert isinstance(err, UsageError) and "contains a NUL character" in str(err) and "nothing was run" in str(err)
    assert count(shell) == 3
    out, _ = kerbsql(shell, "%%kerbsql analytics\nSELECT count(*) FROM victims WHERE id = 4")
    assert out.rows == [(0,)]
    assert (tmp_path / "audit.jsonl").read_text().count("\n") == audited.count("\n") + 2  # only the two counts


@pytest.mark.parametrize("value", ["a\x00b", ["ok", "b\x00"], {"k": "v\x00"}, ("x", ["y\x00"])])
def test_nul_in_a_bound_value_runs_nothing(shell, value):
    shell.user_ns["v"] = value
    _, err = kerbsql(shell, "%%kerbsql analytics\nINSERT INTO victims VALUES (5, 'e');\n"
                            "INSERT INTO victims VALUES (6, :v::text)")
    assert isinstance(err, UsageError) and "the value of :v contains a NUL character" in str(err)
    assert count(shell) == 3


def test_bytes_with_nul_are_bytea_and_still_bind(shell):
    shell.user_ns["raw"] = b"\x00\x01\x00"
    out, err = kerbsql(shell, "%%kerbsql analytics\nSELECT length(:raw::bytea)")
    assert err is None and out.rows == [(3,)]


def test_array_slices_are_never_parameters(shell):
    shell.user_ns["n"] = 1  # a notebook variable with the slice bound's name must not be bound
    out, err = kerbsql(shell, "%%kerbsql analytics\nSELECT (ARRAY[10,20,30,40])[2:n], (ARRAY[10,20,30])[:n] "
                              "FROM (SELECT 3 AS n) s")
    assert err is None, err
    assert out.rows == [([20, 30], [10, 20, 30])]
    shell.user_ns["i"] = 2
    out, err = kerbsql(shell, "%%kerbsql analytics\nSELECT (ARRAY[10,20,30])[(:i)], ARRAY[:i, :i]")
    assert err is None and out.rows == [(20, [2, 2])]


def test_a_cluster_with_a_forbidden_option_refuses_to_connect(shell):
    _, err = kerbsql(shell, "%%kerbsql loose\nSELECT 1")
    assert isinstance(err, UsageError)
    assert "cluster 'loose' cannot be used: clusters.loose.options.require_auth is not allowed" in str(err)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e309", "0", "0.0001", "-1", "abc", "1e-4", "-0"])
def test_bad_timeouts_are_usage_errors(shell, value):
    _, err = kerbsql(shell, f"%%kerbsql analytics --timeout {value}\nSELECT 1")
    assert isinstance(err, UsageError)
    # argparse reads "-inf" as an option, not a value: it says the value is missing instead.
    assert ("expected one argument" if value == "-inf" else "--timeout must be a") in str(err)


def test_the_smallest_timeout_is_a_real_one(shell):
    _out, err = kerbsql(shell, "%%kerbsql analytics --timeout 0.001\nSELECT pg_sleep(2)")
    assert isinstance(err, UsageError) and "statement timeout" in str(err)  # 1 ms, not rounded to "no timeout"
    assert parse_timeout("1e-3") == 0.001 and parse_timeout("2.5") == 2.5
