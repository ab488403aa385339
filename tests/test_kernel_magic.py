"""%%kerbsql in a real kernel started by the Jupyter server: shared ticket, GSSAPI, no secret handed over."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import KernelSession, start_extensions, wait_keeper


@pytest.fixture
def kernel(jp_serverapp, jp_asyncio_loop):
    run = jp_asyncio_loop.run_until_complete
    run(start_extensions(jp_serverapp))
    run(wait_keeper(jp_serverapp, "valid"))
    mkm = jp_serverapp.kernel_manager
    kid = run(mkm.start_kernel())
    session = KernelSession(mkm.get_kernel(kid).get_connection_info())
    yield session
    session.close()
    run(mkm.shutdown_kernel(kid, now=True))


async def test_kerbsql_runs_as_the_principal_over_gssapi(kernel, sandbox):
    assert kernel.run("%load_ext kerb_jupyter").error is None
    out = kernel.run(
        "%%kerbsql analytics -o r\n"
        "SELECT current_user AS who, gss_authenticated, encrypted\n"
        "FROM pg_stat_gssapi WHERE pid = pg_backend_pid()"
    )
    assert out.error is None, out.text
    assert sandbox.principal in out.text
    check = kernel.run("print(list(r.rows[0]))")
    assert check.stdout.strip() == f"['{sandbox.principal}', True, True]"


async def test_kernel_was_handed_no_secret(kernel, sandbox):
    env = kernel.run("import os; print(sorted(os.environ.items()))").stdout
    assert "KRB5CCNAME" in env
    assert sandbox.password_file.read_text() not in env
    assert str(sandbox.keytab) not in env  # the kernel does not even know where the keytab is


async def test_one_ticket_serves_two_clusters(kernel, sandbox):
    kernel.run("%load_ext kerb_jupyter")
    for cluster in ("analytics", "finance"):
        out = kernel.run(f"%kerbsql {cluster} SELECT current_database() || ':' || current_user AS x")
        assert out.error is None, out.text
        assert f"{cluster}:{sandbox.principal}" in out.text


async def test_unknown_cluster_is_one_clear_line(kernel):
    kernel.run("%load_ext kerb_jupyter")
    out = kernel.run("%kerbsql nope SELECT 1")
    # A UsageError: one line on stderr, no traceback.
    assert out.stderr.startswith("UsageError: unknown cluster 'nope'"), out.text
    assert "analytics, finance" in out.stderr
    assert "Traceback" not in out.text and len(out.stderr.strip().splitlines()) == 1


def test_kernel_side_does_not_import_jupyter_server():
    code = (
        "import sys, kerb_jupyter, kerb_jupyter.magic, kerb_jupyter.db;"
        "assert 'jupyter_server' not in sys.modules, 'jupyter_server imported';"
        "assert 'tornado' not in sys.modules, 'tornado imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_kerbstatus_in_the_kernel(kernel, sandbox):
    kernel.run("%load_ext kerb_jupyter")
    out = kernel.run("%kerbstatus")
    assert out.error is None, out.text
    html = out.data[0]["text/html"]
    assert "data-colour='green'" in html
    assert f"{sandbox.principal}: ticket valid for 59m" in out.data[0]["text/plain"] or \
        f"{sandbox.principal}: ticket valid for 1h 00m" in out.data[0]["text/plain"]
    assert "keeper: valid" in out.data[0]["text/plain"]


def test_cli_status(sandbox, tmp_path):
    from kerb_jupyter import tickets

    cache = tmp_path / "cc" / "krb5cc"
    tickets.acquire_with_keytab(sandbox.principal, sandbox.keytab, cache)
    env = {**os.environ, "KRB5CCNAME": f"FILE:{cache}", "KERB_JUPYTER_CONFIG": str(sandbox.config_file)}
    out = subprocess.run([sys.executable, "-m", "kerb_jupyter.cli", "status"], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith(f"{sandbox.principal}: ticket valid for"), out
    env["KRB5CCNAME"] = f"FILE:{tmp_path}/none"
    out = subprocess.run([sys.executable, "-m", "kerb_jupyter.cli", "status", "--json"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 1 and json.loads(out.stdout)["error"]["code"] == "no_ticket"
