"""The broker when STS, its store, the directory or the KDC fail: a 503 (never 500), audited, logged once."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from brokerservice import creds, outcomes, payload, variant

from kerb_jupyter.broker.app import Broker, Refused
from kerb_jupyter.broker.audit import read_records
from kerb_jupyter.broker.settings import load_broker_settings
from kerb_jupyter.broker.store import MemoryStore, StoreUnavailable
from kerb_jupyter.core.errors import CredentialsRejectedError, KdcUnreachableError, TicketError
from kerb_jupyter.sandbox.broker import BrokerSandbox

pytestmark = pytest.mark.usefixtures("bsb_krb5")  # the shared broker sandbox (conftest: bsb)


def test_a_silent_sts_times_out_into_a_503(bsb: BrokerSandbox, tmp_path: Path) -> None:
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers
    try:
        host = f"127.0.0.1:{bsb.sts.port}"  # what the notebook signs stays the same
        path = variant(bsb, tmp_path, sts={"endpoint": f"http://127.0.0.1:{silent.getsockname()[1]}/",
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
    path = variant(bsb, tmp_path, listen={"port": port},
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
    broker = Broker(load_broker_settings(variant(bsb, tmp_path)), store=store)
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
    broker = Broker(load_broker_settings(variant(bsb, tmp_path)))
    caplog.set_level(logging.INFO, logger="kerb_jupyter.broker")
    for n in range(2):
        with pytest.raises(Refused):
            asyncio.run(broker.handle(b"{not json", "127.0.0.1", f"bad-{n}"))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 2 and all("(malformed)" in line for line in lines)


def test_a_directory_outage_is_a_503_not_no_groups(bsb: BrokerSandbox, tmp_path: Path) -> None:
    from kerb_jupyter.sandbox.procs import free_port

    path = variant(bsb, tmp_path, ldap={"url": f"ldaps://127.0.0.1:{free_port()}", "timeout": 1})
    broker = Broker(load_broker_settings(path))
    with pytest.raises(Refused) as err:
        asyncio.run(broker.handle(json.dumps(payload(bsb, creds(bsb))).encode(), "127.0.0.1", "no-ldap"))
    assert err.value.status == 503 and err.value.reason == "ldap_unavailable"
    record = read_records(tmp_path / "audit.jsonl")[0]
    assert record["reason"] == "ldap_unavailable" and record["caller_arn"].endswith("/alice")


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
    broker = Broker(load_broker_settings(variant(bsb, tmp_path)), issuer=issuer)
    assert outcomes(bsb, broker, [(creds(bsb), "127.0.0.1")]) == [f"503 {reason}"]
    assert read_records(tmp_path / "audit.jsonl")[0]["reason"] == reason
