"""kerb-jupyter doctor with the broker source against a real broker, each fault injected for real."""

from __future__ import annotations

import json
import os

import pytest
from conftest import wait_for
from helpers import doctor, krb5_conf_copy, statuses

from kerb_jupyter.sandbox.broker import AUDIENCE
from kerb_jupyter.sandbox.procs import free_port
from kerb_jupyter.sandbox.sts import REGION
from kerb_jupyter.server.keeper import TicketKeeper


@pytest.fixture(scope="module")
def bsb(tmp_path_factory):
    from kerb_jupyter.sandbox.broker import BrokerSandbox

    sb = BrokerSandbox(tmp_path_factory.mktemp("doctor-broker"))
    sb.start()
    yield sb
    sb.stop()


def broker_keeper_step(bsb):
    """What the server's keeper does first with a broker source: ask the broker, fill the cache and state.json."""
    from kerb_jupyter.core.config import load_settings
    from kerb_jupyter.server.sources import build_source

    settings = load_settings(bsb.config_file)
    source = build_source(settings.source)
    keeper = TicketKeeper(None, source, settings.cache_path, settings.state_path,
                          resolve=source.resolver(settings.cache_path))
    keeper.step()
    return keeper


@pytest.fixture
def broker_notebook(bsb, tmp_path):
    os.environ.update(bsb.env)
    os.environ.pop("KRB5CCNAME", None)
    bsb.write_config(state_dir=str(tmp_path / "state"))
    keeper = broker_keeper_step(bsb)
    assert keeper.state.state == "valid", keeper.state
    return bsb


def test_a_working_broker_setup_is_green(broker_notebook):
    bsb = broker_notebook
    report = doctor()
    assert report.ok, repr(report)
    s = statuses(report)
    for name in ("config", "krb5_conf", "kdc", "identity", "source", "ticket", "keeper", "analytics.service_ticket",
                 "analytics.login", "finance.login"):
        assert s[name] == "ok", repr(report)
    assert "no principal needed: the broker says who the user is" in report.get("identity").detail
    assert bsb.principal in report.get("identity").detail
    ticket = report.get("ticket")
    assert "not renewable (by design" in ticket.detail and set(ticket.data["services"]) == {
        bsb.spn("analytics"), bsb.spn("finance")}
    assert f"broker {bsb.broker_url}: plain http (loopback only); /healthz ok" in report.get("source").detail
    assert report.get("finance.login").data["current_user"] == bsb.principal


def test_broker_down_is_red_with_the_cause(broker_notebook):
    bsb = broker_notebook
    bsb.stop_broker()
    try:
        report = doctor("analytics")
    finally:
        bsb.start_broker()
    source = report.get("source")
    assert source.status == "fail" and not report.ok
    assert f"broker {bsb.broker_url} cannot be reached: connection refused" in source.detail
    assert "start the broker" in source.fix
    assert report.get("analytics.login").status == "ok"  # the tickets it issued before still work


def test_broker_tls_checked_against_the_ca_bundle(broker_notebook, tmp_path):
    from test_broker_service import _self_signed

    bsb = broker_notebook
    (tmp_path / "good").mkdir()
    (tmp_path / "other").mkdir()
    cert, key = _self_signed(tmp_path / "good")
    other, _ = _self_signed(tmp_path / "other")  # a CA that did not sign the broker's certificate
    listen = {"address": "127.0.0.1", "port": bsb.broker_port}
    url = f"https://localhost:{bsb.broker_port}"
    source = {"type": "broker", "url": url, "audience": AUDIENCE, "region": REGION, "sts_url": bsb.sts.url + "/"}
    bsb.stop_broker()
    bsb.write_broker_config(listen={**listen, "tls_cert": str(cert), "tls_key": str(key)})
    try:
        bsb.start_broker()
        bsb.write_config(state_dir=str(tmp_path / "state"), source={**source, "ca_bundle": str(cert)})
        assert broker_keeper_step(bsb).state.state == "valid"  # the notebook's own request went over TLS
        good = doctor("analytics")
        assert good.ok, repr(good)
        assert good.get("source").detail.startswith(f"broker {url}: TLS verified (TLSv1.")
        assert "certificate for localhost" in good.get("source").detail
        bsb.write_config(state_dir=str(tmp_path / "state"), source={**source, "ca_bundle": str(other)})
        bad = doctor("analytics")
        bsb.write_config(state_dir=str(tmp_path / "state"), source=source)  # no ca_bundle: the system store
        system = doctor("analytics")
    finally:
        bsb.stop_broker()
        bsb.write_broker_config()
        bsb.start_broker()
    check = bad.get("source")
    assert check.status == "fail" and not bad.ok and check.data["tls"] == "untrusted"
    assert f"its TLS certificate is not trusted by ca_bundle {other}: " in check.detail
    assert "certificate" in check.detail.rsplit(": ", 1)[1]  # OpenSSL's own words, e.g. "self-signed certificate"
    assert "set source.ca_bundle to the CA that signed" in check.fix
    assert "not trusted by the system CA store (no ca_bundle set)" in system.get("source").detail


def test_a_cluster_the_broker_did_not_grant_is_named(broker_notebook):
    bsb = broker_notebook
    original = bsb.broker_config.read_text()
    doc = json.loads(original)
    doc["policy"]["rules"][0]["groups"] = {bsb.realm.group_dn("analysts"): ["analytics"]}
    bsb.broker_config.write_text(json.dumps(doc))
    bsb.reload_broker()  # SIGHUP: the new policy, no restart
    try:
        wait_for(lambda: set(broker_keeper_step(bsb).state.granted or ()) == {bsb.spn("analytics")},
                 timeout=10)
        report = doctor()
    finally:
        bsb.broker_config.write_text(original)
        bsb.reload_broker()
    check = report.get("finance.service_ticket")
    assert check.status == "fail" and check.data["code"] == "not_granted" and not report.ok
    assert check.detail.startswith("the broker did not grant a ticket for cluster 'finance' (postgres/127.0.0.1)")
    assert "GSS" not in check.detail and "finance.login" not in statuses(report)
    assert "grant this cluster to" in check.fix
    assert report.get("analytics.login").status == "ok" and report.get("ticket").status == "ok"


def test_a_cluster_the_kdc_refused_is_named_with_the_brokers_reason(broker_notebook):
    bsb = broker_notebook
    bsb.realm.set_delegation("broker/localhost", [bsb.spn("analytics")])  # krbAllowedToDelegateTo: analytics only
    try:
        keeper = broker_keeper_step(bsb)
        report = doctor()
    finally:
        bsb.realm.set_delegation("broker/localhost", [bsb.spn(n) for n in bsb.servers])
    refusal = keeper.state.refused["finance"]
    check = report.get("finance.service_ticket")
    assert check.status == "fail" and check.data["code"] == "cluster_refused" and not report.ok
    assert check.detail == (f"the broker refused cluster 'finance' (postgres/127.0.0.1): {refusal['message']} "
                            f"({refusal['reason']})")
    assert "msDS-AllowedToDelegateTo" in check.fix
    assert report.get("keeper").status == "warn" and "the broker refused finance: " in report.get("keeper").detail
    assert report.get("analytics.login").status == "ok"


def test_a_broker_notebook_need_not_reach_the_kdc(broker_notebook, tmp_path):
    bsb = broker_notebook
    dead = free_port()
    krb5_conf_copy(bsb, tmp_path, lambda t: t.replace(f"127.0.0.1:{bsb.realm.port}", f"127.0.0.1:{dead}"))
    report = doctor()
    kdc = report.get("kdc")
    assert kdc.status == "warn" and "connection refused" in kdc.detail and "only the broker needs the KDC" in kdc.detail
    assert report.ok, repr(report)  # the service tickets it holds are all libpq needs
    assert report.get("analytics.login").status == "ok" and report.get("finance.login").status == "ok"


def test_an_unhealthy_broker_is_red_with_what_its_healthz_says(broker_notebook, tmp_path):
    from kerb_jupyter.sandbox.redis_server import RedisServer

    bsb = broker_notebook
    redis = RedisServer(tmp_path / "redis").start()
    bsb.stop_broker()
    bsb.write_broker_config(store=redis.url)  # replay and rate state in Redis, as several instances share it
    try:
        bsb.start_broker()
        assert doctor("analytics").get("source").status == "ok"
        redis.stop()  # the broker is up, its store is not: it refuses every request
        report = doctor("analytics")
    finally:
        redis.stop()
        bsb.stop_broker()
        bsb.write_broker_config()
        bsb.start_broker()
    check = report.get("source")
    assert check.status == "fail" and check.data["health"] == 503 and not report.ok
    assert f"broker {bsb.broker_url}: /healthz answers 503 (store_unavailable)" in check.detail
    assert "Redis" in check.fix


def test_a_refused_policy_reload_is_a_warning_with_the_brokers_reason(broker_notebook):
    bsb = broker_notebook
    original = bsb.broker_config.read_text()
    doc = json.loads(original)
    doc["policy"]["rules"][0]["mapping"] = {"rules": [{"regex": "(unclosed", "template": "{name}@KERB.TEST"}]}
    bsb.broker_config.write_text(json.dumps(doc))
    bsb.reload_broker()
    try:
        wait_for(lambda: doctor("analytics").get("source").status == "warn", timeout=10)
        check = doctor("analytics").get("source")
    finally:
        bsb.broker_config.write_text(original)
        bsb.reload_broker()
    assert "its last policy reload FAILED, the old policy is in force: the new policy was refused" in check.detail
    assert "SIGHUP" in check.fix
