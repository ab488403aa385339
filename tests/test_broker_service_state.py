"""The broker's input and state: replays, health and metrics, 413, another region, a restart, SIGHUP reload."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from brokerservice import audited, creds, payload, post, refused

from kerb_jupyter.core.signing import sign_request
from kerb_jupyter.sandbox.broker import AUDIENCE, BrokerSandbox

pytestmark = pytest.mark.usefixtures("bsb_krb5")  # the shared broker sandbox (conftest: bsb)


def test_a_replayed_request(bsb: BrokerSandbox) -> None:
    p = payload(bsb, creds(bsb))
    assert post(bsb, p)[0] == 200
    refused(bsb, p, 401, "replay")


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
