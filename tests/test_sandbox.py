"""The sandbox itself: the demo and every other test stand on it, so its failures must be clear."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from kerb_jupyter import SandboxError
from kerb_jupyter.core import tickets
from kerb_jupyter.sandbox import Realm, Sandbox, procs


def test_the_sandbox_serves_gssapi_logins(sandbox, tmp_path):
    cache = tmp_path / "cc" / "krb5cc"
    tickets.acquire_with_keytab(sandbox.principal, sandbox.keytab, cache)
    os.environ["KRB5CCNAME"] = f"FILE:{cache}"
    server = sandbox.servers["analytics"]
    with psycopg.connect(host="localhost", port=server.port, dbname="analytics", user=sandbox.principal,
                         gssencmode="require") as conn:
        row = conn.execute("SELECT gss_authenticated, principal, encrypted FROM pg_stat_gssapi "
                           "WHERE pid = pg_backend_pid()").fetchone()
        assert row == (True, sandbox.principal, True)
        assert conn.execute("SELECT count(*) FROM trips").fetchone() == (1000,)
    assert "GSS (authenticated=yes, encrypted=yes, principal=alice@KERB.TEST)" in server.log_text()


def test_only_kerberos_logins_are_accepted(sandbox, tmp_path):
    os.environ["KRB5CCNAME"] = f"FILE:{tmp_path}/none"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host="localhost", port=sandbox.servers["analytics"].port, dbname="analytics",
                        user=sandbox.principal, gssencmode="disable", connect_timeout=5)


def test_nothing_listens_beyond_loopback(sandbox):
    ports = {sandbox.realm.port, *(s.port for s in sandbox.servers.values())}
    listeners = _tcp_listeners()
    for port in ports:
        assert listeners.get(port), f"nothing listens on {port}"
        assert listeners[port] == {"127.0.0.1"}, (port, listeners[port])


def _tcp_listeners() -> dict[int, set[str]]:
    """Port -> local addresses in LISTEN state, from /proc/net/tcp{,6}."""
    found: dict[int, set[str]] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(name).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state != "0A":
                continue
            addr_hex, port_hex = local.split(":")
            addr = socket.inet_ntoa(bytes.fromhex(addr_hex)[::-1]) if len(addr_hex) == 8 else addr_hex
            found.setdefault(int(port_hex, 16), set()).add(addr)
    return found


def test_a_busy_port_is_refused_clearly_and_nothing_is_left_running(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        sb = Sandbox(tmp_path / "sb", clusters=("x",), kdc_port=port)
        with pytest.raises(SandboxError, match=rf"port 127.0.0.1:{port} for the KDC is already in use"):
            sb.start()
        assert not sb.realm.running


def test_a_second_sandbox_on_the_same_ports_is_refused(sandbox, tmp_path):
    server_port = sandbox.servers["analytics"].port
    sb = Sandbox(tmp_path / "sb2", clusters=("x",), pg_ports=[server_port])
    with pytest.raises(SandboxError, match=rf"port 127.0.0.1:{server_port} for PostgreSQL 'x' is already in use"):
        sb.start()
    assert not sb.realm.running  # the KDC it had started was stopped again


def test_a_kdc_that_fails_reports_its_log(tmp_path):
    realm = Realm(tmp_path / "realm")
    realm.create()
    realm.kdc_conf.write_text(realm.kdc_conf.read_text().replace("database_name = ", "database_name = /nonexistent"))
    with pytest.raises(SandboxError, match="the KDC did not start") as err:
        realm.start()
    assert "nonexistent" in str(err.value) or "database" in str(err.value).lower()
    assert not realm.running


def test_a_missing_daemon_names_the_package_to_install(monkeypatch):
    monkeypatch.setattr(procs, "_SBIN", ())
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SandboxError, match="install the Debian packages krb5-kdc"):
        procs.find_binary("krb5kdc", "krb5-kdc krb5-admin-server krb5-user")


def test_kadmin_failures_are_not_silent(sandbox):
    with pytest.raises(SandboxError, match=r"kadmin\.local"):
        sandbox.realm.add_principal(sandbox.user, password="again")  # already exists


def test_cli_no_lab_prints_one_json_line_and_stops_on_sigterm(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "kerb_jupyter.cli", "sandbox", "--no-lab", "--dir", str(tmp_path / "sb"),
         "--clusters", "demo"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        started = time.monotonic()
        line = proc.stdout.readline()
        ready_in = time.monotonic() - started
        doc = json.loads(line)
        assert set(doc) >= {"env", "clusters", "principal"}
        assert doc["principal"] == "alice@KERB.TEST"
        assert Path(doc["env"]["KRB5_CONFIG"]).is_file()
        config = json.loads(Path(doc["env"]["KERB_JUPYTER_CONFIG"]).read_text())
        assert list(config["clusters"]) == ["demo"]
        port = doc["clusters"][0]["port"]
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        print(f"sandbox ready in {ready_in:.2f} s")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0, proc.stderr.read()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)


def test_extension_is_enabled_by_installing_the_package():
    exe = Path(sys.executable).with_name("jupyter")
    out = subprocess.run([str(exe), "server", "extension", "list"], capture_output=True, text=True)
    text = out.stdout + out.stderr
    assert "kerb_jupyter" in text and "enabled" in text.split("kerb_jupyter", 1)[1].splitlines()[0], text
    assert "kerb_jupyter 0.2.0" in text and "OK" in text.split("kerb_jupyter 0.2.0", 1)[1].splitlines()[0]


def test_a_postgres_that_fails_reports_its_log(tmp_path):
    from kerb_jupyter.sandbox import Postgres

    realm = Realm(tmp_path / "realm")
    realm.create()
    realm.add_principal("postgres/localhost")
    realm.start()
    server = Postgres(tmp_path, realm, "broken")
    try:
        server.start()
        server.stop()
        with open(server.data / "postgresql.conf", "a") as conf:
            conf.write("shared_buffers = 'lots'\n")
        with pytest.raises(SandboxError, match="PostgreSQL did not start") as err:
            server.start()
        assert "shared_buffers" in str(err.value)  # the server's own complaint, from its log
    finally:
        server.destroy()
        realm.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_the_demo_command_runs_jupyterlab_and_stops_everything(tmp_path, sig):
    """`kerb-jupyter sandbox` (what scripts/demo runs): realm, two clusters and JupyterLab with the extension,
    started by the real server's start-up path; a signal stops it all."""
    import urllib.request

    lab_port = procs.free_port()
    env = {**os.environ, "JUPYTER_TOKEN": "demo-test-token", "HOME": str(tmp_path),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")}
    env.pop("KERB_JUPYTER_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "kerb_jupyter.cli", "sandbox", "--dir", str(tmp_path / "sb"),
                             "--lab-port", str(lab_port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "demo.log", "wb"))
    base = f"http://127.0.0.1:{lab_port}"

    def get(path):
        req = urllib.request.Request(base + path, headers={"Authorization": "token demo-test-token"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()

    try:
        deadline = time.monotonic() + 90
        status = None
        while time.monotonic() < deadline:
            try:
                status = json.loads(get("/kerb-jupyter/api/status")[1])
                if status["state"] == "valid":
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "demo.log").read_text()[-3000:]
            time.sleep(0.3)
        assert status and status["state"] == "valid", status
        assert status["principal"] == "alice@KERB.TEST"
        assert get("/lab")[0] == 200
        contents = json.loads(get("/api/contents")[1])
        assert "demo.ipynb" in [c["name"] for c in contents["content"]]
        clusters = json.loads(get("/kerb-jupyter/api/clusters")[1])["clusters"]
        ports = [c["port"] for c in clusters]
        assert [c["name"] for c in clusters] == ["analytics", "finance"]
    finally:
        proc.send_signal(sig)
        proc.wait(60)
    assert proc.returncode == 0, (tmp_path / "demo.log").read_text()[-3000:]
    for port in [lab_port, *ports]:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_the_sandbox_works_for_an_unprivileged_user(tmp_path):
    """As a normal user (here: nobody, in a forked child), PostgreSQL runs as that user in the sandbox directory,
    and a GSSAPI login works end to end."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user (as a normal user, every other test covers this)")
    import pwd

    import psycopg.pq  # imported before dropping privileges: this interpreter lives under /root

    nobody = pwd.getpwnam("nobody")
    work = Path(tempfile.mkdtemp(prefix="kj-nobody-"))
    os.chown(work, nobody.pw_uid, nobody.pw_gid)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become nobody, run a sandbox, log in with GSSAPI, report, exit
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            os.environ["HOME"] = str(work)
            with Sandbox(work / "sb", clusters=("mine",)) as sb:
                os.environ["KRB5_CONFIG"] = str(sb.realm.krb5_conf)
                cache = work / "cc" / "krb5cc"
                tickets.acquire_with_keytab(sb.principal, sb.keytab, cache)
                os.environ["KRB5CCNAME"] = f"FILE:{cache}"
                server = sb.servers["mine"]
                with psycopg.connect(host="localhost", port=server.port, dbname="mine", user=sb.principal,
                                     gssencmode="prefer") as conn:
                    who = conn.execute("SELECT current_user").fetchone()[0]
                owner = (server.data / "PG_VERSION").stat().st_uid
                os.write(write_end, json.dumps({"who": who, "data": str(server.data), "owner": owner}).encode())
            code = 0
        except BaseException as err:  # report whatever happened to the parent
            os.write(write_end, json.dumps({"error": repr(err)}).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        report = json.loads(f.read() or "{}")
    _, status = os.waitpid(pid, 0)
    shutil.rmtree(work, ignore_errors=True)
    assert os.waitstatus_to_exitcode(status) == 0, report
    assert report["who"] == "alice@KERB.TEST"
    assert report["data"].startswith(str(work)) and report["owner"] == nobody.pw_uid
