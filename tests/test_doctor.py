"""kerb-jupyter doctor against the real sandbox KDC and databases, with each fault injected for real."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time

import pytest
from conftest import wait_for, write_config
from helpers import KernelSession, doctor, krb5_conf_copy, start_extensions, statuses, wait_keeper

from kerb_jupyter.cli import main
from kerb_jupyter.core import tickets
from kerb_jupyter.doctor.checks import find_servers
from kerb_jupyter.doctor.run import INSTALL_RECORD, run_doctor
from kerb_jupyter.sandbox.procs import free_port
from kerb_jupyter.server.keeper import TicketKeeper
from kerb_jupyter.server.sources import KeytabSource

HOST_CHECKS = ["config", "krb5_conf", "dns", "kdc", "kpasswd", "clock", "identity", "source", "ticket", "keeper",
               "extension"]


@pytest.fixture
def healthy(sandbox, kj_config, tmp_path):
    """A configuration with a fresh ticket in its shared cache, as the keeper leaves it."""
    os.environ["KERB_JUPYTER_CONFIG"] = str(kj_config)
    os.environ.pop("KRB5CCNAME", None)
    cache = tmp_path / "state" / "krb5cc"
    tickets.acquire_with_keytab(sandbox.principal, sandbox.keytab, cache)
    return cache


def test_healthy_setup_passes_every_check_in_order(healthy, sandbox):
    report = doctor()
    names = [c.name for c in report.checks]
    assert names[:len(HOST_CHECKS)] == HOST_CHECKS
    assert report.ok, repr(report)
    s = statuses(report)
    for name in ("config", "krb5_conf", "dns", "kdc", "clock", "ticket", "analytics.login", "finance.login"):
        assert s[name] == "ok", repr(report)
    login = report.get("analytics.login")
    assert login.data["current_user"] == sandbox.principal and login.data["gss_authenticated"]
    assert report.get("analytics.transport").data["encryption"] == "gss"
    assert report.get("analytics.service_ticket").data["spn"] == "postgres/localhost@KERB.TEST"
    assert "udp" in report.get("kdc").detail and "tcp" in report.get("kdc").detail


def test_cli_exit_codes_and_json(healthy, sandbox, capsys, tmp_path):
    assert main(["doctor", "analytics", "--json", "--timeout", "2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and any(c["name"] == "analytics.login" for c in doc["checks"])
    assert not any(c["name"].startswith("finance.") for c in doc["checks"])
    assert main(["doctor", "nope"]) == 1
    out = capsys.readouterr().out
    assert "✘ cluster nope: unknown cluster 'nope': configured clusters are analytics, finance" in out
    assert "fix: use one of the configured names" in out


def test_cli_only_extension_fails_without_a_server(tmp_path, capsys):
    os.environ["JUPYTER_RUNTIME_DIR"] = str(tmp_path)
    assert main(["doctor", "--only", "extension", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["name"] == "extension" and doc["status"] == "warn" and doc["pids"] == []


def test_kdc_down(healthy, sandbox, tmp_path):
    dead = free_port()
    krb5_conf_copy(sandbox, tmp_path, lambda t: t.replace(f"127.0.0.1:{sandbox.realm.port}", f"127.0.0.1:{dead}"))
    report = doctor("analytics")
    kdc = report.get("kdc")
    assert kdc.status == "fail" and "connection refused" in kdc.detail and f":{dead}/udp" in kdc.detail
    assert "TCP and UDP 88 and 464" in kdc.fix
    assert report.get("clock").status == "skip"
    assert report.get("analytics.service_ticket").status == "fail"
    assert "cannot reach a KDC" in report.get("analytics.service_ticket").detail
    assert not report.ok


def test_realm_in_the_wrong_case(healthy, sandbox, tmp_path):
    krb5_conf_copy(sandbox, tmp_path, lambda t: t.replace("KERB.TEST", "kerb.test"))
    check = doctor("analytics").get("krb5_conf")
    assert check.status == "fail"
    assert "defines realm 'kerb.test' but the principal's realm is 'KERB.TEST'" in check.detail
    assert "case-sensitive" in check.detail and "upper case" in check.fix


def test_unresolvable_kdc_host(healthy, sandbox, tmp_path):
    krb5_conf_copy(sandbox, tmp_path, lambda t: t.replace("kdc = 127.0.0.1", "kdc = no-such-dc.invalid"))
    report = doctor("analytics")
    assert report.get("dns").status == "fail" and "no-such-dc.invalid does not resolve" in report.get("dns").detail
    assert "53" in report.get("dns").fix


@pytest.mark.parametrize("offset", [900, -900])
def test_skewed_clock(healthy, offset):
    check = doctor("analytics", clock=lambda: time.time() + offset).get("clock")
    assert check.status == "fail"
    assert check.detail.startswith(f"this machine is {abs(offset)} s {'ahead of' if offset > 0 else 'behind'}")
    assert "allowed 300 s" in check.detail and "NTP" in check.fix


def test_small_skew_is_ok(healthy):
    assert doctor("analytics", clock=lambda: time.time() + 5).get("clock").status == "ok"


@pytest.mark.parametrize("change, spn", [({"krbsrvname": "postgresx"}, "postgresx/localhost@KERB.TEST"),
                                         ({"host": "127.0.0.1"}, "postgres/127.0.0.1@KERB.TEST")],
                         ids=["wrong-spn", "wrong-host"])
def test_wrong_service_principal(healthy, sandbox, kj_config, change, spn):
    clusters = {"analytics": {**sandbox.cluster_config("analytics"), **change}}
    write_config(kj_config, sandbox, clusters=clusters)
    report = doctor("analytics")
    check = report.get("analytics.service_ticket")
    assert check.status == "fail" and check.data["spn"] == spn
    assert f"the KDC has no service principal {spn}" in check.detail
    assert "used as typed" in check.detail and "SPN was registered for" in check.fix
    assert "analytics.login" not in statuses(report)


def test_expired_ticket(sandbox, kj_config, tmp_path):
    os.environ["KERB_JUPYTER_CONFIG"] = str(kj_config)
    os.environ.pop("KRB5CCNAME", None)
    info = tickets.acquire_with_keytab(sandbox.principal, sandbox.keytab, tmp_path / "state" / "krb5cc", lifetime=1)
    wait_for(lambda: info.expired(), timeout=10)
    report = doctor("analytics")
    check = report.get("ticket")
    assert check.status == "fail" and f"the ticket for {sandbox.principal}" in check.detail
    assert "expired" in check.detail
    assert report.get("analytics.service_ticket").status == "skip"


def test_no_ticket_at_all(sandbox, kj_config):
    os.environ["KERB_JUPYTER_CONFIG"] = str(kj_config)
    os.environ.pop("KRB5CCNAME", None)
    check = doctor().get("ticket")
    assert check.status == "fail" and "there is no ticket cache" in check.detail


def test_database_down(healthy, sandbox, kj_config):
    dead = free_port()
    write_config(kj_config, sandbox, clusters={"analytics": {**sandbox.cluster_config("analytics"), "port": dead}})
    check = doctor("analytics").get("analytics.tcp")
    assert check.status == "fail" and f"cannot reach localhost:{dead}: refused" in check.detail
    assert "security group" in check.fix


def test_missing_login_role(healthy, sandbox, kj_config):
    write_config(kj_config, sandbox, clusters={"analytics": {**sandbox.cluster_config("analytics"),
                                                             "user": "nobody@KERB.TEST"}})
    check = doctor("analytics").get("analytics.login")
    assert check.status == "fail" and check.data["code"] == "auth_failed"
    assert 'CREATE USER "nobody@KERB.TEST" WITH LOGIN' in check.fix


def test_foreign_principal_in_the_shared_cache(healthy, sandbox):
    other = f"mallory{secrets.token_hex(3)}"
    keytab = sandbox.root / f"{other}.keytab"
    sandbox.realm.add_principal(other, keytab=keytab)
    tickets.acquire_with_keytab(sandbox.realm.principal(other), keytab, healthy)  # "another tool's kinit"
    check = doctor("analytics").get("ticket")
    assert check.status == "fail" and check.data["foreign"] == f"{other}@KERB.TEST"
    assert f"holds a ticket for {other}@KERB.TEST, not for {sandbox.principal}" in check.detail
    assert "own KRB5CCNAME" in check.fix
    # The keeper notices at its next step and puts our ticket back; the doctor then sees it.
    keeper = TicketKeeper(sandbox.principal, KeytabSource(sandbox.keytab), healthy, healthy.parent / "state.json")
    keeper.step()
    again = doctor("analytics").get("ticket")
    assert again.status == "ok" and again.data["principal"] == sandbox.principal


def test_keeper_error_and_missing_keytab(healthy, sandbox, kj_config, tmp_path):
    missing = tmp_path / "gone.keytab"
    write_config(kj_config, sandbox, source={"type": "keytab", "keytab": str(missing)})
    healthy.unlink()
    keeper = TicketKeeper(sandbox.principal, KeytabSource(missing), healthy, tmp_path / "state" / "state.json")
    keeper.step()
    report = doctor("analytics")
    assert report.get("source").status == "fail" and str(missing) in report.get("source").detail
    keeper_check = report.get("keeper")
    assert keeper_check.status == "fail" and "does not exist" in keeper_check.detail


def test_bad_configuration_is_the_first_failure(tmp_path):
    bad = tmp_path / "kj.json"
    bad.write_text("{not json")
    report = run_doctor(config_path=bad, runtime_dir=tmp_path)
    assert report.checks[0].name == "config" and report.checks[0].status == "fail"
    assert "is not valid JSON" in report.checks[0].detail
    assert report.get("ticket").status == "skip"


def test_install_record_is_shown(healthy, kj_config):
    (kj_config.parent / INSTALL_RECORD).write_text(json.dumps(
        {"status": "failed", "platform": "notebook-instance", "message": "pip could not reach the index",
         "log": "/var/log/kerb-jupyter/install.log", "at": "2026-11-30T05:00:00Z"}))
    check = doctor("analytics").get("install")
    assert check.status == "fail" and "pip could not reach the index" in check.detail
    assert "/var/log/kerb-jupyter/install.log" in check.fix


@pytest.mark.parametrize("enabled", [True, False], ids=["loaded", "not-loaded"])
def test_extension_check_asks_the_running_server(healthy, tmp_path, enabled):
    runtime = tmp_path / "runtime"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime), "HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "jupyter_server", "--no-browser", "--ip=127.0.0.1", f"--port={free_port()}",
           f"--ServerApp.root_dir={tmp_path}", f"--ServerApp.jpserver_extensions={{'kerb_jupyter': {enabled}}}",
           "--KerbJupyterApp.start_keeper=False", "--allow-root"]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # find_servers, not a glob: the info file can be seen before the server has finished writing it
        wait_for(lambda: find_servers(runtime) or server.poll() is not None, timeout=60)
        assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
        check = doctor("analytics", runtime_dir=runtime).get("extension")
    finally:
        server.terminate()
        server.wait(20)
    if enabled:
        assert check.status == "ok" and f"loaded in the server pid {server.pid}" in check.detail
        assert check.data["pids"] == [server.pid]
    else:
        assert check.status == "fail" and "answers 404" in check.detail
        assert "jupyter server extension enable kerb_jupyter" in check.fix and check.data["pids"] == []


@pytest.fixture
def kernel(jp_serverapp, jp_asyncio_loop):
    run = jp_asyncio_loop.run_until_complete
    run(start_extensions(jp_serverapp))
    run(wait_keeper(jp_serverapp, "valid"))
    model = run(jp_serverapp.session_manager.create_session(path="d.ipynb", kernel_name="python3", type="notebook"))
    session = KernelSession(jp_serverapp.kernel_manager.get_kernel(model["kernel"]["id"]).get_connection_info())
    yield session
    session.close()
    run(jp_serverapp.session_manager.delete_session(model["id"]))


async def test_kerbstatus_doctor_in_a_kernel(kernel, sandbox):
    await kernel.arun("%load_ext kerb_jupyter")
    out = await kernel.arun("%kerbstatus --doctor", timeout=90)
    assert out.error is None, out.text
    html, text = out.data[0]["text/html"], out.data[0]["text/plain"]
    assert "kerbdoctor" in html and "✔ analytics.login: logged in as 'alice@KERB.TEST' with Kerberos" in text
    assert "✔ ticket: alice@KERB.TEST" in text and "✔ keeper: state 'valid'" in text
