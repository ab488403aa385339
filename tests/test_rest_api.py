"""Every endpoint of /kerb-jupyter/api through a real Jupyter server (jp_fetch), checked against openapi.yaml."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from importlib.resources import files

import pytest
import yaml
from helpers import extension, start_extensions, wait_state
from jupyter_server.auth import Authorizer
from openapi_schema_validator import OAS30Validator
from tornado.httpclient import HTTPClientError

from kerb_jupyter.sandbox.procs import free_port
from kerb_jupyter.server.handlers import handlers

SPEC = yaml.safe_load(files("kerb_jupyter.server").joinpath("openapi.yaml").read_text())


def conforms(path: str, method: str, status: int, body: dict) -> None:
    """The response matches the schema openapi.yaml documents for this path, method and status."""
    op = SPEC["paths"][path][method]
    assert str(status) in op["responses"], f"{method.upper()} {path} answered {status}, which is not documented"
    response = op["responses"][str(status)]
    if "$ref" in response:
        response = SPEC["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    schema = {**response["content"]["application/json"]["schema"], "components": SPEC["components"]}
    OAS30Validator(schema).validate(body)


async def call(jp_fetch, *parts, method="GET", **kw):
    """(status, JSON body), whatever the status."""
    try:
        r = await jp_fetch("kerb-jupyter", "api", *parts, method=method,
                           body=b"" if method == "POST" else None, **kw)
        return r.code, json.loads(r.body)
    except HTTPClientError as err:
        return err.code, json.loads(err.response.body) if err.response and err.response.body else {}


@pytest.fixture
def jp_server_config(kj_config, sandbox, request):
    """The default: the sandbox's clusters plus a closed port; ``indirect`` variants for the tests below."""
    from conftest import write_config

    variant = getattr(request, "param", "default")
    extra = {"renew_min_interval": 0} if variant != "default" else {}
    if variant == "slow_checks":
        port = request.getfixturevalue("silent_listener")
        clusters = {f"slow{i}": {"host": "localhost", "port": port, "dbname": "x", "connect_timeout": 12,
                                 "sslmode": "disable", "gssencmode": "disable"} for i in range(10)}
        write_config(kj_config, sandbox, clusters=clusters)
        extra["max_concurrent_checks"] = 2
    elif variant == "rejected":
        request.getfixturevalue("rejected_config")
    elif variant == "odd_option":
        clusters = {"odd": {**sandbox.cluster_config("analytics"), "options": {"no_such_libpq_option": "1"}}}
        write_config(kj_config, sandbox, clusters=clusters)
    else:
        clusters = {n: sandbox.cluster_config(n) for n in sandbox.servers}
        clusters["closed"] = {"host": "localhost", "port": free_port(), "dbname": "x", "connect_timeout": 2}
        write_config(kj_config, sandbox, clusters=clusters)
    return {"ServerApp": {"jpserver_extensions": {"kerb_jupyter": True}},
            "KerbJupyterApp": {"config_file": str(kj_config), "retry_interval": 0.3, "max_retry_interval": 0.5,
                               **extra}}


def test_every_route_is_documented():
    documented = {re.sub(r"\{[^}]+\}", "([^/]+)", p) for p in SPEC["paths"]}
    for pattern, _ in handlers("/kerb-jupyter"):
        if pattern.startswith("/kerb-jupyter/api/") and not pattern.endswith("openapi.yaml"):
            assert pattern.removeprefix("/kerb-jupyter/api") in documented, pattern


async def test_status(jp_serverapp, jp_fetch, sandbox):
    await start_extensions(jp_serverapp)
    await wait_state(jp_fetch, "valid")
    status, body = await call(jp_fetch, "status")
    conforms("/status", "get", status, body)
    assert status == 200 and body["principal"] == sandbox.principal


async def test_renew_now_and_its_rate_limit(jp_serverapp, jp_fetch):
    await start_extensions(jp_serverapp)
    before = await wait_state(jp_fetch, "valid")
    status, body = await call(jp_fetch, "renew", method="POST")
    conforms("/renew", "post", status, body)
    assert status == 200 and body["renewals"] == before["renewals"] + 1
    status, body = await call(jp_fetch, "renew", method="POST")
    conforms("/renew", "post", status, body)
    assert status == 429 and body["error"]["code"] == "rate_limited"


async def test_clusters(jp_serverapp, jp_fetch):
    status, body = await call(jp_fetch, "clusters")
    conforms("/clusters", "get", status, body)
    assert [c["name"] for c in body["clusters"]] == ["analytics", "finance", "closed"]


async def test_check_a_cluster(jp_serverapp, jp_fetch, sandbox):
    await start_extensions(jp_serverapp)
    await wait_state(jp_fetch, "valid")
    status, body = await call(jp_fetch, "clusters", "finance", "check", method="POST")
    conforms("/clusters/{name}/check", "post", status, body)
    assert status == 200, body
    assert body["current_user"] == sandbox.principal and body["gss_authenticated"] is True
    assert body["server_version"].startswith("15") and body["latency_ms"] > 0
    status, body = await call(jp_fetch, "clusters", "finance", "check", method="POST")
    assert status == 429 and body["error"]["code"] == "rate_limited"


async def test_check_errors_are_classified(jp_serverapp, jp_fetch):
    await start_extensions(jp_serverapp)
    await wait_state(jp_fetch, "valid")
    status, body = await call(jp_fetch, "clusters", "nope", "check", method="POST")
    conforms("/clusters/{name}/check", "post", status, body)
    assert status == 404 and body["error"]["code"] == "unknown_cluster"
    assert "analytics, closed, finance" in body["error"]["message"]
    status, body = await call(jp_fetch, "clusters", "closed", "check", method="POST")
    conforms("/clusters/{name}/check", "post", status, body)
    assert status == 502 and body["error"]["code"] == "db_unreachable"
    assert "Traceback" not in json.dumps(body)


async def test_kdc_down_then_expired_is_reported(jp_serverapp, jp_fetch, sandbox):
    app = extension(jp_serverapp)
    app.keeper.lifetime = 2
    await start_extensions(jp_serverapp)
    await wait_state(jp_fetch, "valid")
    sandbox.realm.stop()
    try:
        doc = await wait_state(jp_fetch, "retrying", timeout=5)
        assert doc["last_error"]["code"] == "kdc_unreachable"
        doc = await wait_state(jp_fetch, "expired", timeout=5)
        conforms("/status", "get", 200, doc)
        status, body = await call(jp_fetch, "clusters", "analytics", "check", method="POST")
        conforms("/clusters/{name}/check", "post", status, body)
        assert status == 502 and body["error"]["code"] == "ticket_expired"
        assert "KDC" in body["error"]["message"]  # the keeper's diagnosis is passed on
    finally:
        sandbox.realm.start()
    await wait_state(jp_fetch, "valid", timeout=10)


@pytest.mark.parametrize(("method", "parts"), [
    ("GET", ("status",)), ("POST", ("renew",)), ("GET", ("clusters",)),
    ("POST", ("clusters", "analytics", "check")), ("GET", ("openapi.yaml",)),
])
async def test_everything_requires_authentication(jp_serverapp, jp_fetch, method, parts):
    status, body = await call(jp_fetch, *parts, method=method, headers={"Authorization": ""})
    assert status == 403, (status, body)
    assert set(body) <= {"error", "message", "reason"}


class DenyKerbJupyter(Authorizer):
    def is_authorized(self, handler, user, action, resource):
        return resource != "kerb_jupyter"


@pytest.mark.parametrize("jp_server_config", [{
    "ServerApp": {"jpserver_extensions": {"kerb_jupyter": True}, "authorizer_class": DenyKerbJupyter},
}])
async def test_the_authorizer_is_consulted(jp_serverapp, jp_fetch):
    status, body = await call(jp_fetch, "status")
    assert status == 403 and body["error"]["code"] == "forbidden"
    r = await jp_fetch("api", "status")  # the rest of Jupyter is unaffected
    assert r.code == 200


async def test_the_page_requires_authentication(jp_serverapp, jp_fetch):
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("kerb-jupyter/", headers={"Authorization": ""}, follow_redirects=False)
    assert err.value.code in (302, 403)
    page = await jp_fetch("kerb-jupyter/")
    assert b"Kerberos credentials for this notebook server" in page.body


async def test_keeper_stops_with_the_server(jp_serverapp, jp_fetch):
    await start_extensions(jp_serverapp)
    await wait_state(jp_fetch, "valid")
    task = extension(jp_serverapp).keeper._task
    assert task is not None and not task.done()
    await jp_serverapp.extension_manager.stop_all_extensions()
    assert task.done() and task not in asyncio.all_tasks()
    assert extension(jp_serverapp).keeper.state.state == "stopped"


async def test_metrics_are_exported(jp_serverapp, jp_fetch):
    await start_extensions(jp_serverapp)
    await wait_state(jp_fetch, "valid")
    text = (await jp_fetch("metrics")).body.decode()
    left = re.search(r"^kerb_jupyter_ticket_seconds_remaining (\S+)$", text, re.M)
    assert left and 3000 < float(left.group(1)) <= 3600
    assert re.search(r'^kerb_jupyter_renewals_total\{kind="acquired"\} 1\.0$', text, re.M)
    assert re.search(r"^kerb_jupyter_renewal_failures_total 0\.0$", text, re.M)


# -- bounded work: hanging databases never hold up status and renew -------------------------------------------
@pytest.fixture
def silent_listener():
    """A TCP port that accepts connections and never says a word (a database that hangs)."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held, stop = [], threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield srv.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    srv.close()


@pytest.mark.parametrize("jp_server_config", ["slow_checks"], indirect=True)
async def test_many_hanging_checks_are_bounded_while_status_and_renew_answer(jp_serverapp, jp_fetch):
    app = jp_serverapp
    await start_extensions(app)
    await wait_state(jp_fetch, "valid")
    finished: list[str] = []

    async def check(i):
        status, body = await call(jp_fetch, "clusters", f"slow{i}", "check", method="POST")
        finished.append(f"check{i}:{status}")
        return status, body

    checks = [asyncio.ensure_future(check(i)) for i in range(10)]
    while extension(app).checks_running < 2:  # two hang in the pool; the other eight are answered at once
        await asyncio.sleep(0.02)
    took = []
    for _ in range(3):
        started = time.perf_counter()
        status, body = await call(jp_fetch, "status")
        assert status == 200
        finished.append("status")
        status, body = await call(jp_fetch, "renew", method="POST")
        assert status == 200 and body["state"] == "valid", body
        finished.append("renew")
        took.append(time.perf_counter() - started)
    print(f"status + renew while two checks hang: {max(took) * 1000:.1f} ms at most")
    results = await asyncio.gather(*checks)
    busy = [r for r in results if r[0] == 429]
    hung = [r for r in results if r[0] != 429]
    assert len(busy) == 8 and all(b["error"]["code"] == "checks_busy" for _, b in busy)
    conforms("/clusters/{name}/check", "post", *busy[0])
    assert len(hung) == 2 and all(s == 502 and b["error"]["code"] == "db_unreachable" for s, b in hung), hung
    # Status and renew all answered while both hanging checks were still running.
    last_control = max(i for i, what in enumerate(finished) if what in ("status", "renew"))
    first_hung = min(i for i, what in enumerate(finished) if what.startswith("check") and not what.endswith("429"))
    assert last_control < first_hung, finished


# -- after rejected credentials: no lockout ---------------------------------------------------------------
def stale_principal(sandbox, keytab):
    """A principal whose keytab holds the wrong key (like a keytab left stale by a password change)."""
    who = sandbox.realm.add_principal(f"bob{os.urandom(3).hex()}", password=os.urandom(8).hex(), keytab=keytab)
    sandbox.realm.kadmin(f"cpw -pw {os.urandom(8).hex()} {who}")  # the keytab's key is now stale
    return who


@pytest.fixture
def rejected_config(kj_config, sandbox, tmp_path):
    from conftest import write_config

    keytab = tmp_path / "bob.keytab"
    who = stale_principal(sandbox, keytab)
    write_config(kj_config, sandbox, principal=who, source={"type": "keytab", "keytab": str(keytab)})
    return who, keytab


def as_requests(sandbox, principal: str) -> int:
    log = sandbox.realm.log_file.read_text(errors="replace")
    return sum(1 for line in log.splitlines() if "AS_REQ" in line and f" {principal} for krbtgt" in line)


@pytest.mark.parametrize("jp_server_config", ["rejected"], indirect=True)
async def test_renew_after_rejected_credentials_answers_409_without_asking_the_kdc(
        jp_serverapp, rejected_config, sandbox, jp_fetch):
    who, keytab = rejected_config
    app = jp_serverapp
    await start_extensions(app)
    doc = await wait_state(jp_fetch, "error")
    assert doc["last_error"]["code"] == "credentials_rejected"
    first = as_requests(sandbox, who)
    assert 1 <= first <= 2  # one attempt (the KDC logs a preauth round too)
    for _ in range(5):
        status, body = await call(jp_fetch, "renew", method="POST")
        conforms("/renew", "post", status, body)
        assert status == 409 and body["error"]["code"] == "credentials_rejected"
        assert who in body["error"]["message"] and "to protect the account from lockout" in body["error"]["message"]
    assert as_requests(sandbox, who) == first  # five clicks, no AS request
    # The cool-down passes: exactly one more attempt, then 409 again.
    extension(app).keeper.rejected_cooldown = 0
    status, body = await call(jp_fetch, "renew", method="POST")
    assert status == 409 and "fix the keytab or secret" in body["error"]["message"]
    extension(app).keeper.rejected_cooldown = 900
    second = as_requests(sandbox, who)
    assert 1 <= second - first <= 2
    status, body = await call(jp_fetch, "renew", method="POST")
    assert status == 409 and as_requests(sandbox, who) == second
    # The keytab is replaced with a good one: noticed at once, one attempt, a ticket.
    sandbox.realm.export_keytab(who, keytab)
    status, body = await call(jp_fetch, "renew", method="POST")
    assert status == 200 and body["state"] == "valid" and body["principal"] == who, body


@pytest.mark.parametrize("jp_server_config", ["rejected"], indirect=True)
async def test_a_changed_configuration_lifts_the_hold(jp_serverapp, kj_config, sandbox, jp_fetch, tmp_path):
    from conftest import write_config

    await start_extensions(jp_serverapp)
    await wait_state(jp_fetch, "error")
    # Another stale keytab: the edit is read by a renew request, which makes exactly one attempt for it.
    other = stale_principal(sandbox, tmp_path / "other.keytab")
    write_config(kj_config, sandbox, principal=other,
                 source={"type": "keytab", "keytab": str(tmp_path / "other.keytab")})
    for _ in range(3):
        status, body = await call(jp_fetch, "renew", method="POST")
        assert status == 409 and other in body["error"]["message"], body
    assert as_requests(sandbox, other) == 1  # no preauth required here: one AS request per attempt
    write_config(kj_config, sandbox)  # the admin fixes the principal
    status, body = await call(jp_fetch, "renew", method="POST")
    assert status == 200 and body["principal"] == sandbox.principal
    await wait_state(jp_fetch, "valid")


@pytest.mark.parametrize("jp_server_config", ["odd_option"], indirect=True)
async def test_a_check_with_an_option_libpq_does_not_know_answers_json_not_500(jp_serverapp, jp_fetch):
    await start_extensions(jp_serverapp)
    status, body = await call(jp_fetch, "clusters", "odd", "check", method="POST")
    # Refused where the configuration is loaded (404/409) or when connecting (502): never a 500 or a traceback.
    assert status in (404, 409, 502) and body["error"]["code"] != "server_error", (status, body)
    assert "Traceback" not in json.dumps(body)
