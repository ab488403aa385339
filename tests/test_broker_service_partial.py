"""The broker's partial grants: the clusters it may delegate to are issued, the others named with the reason."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from brokerservice import creds, payload, variant

from kerb_jupyter.broker.app import Broker
from kerb_jupyter.broker.audit import read_records
from kerb_jupyter.broker.settings import load_broker_settings
from kerb_jupyter.sandbox.broker import BrokerSandbox

pytestmark = pytest.mark.usefixtures("bsb_krb5")  # the shared broker sandbox (conftest: bsb)


def _with_other(bsb: BrokerSandbox, tmp_path: Path, *granted: str) -> Path:
    """A variant whose policy grants ``granted`` (default: all three), "other" being outside the delegation list."""
    clusters = {**json.loads(bsb.broker_config.read_text())["clusters"], "other": bsb.realm.principal("postgres/other")}
    rule = {**json.loads(bsb.broker_config.read_text())["policy"]["rules"][0],
            "groups": {bsb.realm.group_dn("analysts"): list(granted or clusters)}}
    return variant(bsb, tmp_path, clusters=clusters, policy={"rules": [rule]})


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
