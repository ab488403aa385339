"""The broker as a running service (LDAP realm, moto STS with SigV4 verification, a real broker process):
every refusal case answered with a generic body and audited with its reason; limits; health; metrics; reload.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from kerb_jupyter.broker.app import Broker, Refused
from kerb_jupyter.broker.audit import AuditLog, read_records
from kerb_jupyter.broker.auth import AUDIENCE_HEADER, NONCE_HEADER, sign_request
from kerb_jupyter.broker.settings import load_broker_settings
from kerb_jupyter.broker.store import MemoryStore, StoreUnavailable
from kerb_jupyter.brokersource import build_broker_source
from kerb_jupyter.errors import ConfigError, CredentialsRejectedError, KdcUnreachableError, TicketError
from kerb_jupyter.sandbox.broker import AUDIENCE, BrokerSandbox
from kerb_jupyter.sandbox.sts import REGION, SSO_ROLE


@pytest.fixture(scope="module")
def bsb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerSandbox]:
    sb = BrokerSandbox(tmp_path_factory.mktemp("broker-service"))
    sb.start()
    sb.realm.add_user("bob")  # in the directory, in no group
    sb.realm.add_principal("postgres/other")  # a cluster the broker may not delegate to
    yield sb
    sb.stop()


@pytest.fixture(autouse=True)
def _krb5(bsb: BrokerSandbox) -> None:
    os.environ["KRB5_CONFIG"] = str(bsb.realm.krb5_conf)


def creds(bsb: BrokerSandbox, session: str = "alice", role: str = SSO_ROLE) -> Credentials:
    c = bsb.sts.session(role, session)
    return Credentials(c["aws_access_key_id"], c["aws_secret_access_key"], c["aws_session_token"])


def post(bsb: BrokerSandbox, payload: Any) -> tuple[int, dict[str, Any]]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    req = urllib.request.Request(bsb.broker_url + "/v1/credentials", data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def audited(bsb: BrokerSandbox, request_id: str) -> dict[str, Any]:
    found = [r for r in read_records(bsb.audit_log) if r["request_id"] == request_id]
    assert len(found) == 1, found
    return found[0]


def refused(bsb: BrokerSandbox, payload: Any, status: int, reason: str) -> dict[str, Any]:
    code, body = post(bsb, payload)
    assert code == status, body
    assert set(body) == {"error", "request_id"} and body["error"] in ("unauthenticated", "forbidden")  # generic
    record = audited(bsb, body["request_id"])
    assert record["decision"] == "refused" and record["reason"] == reason, record
    return record


def payload(bsb: BrokerSandbox, c: Credentials, audience: str = AUDIENCE) -> dict[str, Any]:
    return sign_request(c, REGION, bsb.sts.url + "/", audience)


def outcomes(bsb: BrokerSandbox, broker: Broker, requests: list[tuple[Credentials, str]]) -> list[str]:
    """Each (credentials, source address) as one request, in order: "issued" or "<status> <reason>"."""
    async def run() -> list[str]:
        out = []
        for c, source in requests:
            try:
                await broker.handle(json.dumps(payload(bsb, c)).encode(), source, "r")
                out.append("issued")
            except Refused as err:
                out.append(f"{err.status} {err.reason}")
        return out

    return asyncio.run(run())


def test_alice_gets_both_clusters_and_it_is_audited(bsb: BrokerSandbox) -> None:
    code, body = post(bsb, payload(bsb, creds(bsb)))
    assert code == 200, body
    assert body["principal"] == bsb.principal and sorted(body["clusters"]) == ["analytics", "finance"]
    assert set(body) == {"principal", "clusters", "refused", "expires", "cache", "caller_arn", "request_id"}
    assert body["refused"] == {}
    assert body["clusters"]["finance"]["spn"] == bsb.spn("finance")
    record = audited(bsb, body["request_id"])
    assert record["decision"] == "issued" and record["caller_arn"].endswith(f"/{SSO_ROLE}/alice")
    assert record["source"] == "127.0.0.1" and record["clusters"] == ["analytics", "finance"]
    assert "cache" not in record and body["cache"] not in bsb.audit_log.read_text()


def test_a_caller_mapped_to_nobody(bsb: BrokerSandbox) -> None:
    bsb.sts.create_role("AWSReservedSSO_Contractors_99")
    r = refused(bsb, payload(bsb, creds(bsb, "alice", "AWSReservedSSO_Contractors_99")), 403, "no_rule")
    assert r["caller_arn"].endswith("/AWSReservedSSO_Contractors_99/alice") and r["principal"] is None
    refused(bsb, payload(bsb, creds(bsb, "carol,x")), 403, "unmapped")


def test_a_group_that_grants_nothing(bsb: BrokerSandbox) -> None:
    r = refused(bsb, payload(bsb, creds(bsb, "bob")), 403, "no_group")
    assert r["caller_arn"].endswith("/bob")


def test_a_replayed_request(bsb: BrokerSandbox) -> None:
    p = payload(bsb, creds(bsb))
    assert post(bsb, p)[0] == 200
    refused(bsb, p, 401, "replay")


def test_wrong_audience_action_date_and_forgery(bsb: BrokerSandbox) -> None:
    c = creds(bsb)
    refused(bsb, payload(bsb, c, audience="another-broker"), 401, "wrong_audience")
    host = f"127.0.0.1:{bsb.sts.port}"
    req = AWSRequest(method="POST", url=bsb.sts.url + "/", data=b"Action=GetSessionToken&Version=2011-06-15",
                     headers={"Host": host, AUDIENCE_HEADER: AUDIENCE, NONCE_HEADER: "n" * 24})
    SigV4Auth(c, "sts", REGION).add_auth(req)
    wrong = {"headers": dict(req.prepare().headers), "body": base64.b64encode(req.data).decode()}
    refused(bsb, wrong, 401, "wrong_action")
    old = payload(bsb, c)
    old["headers"]["X-Amz-Date"] = "20260101T000000Z"  # the broker refuses it before STS sees it
    refused(bsb, old, 401, "expired")
    forged = payload(bsb, Credentials(c.access_key, "not-the-secret", c.token))
    refused(bsb, forged, 401, "sts_refused")  # moto, verification on, is the judge of signatures
    refused(bsb, b"{not json", 401, "malformed")


def test_a_source_outside_the_ranges(bsb: BrokerSandbox) -> None:
    broker = Broker(load_broker_settings(bsb.broker_config))
    body = json.dumps(payload(bsb, creds(bsb))).encode()
    with pytest.raises(Refused) as err:
        asyncio.run(broker.handle(body, "10.1.2.3", "test-source"))
    assert err.value.status == 403 and err.value.reason == "source_address"
    record = audited(bsb, "test-source")
    assert record["reason"] == "source_address" and record["source"] == "10.1.2.3"


def test_rate_limits_and_the_hourly_cap(bsb: BrokerSandbox, tmp_path: Path) -> None:
    doc = json.loads(bsb.broker_config.read_text())
    doc["limits"] = {"per_source": [4, 60], "issues_per_principal_hour": 2}
    doc["audit_log"] = str(tmp_path / "audit.jsonl")
    path = tmp_path / "broker.json"
    path.write_text(json.dumps(doc))
    c = creds(bsb)
    sources = ("127.0.0.1",) * 3 + ("127.0.0.2",) + ("127.0.0.1",) * 2
    # 127.0.0.1 sends 5 (the 5th over its limit of 4); alice may have 2 caches an hour from any address.
    assert outcomes(bsb, Broker(load_broker_settings(path)), [(c, source) for source in sources]) == [
        "issued", "issued", "429 issue_cap", "429 issue_cap", "429 issue_cap", "429 rate_limited_source"]
    reasons = [r["reason"] for r in read_records(tmp_path / "audit.jsonl")]
    assert reasons == ["ok", "ok", "issue_cap", "issue_cap", "issue_cap", "rate_limited_source"]


def test_health_and_metrics(bsb: BrokerSandbox) -> None:
    with urllib.request.urlopen(bsb.broker_url + "/healthz", timeout=10) as resp:
        assert json.loads(resp.read())["status"] == "ok"
    with urllib.request.urlopen(bsb.broker_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert "kerb_jupyter_broker_issued_total" in text
    assert 'kerb_jupyter_broker_refused_total{reason="replay"}' in text
    assert 'kerb_jupyter_broker_kdc_seconds_count{step="s4u2proxy"}' in text


def test_an_oversized_body_is_413_with_json_and_audited(bsb: BrokerSandbox) -> None:
    big = json.dumps({"headers": {}, "body": "A" * 20000}).encode()  # max_body is 16384
    code, body = post(bsb, big)
    assert code == 413 and body["error"] == "too_large" and "over 16384 bytes" in body["message"]
    record = audited(bsb, body["request_id"])
    assert record["decision"] == "refused" and record["reason"] == "body_too_large"


def test_a_request_signed_for_another_region(bsb: BrokerSandbox) -> None:
    wrong = sign_request(creds(bsb), "eu-west-1", bsb.sts.url + "/", AUDIENCE)  # the broker is configured for us-east-1
    refused(bsb, wrong, 401, "wrong_region")


def test_a_request_accepted_before_a_restart_is_refused_after_it(bsb: BrokerSandbox) -> None:
    """The memory store forgets what it saw: the broker refuses anything signed before it started."""
    import time

    p = payload(bsb, creds(bsb))
    assert post(bsb, p)[0] == 200
    time.sleep(1.1)  # SigV4 dates have one-second resolution
    bsb.stop_broker()
    bsb.start_broker()
    refused(bsb, p, 401, "signed_before_start")
    assert post(bsb, payload(bsb, creds(bsb)))[0] == 200  # a request signed now is fine


def test_sighup_keeps_a_good_policy_and_takes_a_new_one(bsb: BrokerSandbox) -> None:
    original = bsb.broker_config.read_text()
    try:
        doc = json.loads(original)
        original_role = doc["policy"]["rules"][0]["role"]
        doc["policy"]["rules"][0]["role"] = "*"  # trusts a caller-chosen session name: refused
        bsb.broker_config.write_text(json.dumps(doc))
        bsb.reload_broker()
        assert _wait_log(bsb, "previous one stays in force")
        assert post(bsb, payload(bsb, creds(bsb)))[0] == 200
        doc["policy"]["rules"][0]["role"] = original_role
        doc["policy"]["rules"][0]["mapping"] = {"rules": [{"regex": "(unclosed", "principal": "{name}@KERB.TEST"}]}
        bsb.broker_config.write_text(json.dumps(doc))
        bsb.reload_broker()
        assert _wait_log(bsb, "previous one stays in force", count=2)
        with urllib.request.urlopen(bsb.broker_url + "/healthz", timeout=10) as resp:
            health = json.loads(resp.read())
        assert health["status"] == "ok" and health["policy_reload_error"] is True
        assert "previous one stays in force" in health["policy_error"] and "does not compile" in health["policy_error"]
        code, body = post(bsb, payload(bsb, creds(bsb)))
        assert code == 200 and sorted(body["clusters"]) == ["analytics", "finance"]  # the old policy, no 500
        doc = json.loads(original)
        doc["policy"]["rules"][0]["groups"] = {bsb.realm.group_dn("analysts"): ["analytics"]}
        bsb.broker_config.write_text(json.dumps(doc))
        bsb.reload_broker()
        assert _wait_log(bsb, "policy reloaded")
        code, body = post(bsb, payload(bsb, creds(bsb)))
        assert code == 200 and sorted(body["clusters"]) == ["analytics"]
    finally:
        bsb.broker_config.write_text(original)
        bsb.reload_broker()
        _wait_log(bsb, "policy reloaded", count=2)


def _wait_log(bsb: BrokerSandbox, text: str, count: int = 1) -> bool:
    import time

    for _ in range(100):
        if (bsb.broker_dir / "broker.log").read_text().count(text) >= count:
            return True
        time.sleep(0.05)
    return False


def test_the_notebook_source_reports_refusals_plainly(bsb: BrokerSandbox, tmp_path: Path) -> None:

    src = build_broker_source({"type": "broker", "url": bsb.broker_url, "audience": AUDIENCE, "region": REGION,
                               "sts_url": bsb.sts.url + "/"})
    src.credentials = lambda: creds(bsb, "bob")
    with pytest.raises(CredentialsRejectedError, match="refused this notebook's AWS identity") as err:
        src.acquire(None, tmp_path / "cc", None, None)
    assert "request id" in str(err.value) and "no_group" not in str(err.value)  # the reason stays in the broker
    assert not (tmp_path / "cc").exists()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def _variant(bsb: BrokerSandbox, tmp_path: Path, **changes: Any) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    doc = json.loads(bsb.broker_config.read_text())
    doc["audit_log"] = str(tmp_path / "audit.jsonl")
    for key, value in changes.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "broker.json"
    path.write_text(json.dumps(doc))
    return path


def _with_other(bsb: BrokerSandbox, tmp_path: Path, *granted: str) -> Path:
    """A variant whose policy grants ``granted`` (default: all three), "other" being outside the delegation list."""
    clusters = {**json.loads(bsb.broker_config.read_text())["clusters"], "other": bsb.realm.principal("postgres/other")}
    rule = {**json.loads(bsb.broker_config.read_text())["policy"]["rules"][0],
            "groups": {bsb.realm.group_dn("analysts"): list(granted or clusters)}}
    return _variant(bsb, tmp_path, clusters=clusters, policy={"rules": [rule]})


def _serve(path: Path, bodies: list[Callable[[], bytes]]) -> list[tuple[int, dict[str, Any]]]:
    """Each body (made after the broker started: it refuses requests signed before) POSTed in turn to an
    in-process broker listening with the settings at ``path``."""
    from tornado.httpclient import AsyncHTTPClient, HTTPRequest

    from kerb_jupyter.sandbox.procs import free_port

    port = free_port()
    doc = json.loads(path.read_text())
    doc["listen"] = {**doc["listen"], "port": port}
    path.write_text(json.dumps(doc))

    async def run() -> list[tuple[int, dict[str, Any]]]:
        broker = Broker(load_broker_settings(path))
        server = broker.listen()
        client = AsyncHTTPClient(force_instance=True)
        try:
            out = []
            for body in bodies:
                r = await client.fetch(HTTPRequest(f"http://127.0.0.1:{port}/v1/credentials", method="POST",
                                                   body=body(), request_timeout=30), raise_error=False)
                out.append((r.code, json.loads(r.body)))
            return out
        finally:
            client.close()
            server.stop()
            await broker.close()

    return asyncio.run(run())


def test_a_partial_grant_issues_the_others_and_names_the_refused_cluster(bsb: BrokerSandbox, tmp_path: Path) -> None:
    ((code, body),) = _serve(_with_other(bsb, tmp_path), [lambda: json.dumps(payload(bsb, creds(bsb))).encode()])
    assert code == 200, body
    assert set(body) == {"principal", "clusters", "refused", "expires", "cache", "caller_arn", "request_id"}
    assert sorted(body["clusters"]) == ["analytics", "finance"]
    assert body["expires"] == min(c["expires"] for c in body["clusters"].values())
    other = bsb.realm.principal("postgres/other")
    assert list(body["refused"]) == ["other"] and body["refused"]["other"]["reason"] == "service_not_allowed"
    message = body["refused"]["other"]["message"]
    assert f"not allowed to delegate to {other}: add {other} to the broker account's delegation list" in message
    cache = tmp_path / "cc"
    cache.write_bytes(base64.b64decode(body["cache"]))
    cache.chmod(0o600)
    import krb5

    servers = sorted(c.server.name.decode() for c in krb5.cc_resolve(krb5.init_context(), f"FILE:{cache}".encode()))
    assert servers == sorted([bsb.spn("analytics"), bsb.spn("finance")])
    (record,) = read_records(tmp_path / "audit.jsonl")
    assert record["decision"] == "issued" and record["reason"] == "partial"
    assert record["clusters"] == ["analytics", "finance"]
    assert record["refused"] == {"other": {"reason": "service_not_allowed", "message": message}}


def test_every_cluster_refused_is_403_with_the_reasons(bsb: BrokerSandbox, tmp_path: Path) -> None:
    signed = [lambda: json.dumps(payload(bsb, creds(bsb))).encode()]
    ((code, body),) = _serve(_with_other(bsb, tmp_path, "other"), signed)
    assert code == 403, body
    assert set(body) == {"error", "request_id", "refused"} and body["error"] == "forbidden"
    assert body["refused"]["other"]["reason"] == "service_not_allowed"
    (record,) = read_records(tmp_path / "audit.jsonl")
    assert record["decision"] == "refused" and record["reason"] == "service_not_allowed"
    assert record["clusters"] == [] and record["refused"] == body["refused"]


def test_tls_with_the_notebook_checking_the_broker_against_its_ca_bundle(bsb: BrokerSandbox,
                                                                        tmp_path: Path) -> None:
    from kerb_jupyter.sandbox.procs import free_port

    cert, key = _self_signed(tmp_path)
    port = free_port()
    path = _variant(bsb, tmp_path, listen={"port": port, "tls_cert": str(cert), "tls_key": str(key)})
    spec = {"type": "broker", "url": f"https://localhost:{port}", "audience": AUDIENCE, "region": REGION,
            "sts_url": bsb.sts.url + "/"}

    async def run() -> tuple[str, str]:
        broker = Broker(load_broker_settings(path))
        server = broker.listen()
        try:
            src = build_broker_source({**spec, "ca_bundle": str(cert)})
            src.credentials = lambda: creds(bsb)
            info = await asyncio.to_thread(src.acquire, None, tmp_path / "state" / "krb5cc", None, None)
            untrusting = build_broker_source(spec)  # the system CAs do not know this certificate
            untrusting.credentials = lambda: creds(bsb)
            try:
                await asyncio.to_thread(untrusting.acquire, None, tmp_path / "other" / "krb5cc", None, None)
                refused = "accepted"
            except KdcUnreachableError as err:
                refused = str(err)
            return info.principal, refused
        finally:
            server.stop()
            await broker.close()

    principal, refused = asyncio.run(run())
    assert principal == bsb.principal
    assert "CERTIFICATE_VERIFY_FAILED" in refused


def test_a_silent_sts_times_out_into_a_503(bsb: BrokerSandbox, tmp_path: Path) -> None:
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers
    try:
        host = f"127.0.0.1:{bsb.sts.port}"  # what the notebook signs stays the same
        path = _variant(bsb, tmp_path, sts={"endpoint": f"http://127.0.0.1:{silent.getsockname()[1]}/",
                                            "host": host, "timeout": 1})
        broker = Broker(load_broker_settings(path))
        with pytest.raises(Refused) as err:
            asyncio.run(broker.handle(json.dumps(payload(bsb, creds(bsb))).encode(), "127.0.0.1", "slow"))
    finally:
        silent.close()
    assert err.value.status == 503 and err.value.reason == "sts_unavailable"
    assert read_records(tmp_path / "audit.jsonl")[0]["reason"] == "sts_unavailable"


def test_requests_queued_behind_a_stalled_sts_get_503_never_500(bsb: BrokerSandbox, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """One request in flight to an STS that never answers; the others wait in the client's queue past sts.timeout."""
    import socket

    from tornado.httpclient import AsyncHTTPClient, HTTPRequest

    from kerb_jupyter.sandbox.procs import free_port

    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(16)  # accepts connections, never answers
    port = free_port()
    path = _variant(bsb, tmp_path, listen={"port": port},
                    sts={"endpoint": f"http://127.0.0.1:{stalled.getsockname()[1]}/",
                         "host": f"127.0.0.1:{bsb.sts.port}", "timeout": 1, "max_clients": 1})
    caplog.set_level(logging.DEBUG, logger="kerb_jupyter.broker")

    async def run() -> list[tuple[int, dict[str, Any]]]:
        broker = Broker(load_broker_settings(path))
        server = broker.listen()
        bodies = [json.dumps(payload(bsb, creds(bsb))).encode() for _ in range(4)]  # signed after it started
        client = AsyncHTTPClient(force_instance=True)
        try:
            answers = await asyncio.gather(*(client.fetch(HTTPRequest(
                f"http://127.0.0.1:{port}/v1/credentials", method="POST", body=b, request_timeout=30),
                raise_error=False) for b in bodies))
            return [(r.code, json.loads(r.body)) for r in answers]
        finally:
            client.close()
            server.stop()
            await broker.close()

    try:
        answers = asyncio.run(run())
    finally:
        stalled.close()
    assert [code for code, _ in answers] == [503] * 4, answers
    for _, body in answers:
        assert body["error"] == "sts_unavailable" and body["message"] == "the broker cannot reach AWS STS"
    assert [r["reason"] for r in read_records(tmp_path / "audit.jsonl")] == ["sts_unavailable"] * 4
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("kerb_jupyter.broker")]
    assert any("Timeout in request queue" in m for _, m in messages), messages  # the queue path was taken
    warnings = [m for level, m in messages if level >= logging.WARNING]
    assert len(warnings) == 1 and "AWS STS is unavailable" in warnings[0], warnings  # one line for the outage


class SwitchableStore(MemoryStore):
    """A memory store that can be switched off like an unreachable backend (Store is the broker's injection seam)."""

    down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("the store is down")

    async def first_use(self, key: str, ttl: float) -> bool:
        self._check()
        return await super().first_use(key, ttl)

    async def hit(self, key: str, limit: int, window: float) -> bool:
        self._check()
        return await super().hit(key, limit, window)

    async def get(self, key: str) -> str | None:
        self._check()
        return await super().get(key)

    async def put(self, key: str, value: str, ttl: float) -> None:
        self._check()
        await super().put(key, value, ttl)


def test_a_store_outage_fails_closed_with_503_and_is_logged_once(bsb: BrokerSandbox, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    store = SwitchableStore()
    broker = Broker(load_broker_settings(_variant(bsb, tmp_path)), store=store)
    c = creds(bsb)
    caplog.set_level(logging.INFO, logger="kerb_jupyter.broker")

    def logged() -> list[tuple[str, str]]:
        lines = [(r.levelname, r.getMessage()) for r in caplog.records
                 if r.name.startswith("kerb_jupyter.broker") and r.name != "kerb_jupyter.broker.groups"]
        caplog.clear()
        return lines

    store.down = True
    assert outcomes(bsb, broker, [(c, "127.0.0.1")] * 3) == ["503 store_unavailable"] * 3
    ((level, line),) = logged()  # one line for the outage, not one per request
    assert level == "WARNING" and "the shared store is unavailable" in line
    store.down = False
    assert outcomes(bsb, broker, [(c, "127.0.0.1")]) == ["issued"]
    ((level, line),) = logged()
    assert level == "INFO" and "answers again" in line and "3 request(s) were refused" in line
    store.down = True
    assert outcomes(bsb, broker, [(c, "127.0.0.1")] * 2) == ["503 store_unavailable"] * 2
    assert [level for level, _ in logged()] == ["WARNING"]  # a new outage, a new line
    reasons = [r["reason"] for r in read_records(tmp_path / "audit.jsonl")]
    assert reasons == ["store_unavailable"] * 3 + ["ok"] + ["store_unavailable"] * 2  # every request audited


def test_other_refusals_are_still_logged_one_by_one(bsb: BrokerSandbox, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    broker = Broker(load_broker_settings(_variant(bsb, tmp_path)))
    caplog.set_level(logging.INFO, logger="kerb_jupyter.broker")
    for n in range(2):
        with pytest.raises(Refused):
            asyncio.run(broker.handle(b"{not json", "127.0.0.1", f"bad-{n}"))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 2 and all("(malformed)" in line for line in lines)


def test_a_directory_outage_is_a_503_not_no_groups(bsb: BrokerSandbox, tmp_path: Path) -> None:
    from kerb_jupyter.sandbox.procs import free_port

    path = _variant(bsb, tmp_path, ldap={"url": f"ldaps://127.0.0.1:{free_port()}", "timeout": 1})
    broker = Broker(load_broker_settings(path))
    with pytest.raises(Refused) as err:
        asyncio.run(broker.handle(json.dumps(payload(bsb, creds(bsb))).encode(), "127.0.0.1", "no-ldap"))
    assert err.value.status == 503 and err.value.reason == "ldap_unavailable"
    record = read_records(tmp_path / "audit.jsonl")[0]
    assert record["reason"] == "ldap_unavailable" and record["caller_arn"].endswith("/alice")


@pytest.mark.parametrize(("limits", "expected"), [
    ({"per_arn": [2, 60]}, ["issued", "issued", "429 rate_limited_arn", "issued"]),
    ({"per_principal": [3, 60]}, ["issued", "issued", "issued", "429 rate_limited_principal"]),
])
def test_limits_per_caller_arn_and_per_principal(bsb: BrokerSandbox, tmp_path: Path, limits: dict[str, Any],
                                                 expected: list[str]) -> None:
    second = "AWSReservedSSO_DataScientists_second"
    if second not in {r["RoleName"] for r in bsb.sts.client("iam").list_roles()["Roles"]}:
        bsb.sts.create_role(second)
    one, two = creds(bsb), creds(bsb, "alice", second)  # two ARNs, one principal
    path = _variant(bsb, tmp_path, limits=limits)
    requests = [(c, "127.0.0.1") for c in (one, one, one, two)]
    assert outcomes(bsb, Broker(load_broker_settings(path)), requests) == expected


def test_the_audit_log_never_writes_through_a_symlink(tmp_path: Path) -> None:
    """A link planted at the audit log's path: refused at start-up (ConfigError naming it) and per record."""
    victim = tmp_path / "victim"
    victim.write_text("")
    planted = tmp_path / "planted.jsonl"
    planted.symlink_to(victim)
    with pytest.raises(ConfigError, match=r"planted\.jsonl: .*symbolic link"):
        AuditLog(planted)
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.record(request_id="r1", source="127.0.0.1", decision="refused", reason="replay")
    path.unlink()
    path.symlink_to(victim)
    with pytest.raises(OSError):
        audit.record(request_id="r2", source="127.0.0.1", decision="refused", reason="replay")
    assert victim.read_text() == ""


class TlsRecorder:
    """A real TLS listener (its own CA) that records every handshake and every byte of application data."""

    def __init__(self, root: Path) -> None:
        import socket
        import ssl
        import threading

        from kerb_jupyter.sandbox.ldap import make_tls

        root.mkdir(parents=True, exist_ok=True)
        self.ca, cert, key = make_tls(root, ("127.0.0.1",))
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.handshakes, self.failed, self.received = 0, 0, b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import ssl

        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            conn.settimeout(3)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    self.handshakes += 1
                    while chunk := tls.recv(4096):  # never answers: the client times out
                        self.received += chunk
            except (ssl.SSLError, OSError):
                self.failed += 1
            finally:
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def _ldap_refusal(bsb: BrokerSandbox, tmp_path: Path, request_id: str, **ldap: Any) -> Refused:
    path = _variant(bsb, tmp_path, ldap={"timeout": 1, **ldap})
    broker = Broker(load_broker_settings(path))
    with pytest.raises(Refused) as err:
        asyncio.run(broker.handle(json.dumps(payload(bsb, creds(bsb))).encode(), "127.0.0.1", request_id))
    return err.value


def test_ldaps_with_a_wrong_ca_never_sends_the_password(bsb: BrokerSandbox, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    password = bsb.realm.slapd.reader_password.encode()
    recorder = TlsRecorder(tmp_path / "impostor")
    try:
        url = f"ldaps://127.0.0.1:{recorder.port}"
        # The broker trusts the real directory's CA, not the impostor's: no handshake, nothing sent.
        err = _ldap_refusal(bsb, tmp_path, "wrong-ca", url=url, ca_bundle=str(bsb.realm.slapd.ca_cert))
        assert err.status == 503 and err.reason == "ldap_unavailable" and "CERTIFICATE_VERIFY_FAILED" in err.detail
        assert recorder.handshakes == 0 and recorder.failed >= 1 and recorder.received == b""
        # The same listener trusted (its CA given): the handshake completes and the bind, password included,
        # arrives - so an empty recording above means nothing was sent, not that the recorder missed it.
        _ldap_refusal(bsb, tmp_path / "trusting", "trusting", url=url, ca_bundle=str(recorder.ca))
        assert recorder.handshakes == 1 and password in recorder.received
    finally:
        recorder.close()
    record = read_records(tmp_path / "audit.jsonl")[0]
    assert record["request_id"] == "wrong-ca" and record["reason"] == "ldap_unavailable"
    assert record["caller_arn"].endswith("/alice")
    logged = bsb.audit_log.read_text() + (tmp_path / "audit.jsonl").read_text() + caplog.text
    assert password.decode() not in logged


def test_ldaps_checks_the_host_name_and_the_real_directory_with_a_wrong_ca(bsb: BrokerSandbox,
                                                                          tmp_path: Path) -> None:
    slapd = bsb.realm.slapd
    impostor_ca = TlsRecorder(tmp_path / "other-ca")
    impostor_ca.close()
    err = _ldap_refusal(bsb, tmp_path, "real-wrong-ca", url=slapd.ldaps_url, ca_bundle=str(impostor_ca.ca))
    assert err.reason == "ldap_unavailable" and "CERTIFICATE_VERIFY_FAILED" in err.detail
    err = _ldap_refusal(bsb, tmp_path / "name", "wrong-name", url=slapd.ldaps_url, ca_bundle=str(slapd.ca_cert),
                        server_name="dc1.elsewhere.test")  # the right CA, a certificate for another name
    assert err.reason == "ldap_unavailable" and "dc1.elsewhere.test" in err.detail
    path = _variant(bsb, tmp_path / "ok", ldap={"url": slapd.ldaps_url, "ca_bundle": str(slapd.ca_cert),
                                                 "server_name": "localhost"})
    assert outcomes(bsb, Broker(load_broker_settings(path)), [(creds(bsb), "127.0.0.1")]) == ["issued"]


def test_plain_ldap_needs_an_explicit_opt_in_and_is_logged(bsb: BrokerSandbox, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    plain = {"url": bsb.realm.slapd.url, "ca_bundle": None}
    with pytest.raises(ConfigError, match="plain LDAP: the bind password"):
        load_broker_settings(_variant(bsb, tmp_path, ldap=plain))
    path = _variant(bsb, tmp_path, ldap={**plain, "allow_plain_ldap": True})
    caplog.set_level(logging.WARNING, logger="kerb_jupyter.broker")
    broker = Broker(load_broker_settings(path))
    assert any("is plain LDAP (allow_plain_ldap)" in r.getMessage() for r in caplog.records)
    assert outcomes(bsb, broker, [(creds(bsb), "127.0.0.1")]) == ["issued"]


class ScriptedIssuer:
    """An Issuer stand-in (``Broker(issuer=...)`` is the injection seam): raises what it is given."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def issue(self, principal: str, clusters: dict[str, str], lifetime: int) -> Any:
        raise self.error


@pytest.mark.parametrize(("error", "reason"), [
    (TicketError("a clock skew", code="clock_skew"), "clock_skew"),
    (TicketError("the broker's TGT was refused", code="broker_ticket"), "broker_ticket"),
    (KdcUnreachableError("down"), "kdc_unreachable"),
    (CredentialsRejectedError("the broker's key"), "credentials_rejected"),
])
def test_kdc_outages_are_503_the_notebook_may_retry(bsb: BrokerSandbox, tmp_path: Path,
                                                    error: Exception, reason: str) -> None:
    issuer: Any = ScriptedIssuer(error)  # duck-typed Issuer
    broker = Broker(load_broker_settings(_variant(bsb, tmp_path)), issuer=issuer)
    assert outcomes(bsb, broker, [(creds(bsb), "127.0.0.1")]) == [f"503 {reason}"]
    assert read_records(tmp_path / "audit.jsonl")[0]["reason"] == reason
