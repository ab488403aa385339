"""The notebook side of the broker: a real Jupyter server whose source is ``broker``, a real kernel running
%%kerbsql as alice on two clusters while no secret of alice's exists anywhere; a cluster not granted; the broker
restarted; the KDC down for the broker.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import KernelSession, start_extensions, wait_keeper
from openapi_schema_validator import OAS30Validator

from kerb_jupyter.core import tickets
from kerb_jupyter.core.config import load_settings
from kerb_jupyter.core.errors import KdcUnreachableError, TicketError
from kerb_jupyter.sandbox.broker import BrokerSandbox
from kerb_jupyter.sandbox.procs import find_binary
from kerb_jupyter.sandbox.realm import Realm
from kerb_jupyter.server.keeper import TicketKeeper
from kerb_jupyter.server.sources import build_source
from kerb_jupyter.sql.db import Session


@pytest.fixture(scope="module")
def bsb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerSandbox]:
    sb = BrokerSandbox(tmp_path_factory.mktemp("broker-notebook"))
    sb.start()
    yield sb
    sb.stop()


@pytest.fixture
def notebook(bsb: BrokerSandbox, tmp_path: Path) -> BrokerSandbox:
    """The notebook's environment: Kerberos config, its own AWS role session, kerb_jupyter config (own state)."""
    os.environ.update(bsb.env)
    os.environ.pop("KRB5CCNAME", None)
    bsb.write_config(state_dir=str(tmp_path / "state"))
    return bsb


@pytest.fixture
def jp_server_config(notebook: BrokerSandbox) -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"kerb_jupyter": True}},
            "KerbJupyterApp": {"config_file": str(notebook.config_file), "retry_interval": 0.5}}


@pytest.fixture
def kernel(jp_serverapp: Any, jp_asyncio_loop: Any) -> Iterator[KernelSession]:
    run = jp_asyncio_loop.run_until_complete
    run(start_extensions(jp_serverapp))
    run(wait_keeper(jp_serverapp, "valid"))
    model = run(jp_serverapp.session_manager.create_session(path="broker.ipynb", kernel_name="python3",
                                                            type="notebook"))
    session = KernelSession(jp_serverapp.kernel_manager.get_kernel(model["kernel"]["id"]).get_connection_info())
    yield session
    session.close()
    run(jp_serverapp.session_manager.delete_session(model["id"]))


def keytab_principals(path: Path) -> str:
    out = subprocess.run(["klist", "-k", str(path)], capture_output=True, text=True, check=False)
    return out.stdout if out.returncode == 0 else ""


def _is_keytab(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(2) in (b"\x05\x02", b"\x05\x01")
    except OSError:
        return False


def assert_no_secret_of(bsb: BrokerSandbox, user: str, *dirs: Path) -> None:
    """alice has no key in the KDC at all; no keytab on disk and no process environment holds anything of hers."""
    out = subprocess.run([find_binary("kadmin.local", "krb5-admin-server"), "-r", bsb.realm.realm, "-q",
                          f"getprinc {bsb.realm.principal(user)}"], env={**os.environ, **bsb.realm.env},
                         capture_output=True, text=True, check=True).stdout
    assert "Number of keys: 0" in out, out
    keytabs = 0
    for root in dirs:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink() and _is_keytab(path):
                keytabs += 1
                assert f"{user}@" not in keytab_principals(path), f"{path} is a keytab with {user}'s key"
    assert keytabs >= 2  # the broker's and the clusters' keytabs were looked at
    pids = family(os.getpid())  # this test's processes: Jupyter server, kernel, broker, KDC, slapd, moto
    assert len(pids) >= 6
    for pid in pids:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        assert b"KRB5_CLIENT_KTNAME" not in environ
        assert f"{user}.keytab".encode() not in environ and f"{user}.password".encode() not in environ


def family(root: int) -> set[int]:
    """``root`` and all its descendants (pg_ctl daemonises PostgreSQL, whose environment holds only Kerberos paths)."""
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, grew = {root}, True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return found


async def test_kerbsql_as_alice_on_two_clusters_with_no_secret_of_hers(
        kernel: KernelSession, notebook: BrokerSandbox, jp_fetch: Any, tmp_path: Path) -> None:
    assert kernel.run("%load_ext kerb_jupyter").error is None
    for cluster in ("analytics", "finance"):
        out = kernel.run(f"%%kerbsql {cluster} -o r\nSELECT current_user, gss_authenticated, current_database()\n"
                         "FROM pg_stat_gssapi WHERE pid = pg_backend_pid()")
        assert out.error is None, out.text
        assert kernel.run("print(list(r.rows[0]))").stdout.strip() == \
            f"['{notebook.principal}', True, '{cluster}']"
    status = json.loads((await jp_fetch("kerb-jupyter", "api", "status")).body)
    spec = yaml.safe_load(files("kerb_jupyter.server").joinpath("openapi.yaml").read_text())
    OAS30Validator({"$ref": "#/components/schemas/Status", "components": spec["components"]}).validate(status)
    assert status["source"] == f"broker {notebook.broker_url}" and status["principal"] == notebook.principal
    assert set(status["granted"]) == {notebook.spn("analytics"), notebook.spn("finance")}
    assert status["identity"]["source"] == "broker" and status["identity"]["trusted"] is True
    info = tickets.read_cache(tmp_path / "state" / "krb5cc")
    assert not info.renewable and {s for s, _ in info.services} == set(status["granted"])
    klist = subprocess.run(["klist", "-f", "-c", str(tmp_path / "state" / "krb5cc")], capture_output=True,
                           text=True, check=True).stdout
    assert "krbtgt/" not in klist and "broker/" not in klist  # no TGT, nothing of the broker's
    assert_no_secret_of(notebook, "alice", notebook.root, tmp_path, *(s.base for s in notebook.servers.values()))


async def test_a_cluster_not_granted_is_one_clear_line(kernel: KernelSession, notebook: BrokerSandbox,
                                                       jp_serverapp: Any, jp_fetch: Any) -> None:
    original = notebook.broker_config.read_text()
    doc = json.loads(original)
    doc["policy"]["rules"][0]["groups"] = {notebook.realm.group_dn("analysts"): ["analytics"]}
    try:
        notebook.broker_config.write_text(json.dumps(doc))
        notebook.stop_broker()
        notebook.start_broker()
        keeper = jp_serverapp.extension_manager.extension_points["kerb_jupyter"].app.keeper
        await keeper.renew_now()
        assert set(keeper.state.granted) == {notebook.spn("analytics")}
        kernel.run("%load_ext kerb_jupyter")
        assert kernel.run("%kerbsql analytics SELECT 1 AS one").error is None
        out = kernel.run("%kerbsql finance SELECT 1")
        assert out.stderr.startswith("UsageError: the broker did not grant a ticket for cluster 'finance'"), out.text
        assert "Traceback" not in out.text and len(out.stderr.strip().splitlines()) == 1
        code, body = await _call(jp_fetch, "clusters", "finance", "check", method="POST")
        assert code == 409 and body["error"]["code"] == "not_granted", body
        assert keeper.state.refused is None  # the policy's choice, not a KDC refusal: nothing to show as refused
    finally:
        notebook.broker_config.write_text(original)
        notebook.stop_broker()
        notebook.start_broker()


def test_restarting_the_broker_keeps_current_tickets(notebook: BrokerSandbox, tmp_path: Path) -> None:
    settings = load_settings(notebook.config_file)
    source = build_source(settings.source)
    source.resolver(settings.cache_path)()
    os.environ["KRB5CCNAME"] = f"FILE:{settings.cache_path}"
    notebook.stop_broker()
    try:
        session = Session(settings)
        assert session.connection("analytics").execute("SELECT current_user").fetchone() == (notebook.principal,)
        session.close()
        with pytest.raises(KdcUnreachableError, match="cannot reach the broker"):
            source.acquire(notebook.principal, settings.cache_path, None, None)
        assert tickets.read_cache(settings.cache_path).principal == notebook.principal  # left as it was
    finally:
        notebook.start_broker()
    info = source.acquire(notebook.principal, settings.cache_path, None, None)
    assert info.principal == notebook.principal


def test_the_kdc_down_for_the_broker(notebook: BrokerSandbox, tmp_path: Path) -> None:
    settings = load_settings(notebook.config_file)
    source = build_source(settings.source)
    keeper = TicketKeeper(None, source, settings.cache_path, settings.state_path, retry_interval=30,
                          resolve=source.resolver(settings.cache_path))  # type: ignore[attr-defined]
    keeper.step()
    assert keeper.state.state == "valid"
    os.environ["KRB5CCNAME"] = f"FILE:{settings.cache_path}"
    Realm.stop(notebook.realm)  # the KDC only; the directory stays up
    try:
        with pytest.raises(KdcUnreachableError, match="the broker cannot reach the KDC"):
            source.acquire(notebook.principal, settings.cache_path, None, None)
        keeper.step(force=True)  # the keeper reports it and keeps the tickets it has
        assert keeper.state.state == "retrying" and "cannot reach the KDC" in keeper.state.last_error["message"]
        session = Session(settings)  # PostgreSQL checks tickets with its keytab: no KDC needed
        for cluster in ("analytics", "finance"):
            assert session.connection(cluster).execute("SELECT 1").fetchone() == (1,)
        session.close()
    finally:
        Realm.start(notebook.realm)
    keeper.step(force=True)
    assert keeper.state.state == "valid"


def test_read_cache_refuses_an_empty_service_cache(tmp_path: Path) -> None:
    from kerb_jupyter.broker.ccache import encode_principal

    path = tmp_path / "cc"
    path.write_bytes(b"\x05\x04\x00\x00" + encode_principal("alice@KERB.TEST"))
    path.chmod(0o600)
    with pytest.raises(TicketError, match="no ticket-granting ticket"):
        tickets.read_cache(path)


def test_the_keeper_asks_the_broker_again_before_the_tickets_expire(notebook: BrokerSandbox) -> None:
    settings = load_settings(notebook.config_file)
    source = build_source(settings.source)
    now = [0.0]
    keeper = TicketKeeper(notebook.principal, source, settings.cache_path, settings.state_path,
                          clock=lambda: now[0] or time.time())
    keeper.step()
    first = tickets.read_cache(settings.cache_path)
    assert keeper.state.acquisitions == 1 and keeper.state.granted and not first.renewable
    now[0] = first.starttime + 0.5 * (first.endtime - first.starttime)
    keeper.step()
    assert keeper.state.acquisitions == 1  # not due yet
    now[0] = first.starttime + 0.9 * (first.endtime - first.starttime)
    keeper.step()
    assert keeper.state.acquisitions == 2 and keeper.state.last_renewal_kind == "reacquired"
    assert keeper.state.renewals == 0  # a broker cache is never renewed, always fetched again


async def _call(jp_fetch: Any, *parts: str, method: str = "GET") -> tuple[int, dict[str, Any]]:
    from tornado.httpclient import HTTPClientError

    try:
        r = await jp_fetch("kerb-jupyter", "api", *parts, method=method, body=b"" if method == "POST" else None)
        return r.code, json.loads(r.body)
    except HTTPClientError as err:
        return err.code, json.loads(err.response.body) if err.response and err.response.body else {}


@pytest.mark.browser
async def test_partial_grants_end_to_end(kernel: KernelSession, notebook: BrokerSandbox, jp_serverapp: Any,
                                         jp_fetch: Any, jp_base_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The KDC will not let the broker delegate to finance (krbAllowedToDelegateTo names analytics only): analytics
    is issued and kept, finance is shown refused with the broker's reason everywhere; then every cluster refused,
    then the delegation restored, with the keeper asking again by itself."""
    from test_status_page import status_page

    from kerb_jupyter.cli import main
    from kerb_jupyter.core.grants import REASON_CODES

    broker = "broker/localhost"
    keeper = jp_serverapp.extension_manager.extension_points["kerb_jupyter"].app.keeper
    notebook.realm.set_delegation(broker, [notebook.spn("analytics")])
    try:
        await keeper.renew_now()
        assert keeper.state.state == "valid", keeper.state.last_error
        assert set(keeper.state.granted) == {notebook.spn("analytics")}
        assert set(keeper.state.refused) == {"finance"}
        refusal = keeper.state.refused["finance"]
        assert refusal["reason"] == "service_not_allowed" and "\n" not in refusal["message"], refusal
        # api/status, as documented
        code, status = await _call(jp_fetch, "status")
        spec = yaml.safe_load(files("kerb_jupyter.server").joinpath("openapi.yaml").read_text())
        OAS30Validator({"$ref": "#/components/schemas/Status", "components": spec["components"]}).validate(status)
        assert status["refused"] == {"finance": refusal} and set(status["granted"]) == {notebook.spn("analytics")}
        # the cluster check says why, 409 rather than a raw GSS error
        code, body = await _call(jp_fetch, "clusters", "finance", "check", method="POST")
        assert code == 409 and body["error"]["code"] == "cluster_refused", body
        assert refusal["message"] in body["error"]["message"]
        # the kernel reads it from state.json: %%kerbsql says the broker's reason in one line, %kerbstatus lists it
        assert kernel.run("%load_ext kerb_jupyter").error is None
        assert kernel.run("%kerbsql analytics SELECT 1 AS one").error is None
        out = kernel.run("%%kerbsql finance\nSELECT 1")
        assert out.stderr.startswith("UsageError: the broker refused cluster 'finance' (postgres/127.0.0.1): "
                                     f"{refusal['message']} (service_not_allowed)"), out.text
        assert "Traceback" not in out.text and len(out.stderr.strip().splitlines()) == 1
        shown = kernel.run("%kerbstatus").data[0]["text/plain"]
        assert f"refused by the broker: finance: {refusal['message']} (service_not_allowed)" in shown
        assert f"granted by the broker: {notebook.spn('analytics')} until" in shown
        assert main(["status"]) == 0  # kerb-jupyter status: the same lines, from the cache and state.json
        assert f"refused by the broker: finance: {refusal['message']}" in capsys.readouterr().out
        # the status page
        async with status_page(jp_serverapp, jp_base_url) as page:
            await page.wait_for_selector("tr[data-cluster=finance] td.result.refused")
            assert "finance: " + refusal["message"] in await page.text_content("#refused")
            row = await page.text_content("tr[data-cluster=finance] td.result")
            assert row == f"✗ refused by the broker: {refusal['message']} (service_not_allowed)"
            assert await page.text_content("tr[data-cluster=analytics] td.result") == ""
        # the keeper asks the broker again at its next step and keeps analytics
        before = keeper.state.acquisitions
        await keeper.renew_now()
        assert keeper.state.acquisitions == before + 1 and keeper.state.state == "valid"
        # every cluster refused: 403 with the reasons, retried (not a stop), named cluster by cluster
        notebook.realm.set_delegation(broker, [])
        await keeper.renew_now()
        assert keeper.state.state == "retrying" and keeper.state.next_attempt is not None, keeper.state
        error = keeper.state.last_error
        assert error["code"] == "clusters_refused" and "AWS identity" not in error["message"]
        assert error["message"].startswith("the broker granted no cluster: analytics: "), error
        assert "; finance: " in error["message"] and "(request id " in error["message"]
        assert set(keeper.state.refused) == {"analytics", "finance"}
        assert {r["reason"] for r in keeper.state.refused.values()} <= set(REASON_CODES)
    finally:
        notebook.realm.set_delegation(broker, [notebook.spn(n) for n in notebook.servers])
    await keeper.renew_now()
    assert keeper.state.state == "valid" and keeper.state.refused is None
    assert set(keeper.state.granted) == {notebook.spn("analytics"), notebook.spn("finance")}
    assert kernel.run("%kerbsql finance SELECT 1 AS one").error is None


def test_refusals_from_the_broker_are_checked_where_they_enter() -> None:
    from kerb_jupyter.server.brokersource import describe_refused, parse_refused

    assert parse_refused(None) == {} and parse_refused(["finance"]) == {}
    got = parse_refused({
        "finance": {"reason": "service_not_allowed", "message": "not allowed\nto delegate \x1b[31mto postgres/x"},
        "orders": {"reason": "Bad Code!", "message": 42},
        "junk": "not an object",
        "x" * 200: {"reason": "account_disabled", "message": "m" * 1000},
    })
    assert got["finance"] == {"reason": "service_not_allowed", "message": "not allowed to delegate [31mto postgres/x"}
    assert got["orders"] == {"reason": "refused", "message": "refused by the broker (refused)"}
    assert "junk" not in got and got["x" * 80]["message"] == "m" * 300
    assert describe_refused({"b": {"reason": "r", "message": "m2"}, "a": {"reason": "r", "message": "m1"}}) == \
        "a: m1 (r); b: m2 (r)"
