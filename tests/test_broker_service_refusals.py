"""The broker's refusals and limits: unmapped callers, bad signatures, foreign addresses, rate limits, the cap."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from brokerservice import audited, creds, outcomes, payload, refused, variant

from kerb_jupyter.broker.app import Broker, Refused
from kerb_jupyter.broker.audit import read_records
from kerb_jupyter.broker.settings import load_broker_settings
from kerb_jupyter.core.signing import AUDIENCE_HEADER, NONCE_HEADER
from kerb_jupyter.sandbox.broker import AUDIENCE, BrokerSandbox
from kerb_jupyter.sandbox.sts import REGION

pytestmark = pytest.mark.usefixtures("bsb_krb5")  # the shared broker sandbox (conftest: bsb)


def test_a_caller_mapped_to_nobody(bsb: BrokerSandbox) -> None:
    bsb.sts.create_role("AWSReservedSSO_Contractors_99")
    r = refused(bsb, payload(bsb, creds(bsb, "alice", "AWSReservedSSO_Contractors_99")), 403, "no_rule")
    assert r["caller_arn"].endswith("/AWSReservedSSO_Contractors_99/alice") and r["principal"] is None
    refused(bsb, payload(bsb, creds(bsb, "carol,x")), 403, "unmapped")


def test_a_group_that_grants_nothing(bsb: BrokerSandbox) -> None:
    r = refused(bsb, payload(bsb, creds(bsb, "bob")), 403, "no_group")
    assert r["caller_arn"].endswith("/bob")


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
    path = variant(bsb, tmp_path, limits=limits)
    requests = [(c, "127.0.0.1") for c in (one, one, one, two)]
    assert outcomes(bsb, Broker(load_broker_settings(path)), requests) == expected
