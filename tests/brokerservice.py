"""Broker-service test helpers: signed requests, POSTs to the running broker, audit records, config variants."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from botocore.credentials import Credentials

from kerb_jupyter.broker.app import Broker, Refused
from kerb_jupyter.broker.audit import read_records
from kerb_jupyter.core.signing import sign_request
from kerb_jupyter.sandbox.broker import AUDIENCE, BrokerSandbox
from kerb_jupyter.sandbox.sts import REGION, SSO_ROLE


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


def variant(bsb: BrokerSandbox, tmp_path: Path, **changes: Any) -> Path:
    """The broker's configuration with ``changes`` merged in and its own audit log, written under ``tmp_path``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    doc = json.loads(bsb.broker_config.read_text())
    doc["audit_log"] = str(tmp_path / "audit.jsonl")
    for key, value in changes.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "broker.json"
    path.write_text(json.dumps(doc))
    return path
