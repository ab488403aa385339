"""Broker policy: deny by default, the trust model enforced at load, conditions, groups, settings, reload."""

from __future__ import annotations

import asyncio
import calendar
import json
import time
from pathlib import Path
from typing import Any

import pytest

from kerb_jupyter.broker.auth import parse_arn
from kerb_jupyter.broker.groups import Membership
from kerb_jupyter.broker.policy import Decision, Denied, Policy, parse_policy
from kerb_jupyter.broker.settings import PolicyHolder, load_broker_settings, parse_broker_settings
from kerb_jupyter.core.errors import ConfigError

CLUSTERS = {"analytics": "postgres/db1.kerb.test@KERB.TEST", "finance": "postgres/db2.kerb.test@KERB.TEST"}
SSO = "arn:aws:sts::123456789012:assumed-role/AWSReservedSSO_DataScientists_0a1b/alice"
MAP = {"rules": [{"template": "{name}@KERB.TEST"}]}
GROUP = "cn=Analysts,ou=Groups,dc=kerb,dc=test"


def rule(**kw: Any) -> dict[str, Any]:
    base = {"name": "sso", "account": "123456789012", "role": "AWSReservedSSO_DataScientists_*",
            "identity_from": "session", "mapping": MAP, "clusters": ["analytics"]}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def policy(*rules: dict[str, Any]) -> Policy:
    return parse_policy({"rules": list(rules)}, CLUSTERS, 3600)


def decide(p: Policy, arn: str = SSO, source: str = "10.1.2.3", groups: frozenset[str] | None = None,
           now: float | None = None) -> Decision:
    async def lookup(principal: str) -> Membership:
        assert principal == "alice@KERB.TEST"
        return Membership(groups or frozenset())

    return asyncio.run(p.decide(parse_arn(arn), source, lookup if groups is not None else None, now))


def denied(p: Policy, **kw: Any) -> str:
    with pytest.raises(Denied) as err:
        decide(p, **kw)
    return err.value.code


def test_a_matching_rule_grants_its_clusters() -> None:
    d = decide(policy(rule(max_lifetime=600)))
    assert d == Decision("sso", "alice@KERB.TEST", {"analytics": CLUSTERS["analytics"]}, 600)


def test_deny_by_default() -> None:
    p = policy(rule())
    assert denied(p, arn="arn:aws:sts::123456789012:assumed-role/Other/alice") == "no_rule"
    assert denied(p, arn="arn:aws:sts::999999999999:assumed-role/AWSReservedSSO_DataScientists_0a1b/alice") == \
        "no_rule"
    assert denied(p, arn="arn:aws:iam::123456789012:user/alice") == "no_rule"
    assert denied(policy()) == "no_rule"


def test_a_caller_mapped_to_nobody_is_refused() -> None:
    p = policy(rule(mapping={"rules": [{"table": {"bob": "bob@KERB.TEST"}}]}))
    assert denied(p) == "unmapped"


def test_source_ranges() -> None:
    p = policy(rule(source_cidrs=["10.0.0.0/8", "192.168.1.0/24"]))
    assert decide(p, source="10.9.9.9").principal == "alice@KERB.TEST"
    assert decide(p, source="::ffff:192.168.1.7").principal == "alice@KERB.TEST"
    assert denied(p, source="172.16.0.1") == "source_address"
    assert denied(p, source="not-an-address") == "source_address"


def test_time_windows_in_utc() -> None:
    monday_noon = calendar.timegm((2026, 11, 30, 12, 0, 0, 0, 0, 0))
    p = policy(rule(hours=[{"days": "mon-fri", "from": "07:00", "to": "19:00"}]))
    assert decide(p, now=monday_noon).principal
    assert denied(p, now=monday_noon + 8 * 3600) == "time_window"
    assert denied(p, now=monday_noon - 2 * 86400) == "time_window"  # Saturday
    night = policy(rule(hours=[{"days": "fri", "from": "22:00", "to": "02:00"}]))
    friday_late = monday_noon + 4 * 86400 + 11 * 3600
    assert decide(night, now=friday_late).principal
    assert decide(night, now=friday_late + 2 * 3600).principal  # Saturday 01:00 belongs to Friday's window
    assert denied(night, now=friday_late + 5 * 3600) == "time_window"


def test_groups_grant_clusters_case_insensitively() -> None:
    p = policy(rule(clusters=[], groups={GROUP: ["analytics", "finance"], "cn=Ops,dc=kerb,dc=test": ["finance"]}))
    d = decide(p, groups=frozenset({GROUP.upper()}))
    assert d.clusters == CLUSTERS
    assert denied(p, groups=frozenset({"cn=Other,dc=kerb,dc=test"})) == "no_group"
    assert denied(p) == "no_group"  # no directory configured


def test_role_unique_id_binds_the_rule() -> None:
    p = policy(rule(role_id="AROAEXAMPLE"))
    caller = parse_arn(SSO, "AROAEXAMPLE:alice")
    assert asyncio.run(p.decide(caller, "10.0.0.1")).principal == "alice@KERB.TEST"
    recreated = parse_arn(SSO, "AROAOTHER:alice")
    with pytest.raises(Denied):
        asyncio.run(p.decide(recreated, "10.0.0.1"))


@pytest.mark.parametrize(("bad", "why"), [
    (rule(role="*"), "chosen by whoever calls AssumeRole"),
    (rule(role="SageMakerExecution"), "chosen by whoever calls AssumeRole"),
    (rule(account="*"), "not one fixed account"),
    (rule(account="1234567890??", identity_from="role", role="analyst-*"), "not one fixed account"),
])
def test_the_trust_model_refuses_caller_chosen_identities(bad: dict[str, Any], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        policy(bad)
    marked = policy({**bad, "trust_caller_chosen": True})  # explicitly marked: accepted
    assert marked.rules[0].trust_caller_chosen


def test_an_enforced_role_name_needs_no_mark() -> None:
    p = policy(rule(role="analyst-*", identity_from="role", mapping={"rules": [
        {"regex": "^analyst-(?P<u>[a-z]+)$", "principal": "{u}@KERB.TEST"}]}))
    d = decide(p, arn="arn:aws:sts::123456789012:assumed-role/analyst-alice/SageMaker")
    assert d.principal == "alice@KERB.TEST"


@pytest.mark.parametrize(("bad", "match"), [
    ({"rules": "x"}, "rules"), ({"rules": [rule(clusters=["nope"])]}, "unknown cluster"),
    ({"rules": [rule(colour="red")]}, "unknown key"), ({"rules": [rule(identity_from="arn")]}, "identity_from"),
    ({"rules": [rule(source_cidrs=["10.0.0.0/33"])]}, "source_cidrs"),
    ({"rules": [rule(hours=[{"days": "someday", "from": "07:00", "to": "08:00"}])]}, "days"),
    ({"rules": [rule(hours=[{"from": "7", "to": "08:00"}])]}, "HH:MM"),
    ({"rules": [rule(), rule()]}, "unique"), ({"rules": [rule(max_lifetime=5)]}, "max_lifetime"),
    ({"rules": [rule(mapping="x")]}, "mapping"),
])
def test_bad_policies_name_the_fault(bad: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_policy(bad, CLUSTERS, 3600)


STS = {"endpoint": "http://127.0.0.1:1/", "region": "us-east-1"}


def settings_doc(tmp_path: Path, **kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "audience": "broker.test", "sts": {"endpoint": "http://127.0.0.1:1/", "region": "us-east-1"},
        "kerberos": {"principal": "broker/host@KERB.TEST", "keytab": str(tmp_path / "k.keytab")},
        "clusters": CLUSTERS, "policy": {"rules": [rule()]},
    }
    doc.update(kw)
    return doc


def test_settings_require_tls_off_loopback(tmp_path: Path) -> None:
    s = parse_broker_settings(settings_doc(tmp_path))
    assert s.sts_host == "127.0.0.1:1" and s.address == "127.0.0.1" and s.limits.max_body == 16384
    assert (s.sts_timeout, s.sts_max_clients) == (5.0, 100)
    s = parse_broker_settings(settings_doc(tmp_path, sts={**STS, "timeout": 2.5, "max_clients": 400}))
    assert (s.sts_timeout, s.sts_max_clients) == (2.5, 400)
    with pytest.raises(ConfigError, match="TLS is required"):
        parse_broker_settings(settings_doc(tmp_path, listen={"address": "0.0.0.0"}))  # noqa: S104
    for bad, match in (({"audience": ""}, "audience"), ({"clusters": {"a": "postgres"}}, "service principal"),
                       ({"limits": {"per_arn": [0, 1]}}, "per_arn"), ({"extra": 1}, "unknown key"),
                       ({"sts": {"endpoint": "sts.amazonaws.com"}}, "sts.endpoint"),
                       ({"sts": {"endpoint": "http://127.0.0.1:1/"}}, "sts.region is required"),
                       ({"sts": {**STS, "region": "Europe"}}, "sts.region"),
                       ({"sts": {**STS, "max_clients": 0}}, "sts.max_clients"),
                       ({"sts": {**STS, "max_clients": "many"}}, "sts.max_clients"),
                       ({"sts": {**STS, "timeout": "5"}}, "sts.timeout"),
                       ({"sts": {**STS, "timeout": 0}}, "sts.timeout")):
        with pytest.raises(ConfigError, match=match):
            parse_broker_settings(settings_doc(tmp_path, **bad))


def test_reload_keeps_the_good_policy_on_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "broker.json"
    path.write_text(json.dumps(settings_doc(tmp_path)))
    holder = PolicyHolder(load_broker_settings(path))
    first = holder.policy
    path.write_text(json.dumps(settings_doc(tmp_path, policy={"rules": [rule(role="*")]})))
    assert holder.reload() is False and holder.policy is first
    assert holder.last_error and "caller" in holder.last_error
    path.write_text("{not json")
    assert holder.reload() is False and holder.policy is first
    path.write_text(json.dumps(settings_doc(tmp_path, policy={"rules": [rule(clusters=["finance"])]})))
    assert holder.reload() is True and holder.last_error is None
    assert decide(holder.policy).clusters == {"finance": CLUSTERS["finance"]}
    assert time.time()  # the holder never raises on reload


@pytest.mark.parametrize(("endpoint", "region"), [
    ("https://sts.eu-west-1.amazonaws.com/", "eu-west-1"), ("https://sts.amazonaws.com/", "us-east-1"),
    ("https://sts-fips.us-gov-west-1.amazonaws.com/", "us-gov-west-1"),
    ("https://vpce-0a1b-c2d3.sts.ap-southeast-2.vpce.amazonaws.com/", "ap-southeast-2"),
])
def test_the_sts_region_comes_from_its_host(tmp_path: Path, endpoint: str, region: str) -> None:
    assert parse_broker_settings(settings_doc(tmp_path, sts={"endpoint": endpoint})).sts_region == region


BAD_MAPPINGS = [
    ({"rules": [{"regex": "(unclosed", "principal": "{name}@KERB.TEST"}]}, "does not compile"),
    ({"rules": [{"template": "{nickname}@KERB.TEST"}]}, "nickname"),
    ({"rules": [{"case": "lower"}]}, "none of 'table', 'regex', 'template'"),
    ({"rules": [{"table": {"alice": 7}}]}, "table must be an object of identity -> principal"),
]


@pytest.mark.parametrize(("mapping", "match"), BAD_MAPPINGS)
def test_bad_mapping_rules_are_refused_at_load_and_on_reload(tmp_path: Path, mapping: dict[str, Any],
                                                             match: str) -> None:
    with pytest.raises(ConfigError, match=r"policy rule 1 \(sso\)") as err:
        parse_policy({"rules": [rule(mapping=mapping)]}, CLUSTERS, 3600)
    assert match in str(err.value)
    path = tmp_path / "broker.json"
    path.write_text(json.dumps(settings_doc(tmp_path)))
    holder = PolicyHolder(load_broker_settings(path))
    path.write_text(json.dumps(settings_doc(tmp_path, policy={"rules": [rule(mapping=mapping)]})))
    assert holder.reload() is False and match in str(holder.last_error)
    assert decide(holder.policy).principal == "alice@KERB.TEST"  # the previous policy still decides


def test_the_directory_may_rename_the_principal() -> None:
    """A UPN-form name found in the directory: the broker acts for the entry's own name (its sAMAccountName)."""
    p = policy(rule(clusters=[], groups={GROUP: ["analytics"]}))

    async def lookup(principal: str) -> Membership:
        assert principal == "alice@KERB.TEST"  # what the mapping made of the session name
        return Membership(frozenset({GROUP}), "asmith@KERB.TEST")

    d = asyncio.run(p.decide(parse_arn(SSO), "10.1.2.3", lookup))
    assert d.principal == "asmith@KERB.TEST" and d.clusters == {"analytics": CLUSTERS["analytics"]}
    plain = policy(rule())  # no group conditions: the directory is asked only when told to rename
    assert asyncio.run(plain.decide(parse_arn(SSO), "10.1.2.3", lookup)).principal == "alice@KERB.TEST"
    assert asyncio.run(plain.decide(parse_arn(SSO), "10.1.2.3", lookup, rename=True)).principal == "asmith@KERB.TEST"
