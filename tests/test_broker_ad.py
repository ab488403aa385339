"""The real broker process against a real Active Directory (Samba 4.17 AD DC): LDAPS verified with the DC's CA,
nested and primary groups, UPNs that are not the IdP's names, each KDC refusal named, and a partial grant."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from botocore.credentials import Credentials

from kerb_jupyter.broker.audit import read_records
from kerb_jupyter.broker.groups import GroupDirectory, parse_ldap
from kerb_jupyter.broker.issue import Issuer
from kerb_jupyter.broker.store import MemoryStore
from kerb_jupyter.core.signing import sign_request
from kerb_jupyter.sandbox import write_json
from kerb_jupyter.sandbox.ad import ADSandbox
from kerb_jupyter.sandbox.ldap import make_tls
from kerb_jupyter.sandbox.procs import free_port, start_daemon, stop_process
from kerb_jupyter.sandbox.samba import SambaAD
from kerb_jupyter.sandbox.sts import ACCOUNT, REGION, SSO_ROLE, MotoSts

AUDIENCE = "kerb-jupyter-broker.ad.sandbox"
DIRECT_ROLE = "AWSReservedSSO_Direct_0123456789abcdef"  # a rule granting "analytics" without group conditions
UPN_SUFFIX = "corp.example.com"  # carol's UPN suffix; the IdP (AWS session names) uses example.com


@dataclass
class ADBroker:
    ad: SambaAD
    sts: MotoSts
    root: Path
    url: str
    audit_log: Path
    proc: subprocess.Popen[bytes]


def ldap_section(ad: SambaAD, **overrides: Any) -> dict[str, Any]:
    return {"url": ad.ldaps_url, "ca_bundle": str(ad.ca_cert), "base": ad.base_dn,
            "bind_dn": ad.user_dn(ad.plan.ldap_reader), "password_file": str(ad.password_file(ad.plan.ldap_reader)),
            # the IdP's local part is either the sAMAccountName or the UPN's, whose suffix is not the IdP's domain
            "filter": f"(&(objectClass=user)(|(sAMAccountName={{user}})(userPrincipalName={{user}}@{UPN_SUFFIX})))",
            "timeout": 2, **overrides}


def broker_config(ad: SambaAD, sts: MotoSts, port: int, audit_log: Path, **ldap: Any) -> dict[str, Any]:
    mapping = {"rules": [{"template": "{local}@" + ad.realm, "domain": ad.plan.idp_domain}]}
    rule = {"account": ACCOUNT, "identity_from": "session", "mapping": mapping, "source_cidrs": ["127.0.0.0/8"]}
    return {
        "listen": {"address": "127.0.0.1", "port": port},
        "audience": AUDIENCE,
        "sts": {"endpoint": sts.url + "/", "region": REGION, "timeout": 5},
        "kerberos": {"principal": ad.principal(ad.plan.broker), "keytab": str(ad.keytab(ad.plan.broker)),
                     "max_lifetime": 3600},
        "clusters": {c: ad.spn(c) for c in ad.plan.clusters},
        "ldap": ldap_section(ad, **ldap),
        "audit_log": str(audit_log),
        "policy": {"rules": [
            {**rule, "name": "analysts", "role": "AWSReservedSSO_DataScientists_*",
             "groups": {ad.group_dn("Analysts"): list(ad.plan.clusters)}},
            {**rule, "name": "direct", "role": "AWSReservedSSO_Direct_*", "clusters": ["analytics"]},
        ]},
    }


def start_broker(ad: SambaAD, sts: MotoSts, root: Path, **ldap: Any) -> ADBroker:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    audit = root / "audit.jsonl"
    config = write_json(root / "broker.json", broker_config(ad, sts, port, audit, **ldap))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KRB5CCNAME", "KERB_JUPYTER"))}
    env["KRB5_CONFIG"] = str(ad.krb5_conf)
    cmd = [sys.executable, "-c", "import sys; from kerb_jupyter.cli import main; sys.exit(main())",
           "broker", "--config", str(config)]
    proc = start_daemon("the broker", cmd, port, root / "broker.log", timeout=30, env=env)
    return ADBroker(ad, sts, root, f"http://127.0.0.1:{port}", audit, proc)


@pytest.fixture(scope="module")
def adb(ad_sandbox: ADSandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ADBroker]:
    root = tmp_path_factory.mktemp("broker-ad")
    sts = MotoSts(root / "moto")
    sts.start(roles=(SSO_ROLE, DIRECT_ROLE))
    broker = None
    try:
        broker = start_broker(ad_sandbox.ad, sts, root / "broker")
        yield broker
    finally:
        stop_process(broker.proc if broker else None)
        sts.stop()


@pytest.fixture(autouse=True)
def _krb5(ad_sandbox: ADSandbox) -> None:
    os.environ["KRB5_CONFIG"] = str(ad_sandbox.ad.krb5_conf)


def ask(adb: ADBroker, session: str, role: str = SSO_ROLE, url: str | None = None) -> tuple[int, dict[str, Any]]:
    """One signed request as the AWS role session ``session`` (an IdP e-mail address)."""
    c = adb.sts.session(role, session)
    creds = Credentials(c["aws_access_key_id"], c["aws_secret_access_key"], c["aws_session_token"])
    data = json.dumps(sign_request(creds, REGION, adb.sts.url + "/", AUDIENCE)).encode()
    req = urllib.request.Request((url or adb.url) + "/v1/credentials", data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def audited(path: Path, request_id: str) -> dict[str, Any]:
    (record,) = [r for r in read_records(path) if r["request_id"] == request_id]
    return record


def test_a_partial_grant_through_nested_groups(adb: ADBroker) -> None:
    """alice is in Analysts only through DataSci; the broker may delegate to two of the three clusters."""
    ad = adb.ad
    code, body = ask(adb, f"alice@{ad.plan.idp_domain}")
    assert code == 200, body
    assert body["principal"] == ad.principal("alice")
    assert sorted(body["clusters"]) == sorted(ad.plan.delegated) == ["analytics", "finance"]
    assert list(body["refused"]) == ["orders"] and body["refused"]["orders"]["reason"] == "service_not_allowed"
    spn = ad.spn("orders")
    assert f"not allowed to delegate to {spn}: add {spn} to the broker account's delegation list" in \
        body["refused"]["orders"]["message"]
    record = audited(adb.audit_log, body["request_id"])
    assert record["decision"] == "issued" and record["reason"] == "partial"
    assert record["clusters"] == ["analytics", "finance"] and record["refused"]["orders"]["reason"] == \
        "service_not_allowed"


@pytest.mark.parametrize(("user", "reason", "names"), [
    ("sensitive", "user_not_delegable", "the user sensitive@AD.KERB.TEST cannot be delegated"),
    ("disabled", "account_disabled", "the account disabled@AD.KERB.TEST is disabled, locked or expired"),
])
def test_each_user_refusal_is_named(adb: ADBroker, user: str, reason: str, names: str) -> None:
    code, body = ask(adb, f"{user}@{adb.ad.plan.idp_domain}")
    assert code == 403, body
    assert set(body) == {"error", "request_id", "refused"} and body["error"] == "forbidden"
    assert set(body["refused"]) == set(adb.ad.plan.clusters)
    for refusal in body["refused"].values():
        assert refusal["reason"] == reason and refusal["message"].startswith(names), refusal
    record = audited(adb.audit_log, body["request_id"])
    assert record["decision"] == "refused" and record["reason"] == reason


def test_an_unknown_user_is_named(adb: ADBroker) -> None:
    code, body = ask(adb, f"mallory@{adb.ad.plan.idp_domain}", role=DIRECT_ROLE)
    assert code == 403, body
    assert body["refused"]["analytics"]["reason"] == "unknown_principal"
    assert "the directory has no user mallory@AD.KERB.TEST" in body["refused"]["analytics"]["message"]


def test_a_upn_that_is_not_the_idp_name(adb: ADBroker) -> None:
    """carol signs in as carol.smith@example.com; AD knows her as carol (sAMAccountName), carol.smith@corp.example.com
    (UPN): the filter finds her by UPN and the broker acts for her sAMAccountName."""
    code, body = ask(adb, f"carol.smith@{adb.ad.plan.idp_domain}")
    assert code == 200, body
    assert body["principal"] == adb.ad.principal("carol")
    assert sorted(body["clusters"]) == ["analytics", "finance"]
    record = audited(adb.audit_log, body["request_id"])
    assert record["principal"] == "carol@AD.KERB.TEST"


def directory(ad: SambaAD, **overrides: Any) -> GroupDirectory:
    settings = parse_ldap(ldap_section(ad, **overrides))
    assert settings is not None
    return GroupDirectory(settings, MemoryStore())


def test_nested_and_primary_groups_from_token_groups(ad_sandbox: ADSandbox) -> None:
    ad = ad_sandbox.ad
    found = asyncio.run(directory(ad).lookup("alice@AD.KERB.TEST"))
    groups = {g.lower() for g in found.groups}
    for name in ("DataSci", "Analysts", "AllStaff", "Domain Users"):  # Domain Users: alice's primaryGroupID (513)
        assert ad.group_dn(name).lower() in groups, (name, sorted(groups))
    assert found.principal == "alice@AD.KERB.TEST"
    memberof = asyncio.run(directory(ad, membership="memberof").lookup("alice@AD.KERB.TEST"))
    assert {g.lower() for g in memberof.groups} == {ad.group_dn("DataSci").lower()}  # direct groups only


def test_ldaps_with_the_wrong_ca_is_refused(adb: ADBroker, tmp_path: Path) -> None:
    other_ca, _, _ = make_tls(tmp_path, ("127.0.0.1",))
    broker = start_broker(adb.ad, adb.sts, tmp_path / "wrong-ca", ca_bundle=str(other_ca))
    try:
        code, body = ask(adb, f"alice@{adb.ad.plan.idp_domain}", url=broker.url)
    finally:
        stop_process(broker.proc)
    assert code == 503 and body["error"] == "ldap_unavailable", body
    record = audited(broker.audit_log, body["request_id"])
    assert record["reason"] == "ldap_unavailable"
    log = (broker.root / "broker.log").read_text()
    assert "CERTIFICATE_VERIFY_FAILED" in log
    assert adb.ad.password(adb.ad.plan.ldap_reader) not in log + broker.audit_log.read_text()


def test_a_broker_not_trusted_for_protocol_transition(ad_sandbox: ADSandbox, tmp_path: Path) -> None:
    ad = ad_sandbox.ad
    name = "kjuntrusted"
    if name not in ad.samba_tool("user", "list"):
        ad.add_user(name)
        ad.add_spn(name, f"HTTP/{name}.{ad.dns_domain}")
        ad.samba_tool("delegation", "add-service", name, ad.spn("analytics").split("@")[0])  # no for-any-protocol
    keytab = ad.export_keytab(ad.principal(name), tmp_path / "untrusted.keytab")
    issued = Issuer(ad.principal(name), keytab).issue("alice", {"analytics": ad.spn("analytics")}, 600)
    assert issued.clusters == {}
    refusal = issued.refused["analytics"]
    assert refusal.reason == "broker_not_trusted", refusal
    assert refusal.message.startswith(f"the broker account {ad.principal(name)} is not trusted for protocol "
                                      "transition")
    # it never had a forwardable evidence ticket for anyone, so it cannot rule the user out: the message says so
    assert "or the user alice@AD.KERB.TEST cannot be delegated (the KDC does not say which)" in refusal.message
