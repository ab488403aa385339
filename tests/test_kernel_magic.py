"""%%kerbsql in a real kernel started by the Jupyter server: shared ticket, GSSAPI, no secret handed over."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from helpers import KernelSession, start_extensions, wait_keeper

NOTEBOOK = "projects/q4 report.ipynb"


@pytest.fixture
def kernel(jp_serverapp, jp_asyncio_loop, request):
    """A kernel started the way JupyterLab starts one: through a session for a notebook path."""
    run = jp_asyncio_loop.run_until_complete
    run(start_extensions(jp_serverapp))
    run(wait_keeper(jp_serverapp, "valid"))
    path = getattr(request, "param", NOTEBOOK)
    model = run(jp_serverapp.session_manager.create_session(path=path, kernel_name="python3", type="notebook"))
    kid = model["kernel"]["id"]
    session = KernelSession(jp_serverapp.kernel_manager.get_kernel(kid).get_connection_info())
    session.kernel_id = kid
    session.interrupt = lambda: jp_serverapp.kernel_manager.interrupt_kernel(kid)  # a coroutine
    yield session
    session.close()
    run(jp_serverapp.session_manager.delete_session(model["id"]))


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
        "import sys, kerb_jupyter, kerb_jupyter.magic, kerb_jupyter.sql.db;"
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
    from kerb_jupyter.core import tickets

    cache = tmp_path / "cc" / "krb5cc"
    tickets.acquire_with_keytab(sandbox.principal, sandbox.keytab, cache)
    env = {**os.environ, "KRB5CCNAME": f"FILE:{cache}", "KERB_JUPYTER_CONFIG": str(sandbox.config_file)}
    out = subprocess.run([sys.executable, "-m", "kerb_jupyter.cli", "status"], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith(f"{sandbox.principal}: ticket valid for"), out
    env["KRB5CCNAME"] = f"FILE:{tmp_path}/none"
    out = subprocess.run([sys.executable, "-m", "kerb_jupyter.cli", "status", "--json"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 1 and json.loads(out.stdout)["error"]["code"] == "no_ticket"


def log_lines(sandbox, cluster: str, needle: str) -> list[str]:
    return [line for line in sandbox.servers[cluster].log_text().splitlines() if needle in line]


async def test_statements_are_tagged_in_the_server_log(kernel, sandbox):
    kernel.run("%load_ext kerb_jupyter")
    marker = "tag_check_" + os.urandom(4).hex()
    out = kernel.run(f"%kerbsql analytics SELECT '{marker}' AS m")
    assert out.error is None, out.text
    [line] = [x for x in log_lines(sandbox, "analytics", marker) if "/*" in x]
    assert "app=kerb_jupyter:alice@KERB.TEST user=alice@KERB.TEST db=analytics" in line
    comment = line.split("/*", 1)[1].split("*/", 1)[0]
    assert comment.startswith("app='kerb_jupyter'")
    assert f"kernel='{kernel.kernel_id}'" in comment
    assert "notebook='projects%2Fq4%20report.ipynb'" in comment
    assert "principal='alice%40KERB.TEST'" in comment
    assert "aws_identity='alice%40KERB.TEST'" in comment


HOSTILE = "x'*/ DROP TABLE trips; --\n\"Zoë ☃ %s"


@pytest.mark.parametrize("kernel", ["evil */ DROP TABLE trips; --\\'Zoë.ipynb"], indirect=True)
async def test_hostile_values_cannot_escape_the_tag(kernel, sandbox, jp_serverapp):
    from helpers import extension

    state_file = extension(jp_serverapp).settings_obj.state_path
    doc = json.loads(state_file.read_text())
    doc["identity"] = {"name": HOSTILE, "source": "notebook_tag", "trusted": False, "arn": HOSTILE}
    state_file.write_text(json.dumps(doc))
    kernel.run("%load_ext kerb_jupyter")
    marker = "hostile_" + os.urandom(4).hex()
    out = kernel.run(f"%kerbsql analytics SELECT '{marker}' AS m, count(*) AS n FROM trips")
    assert out.error is None and "UsageError" not in out.stderr, out.text
    assert "1000" in out.text
    [line] = [x for x in log_lines(sandbox, "analytics", marker) if "/*" in x]
    comment = line.split("/*", 1)[1].split("*/", 1)[0]
    assert line.count("*/") == 1  # only our own closing
    assert "aws_identity='x%27%2A%2F%20DROP%20TABLE%20trips%3B%20--%0A%22Zo%C3%AB%20%E2%98%83%20%25s'" in comment
    assert "notebook='evil%20%2A%2F%20DROP%20TABLE%20trips%3B%20--%5C%27Zo%C3%AB.ipynb'" in comment
    assert comment.isascii() and "\n" not in comment


async def test_interrupt_cancels_the_query_on_the_server(kernel, sandbox):
    kernel.run("%load_ext kerb_jupyter")
    kernel.run("%kerbsql analytics -o p SELECT pg_backend_pid()")
    pid = int(kernel.run("print(p[0][0])").stdout)
    msg_id = kernel.client.execute("%kerbsql analytics SELECT pg_sleep(60)")
    server = sandbox.servers["analytics"]
    for _ in range(100):
        # A display-limited query runs through a server-side cursor: the active statement is its FETCH.
        if server.admin(f"SELECT 1 FROM pg_stat_activity WHERE pid = {pid} AND state = 'active' "
                        "AND wait_event = 'PgSleep'"):
            break
        time.sleep(0.05)
    else:
        activity = server.admin("SELECT pid, state, query FROM pg_stat_activity")
        raise AssertionError(f"the query never started: {pid} {activity}")
    await kernel.interrupt()
    reply = kernel.client.get_shell_msg(timeout=20)
    assert reply["parent_header"]["msg_id"] == msg_id
    active = server.admin(f"SELECT state, query FROM pg_stat_activity WHERE pid = {pid}")
    assert active and active[0][0] == "idle", active  # cancelled on the server, session kept
    kernel.run("%kerbsql analytics -o q SELECT pg_backend_pid()")
    assert int(kernel.run("print(q[0][0])").stdout) == pid  # the same connection, still usable


async def test_long_queries_show_that_they_are_running(kernel):
    kernel.run("%load_ext kerb_jupyter")
    out = kernel.run("%kerbsql analytics SELECT pg_sleep(2.6) AS slept")
    progress = [d["text/html"] for d in out.data if "kerbsql-progress" in d.get("text/html", "")]
    first = re.search(r"running on analytics for (\d+) s", progress[0]) if progress else None
    assert first, out.data
    shown = [u.get("text/html", "") for u in out.updates]
    later = [int(m.group(1)) for u in shown if (m := re.search(r"for (\d+) s", u))]
    assert later and max(later) > int(first.group(1)), shown  # it counts up...
    assert shown[-1] == ""  # ...and is cleared when the query ends
    assert "slept" in out.text


async def test_first_rows_of_a_huge_result_cost_little_memory(kernel):
    kernel.run("%load_ext kerb_jupyter\n"
               "def peak_mb():\n"
               "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) // 1024")
    kernel.run("%kerbsql analytics SELECT 1")  # connection and imports warmed up
    before = int(kernel.run("print(peak_mb())").stdout)
    out = kernel.run("%kerbsql analytics SELECT g, md5(g::text) AS h, now() AS t FROM generate_series(1, 3000000) g")
    assert "Showing the first 50 rows" in out.text
    after = int(kernel.run("print(peak_mb())").stdout)
    assert after - before < 50, (before, after)


@pytest.fixture
def config_from_env(kj_config, monkeypatch):
    monkeypatch.setenv("KERB_JUPYTER_CONFIG", str(kj_config))


@pytest.mark.parametrize("jp_server_config", [pytest.param({
    "ServerApp": {"jpserver_extensions": {"kerb_jupyter": True}},
    "KerbJupyterApp": {"ticket_lifetime": 3, "retry_interval": 0.5},
}, id="3s-tickets")])
async def test_work_survives_renewals_and_new_connections_use_the_new_ticket(config_from_env, kernel, jp_serverapp,
                                                                             sandbox):
    from helpers import extension

    keeper = extension(jp_serverapp).keeper
    assert keeper.lifetime == 3
    await kernel.arun("%load_ext kerb_jupyter")
    renewals = keeper.state.renewals
    # A 7-second query on one cluster spans at least two renewals of a 3-second ticket...
    out = await kernel.arun("%kerbsql analytics -o slow SELECT pg_sleep(7), current_user AS who")
    assert out.error is None and "UsageError" not in out.stderr, out.text
    assert keeper.state.renewals >= renewals + 2, keeper.state
    # ...and a brand-new connection to the other cluster needs a ticket that is valid now.
    out = await kernel.arun("%kerbsql finance -o fresh SELECT current_user\nprint(fresh[0][0])")
    assert out.stdout.strip() == sandbox.principal, out.text


async def test_the_demo_notebook_runs_cleanly(kernel):
    """Every code cell of the notebook the demo opens, in order, in a kernel started by the server."""
    from importlib.resources import files

    notebook = json.loads(files("kerb_jupyter").joinpath("sandbox", "demo.ipynb").read_text())
    code = [c["source"] for c in notebook["cells"] if c["cell_type"] == "code"]
    assert len(code) >= 6
    for source in code:
        out = kernel.run(source)
        assert out.error is None and "Error" not in out.stderr, (source, out.text)
    assert "Dublin" in kernel.run("print(trips.rows[0])").stdout
