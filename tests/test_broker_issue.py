"""Issuing on a real LDAP-backed MIT realm: what the handed-out cache holds, what it never holds, each refusal
reason per cluster (partial grants), and the KDC error table: every code a refusal or an outage on purpose."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import krb5
import pytest

from kerb_jupyter.broker.ccache import rewrite_creds
from kerb_jupyter.broker.issue import Issuer, spn_key
from kerb_jupyter.broker.kdcerrors import KDC_ERRORS, OUTAGES, kdc_error
from kerb_jupyter.core import tickets
from kerb_jupyter.core.errors import CredentialsRejectedError, IdentityError, KdcUnreachableError, TicketError
from kerb_jupyter.sandbox.ldap import LdapRealm
from kerb_jupyter.sandbox.realm import Realm

SPNS = {"analytics": "postgres/localhost@KERB.TEST", "finance": "postgres/127.0.0.1@KERB.TEST"}


@pytest.fixture(scope="module")
def realm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LdapRealm, Path]]:
    root = tmp_path_factory.mktemp("issue")
    r = LdapRealm(root / "realm", "KERB.TEST", max_life=3600)
    r.create()
    for spn in (*SPNS.values(), "postgres/other@KERB.TEST"):
        r.add_principal(spn)
    r.add_user("alice")
    for user in ("carol", "sensitive", "disabled", "expired"):
        r.add_user(user)
    r.modify_principal("sensitive@KERB.TEST", "-allow_forwardable")  # MIT's NOT_DELEGATED
    r.modify_principal("disabled@KERB.TEST", "-allow_tix")
    r.kadmin("modprinc -expire 2020-01-01 expired@KERB.TEST")
    keytab = root / "broker.keytab"
    r.add_delegating_service("broker/localhost", list(SPNS.values()), keytab=keytab)
    r.add_principal("HTTP/plain.localhost", keytab=root / "plain.keytab")  # no delegation rights at all
    r.add_principal("broker/untrusted", keytab=root / "untrusted.keytab")  # a delegation list, no protocol transition
    r.set_delegation("broker/untrusted@KERB.TEST", list(SPNS.values()))
    r.start()
    yield r, keytab
    r.stop()


@pytest.fixture
def issuer(realm: tuple[LdapRealm, Path]) -> Issuer:
    os.environ["KRB5_CONFIG"] = str(realm[0].krb5_conf)
    return Issuer("broker/localhost@KERB.TEST", realm[1])


def entries(data: bytes, tmp_path: Path) -> list[krb5.Creds]:
    path = tmp_path / "cc"
    path.write_bytes(data)
    path.chmod(0o600)
    ctx = krb5.init_context()
    return list(krb5.cc_resolve(ctx, f"FILE:{path}".encode()))


def test_the_cache_holds_only_capped_service_tickets(issuer: Issuer, tmp_path: Path) -> None:
    before = time.time()
    issued = issuer.issue("alice@KERB.TEST", SPNS, 600)
    assert issued.principal == "alice@KERB.TEST" and set(issued.clusters) == set(SPNS)
    assert set(issued.timings) == {"s4u2self", "proxy:analytics", "proxy:finance"}
    creds = entries(issued.cache, tmp_path)
    assert sorted(c.server.name.decode() for c in creds) == sorted(SPNS.values())  # full realm, no TGT
    for c in creds:
        assert c.client.name == b"alice@KERB.TEST"
        assert not c.second_ticket  # the evidence ticket is stripped
        assert not c.ticket_flags & krb5.TicketFlags.renewable  # cannot be renewed past the cap
        assert c.times.endtime - before <= 600 + 5
    info = tickets.read_cache(tmp_path / "cc")
    assert info.principal == "alice@KERB.TEST" and not info.renewable
    assert b"broker/localhost" not in issued.cache and b"krbtgt" not in issued.cache


def test_the_broker_tgt_cap_holds_for_longer_requests(issuer: Issuer, tmp_path: Path) -> None:
    issued = issuer.issue("alice@KERB.TEST", {"analytics": SPNS["analytics"]}, 100 * 3600)
    (c,) = entries(issued.cache, tmp_path)
    assert c.times.endtime - time.time() <= 3600  # never past the realm's maximum, never renewable
    assert not c.ticket_flags & krb5.TicketFlags.renewable


def test_names_without_a_realm_get_the_brokers(issuer: Issuer, tmp_path: Path) -> None:
    issued = issuer.issue("alice", {"analytics": "postgres/localhost"}, 600)
    assert issued.principal == "alice@KERB.TEST"
    (c,) = entries(issued.cache, tmp_path)
    assert c.server.name == b"postgres/localhost@KERB.TEST"


def test_a_service_not_in_the_delegation_list_is_refused_and_the_others_issued(issuer: Issuer,
                                                                               tmp_path: Path) -> None:
    issued = issuer.issue("alice@KERB.TEST", {**SPNS, "other": "postgres/other@KERB.TEST"}, 600)
    assert sorted(issued.clusters) == ["analytics", "finance"]  # issued independently of the refusal
    assert sorted(c.server.name.decode() for c in entries(issued.cache, tmp_path)) == sorted(SPNS.values())
    (refusal,) = issued.refused.values()
    assert issued.refused.keys() == {"other"} and refusal.reason == "service_not_allowed"
    assert refusal.message.startswith("the broker broker/localhost@KERB.TEST is not allowed to delegate to "
                                      "postgres/other@KERB.TEST: add postgres/other@KERB.TEST to the broker account's "
                                      "delegation list")


@pytest.mark.parametrize(("user", "reason", "names"), [
    ("sensitive", "user_not_delegable", "the user sensitive@KERB.TEST cannot be delegated"),
    ("disabled", "account_disabled", "the account disabled@KERB.TEST is disabled, locked or expired"),
    ("expired", "account_disabled", "the account expired@KERB.TEST is disabled, locked or expired"),
    ("mallory", "unknown_principal", "the directory has no user mallory@KERB.TEST"),
])
def test_each_user_refusal_names_the_user(issuer: Issuer, user: str, reason: str, names: str) -> None:
    issuer.issue("alice", SPNS, 600)  # on MIT the broker tells a sensitive user from itself by a delegable user
    issued = issuer.issue(user, SPNS, 600)
    assert issued.clusters == {} and issued.refused.keys() == SPNS.keys()
    for refusal in issued.refused.values():
        assert refusal.reason == reason and refusal.message.startswith(names), refusal
        assert "\n" not in refusal.message


def test_a_broker_not_trusted_for_protocol_transition_is_named(realm: tuple[LdapRealm, Path],
                                                               issuer: Issuer) -> None:
    keytab = realm[1].parent / "untrusted.keytab"
    for first in (None, "carol@KERB.TEST"):  # a fresh broker cannot tell itself from the user on MIT: names both
        untrusted = Issuer("broker/untrusted@KERB.TEST", keytab)
        untrusted._delegable = first  # as if carol had been issued before the broker's trust was removed
        issued = untrusted.issue("alice@KERB.TEST", SPNS, 600)
        assert issued.clusters == {}
        for refusal in issued.refused.values():
            assert refusal.reason == "broker_not_trusted"
            assert refusal.message.startswith("the broker account broker/untrusted@KERB.TEST is not trusted for "
                                              "protocol transition")
            assert ("or the user alice@KERB.TEST cannot be delegated" in refusal.message) == (first is None)
    # MIT makes S4U2Self tickets forwardable for a service with no delegation list at all (as for RBCD): the
    # refusal is then at S4U2Proxy, rightly named as the missing delegation list entry
    plain = Issuer("HTTP/plain.localhost@KERB.TEST", realm[1].parent / "plain.keytab")
    assert {r.reason for r in plain.issue("alice", SPNS, 600).refused.values()} == {"service_not_allowed"}


def test_an_unknown_service_is_named(issuer: Issuer) -> None:
    issued = issuer.issue("alice", {**SPNS, "x": "postgres/nonesuch"}, 600)
    assert sorted(issued.clusters) == ["analytics", "finance"]
    assert issued.refused["x"].reason == "service_unknown"
    assert "does not know the service principal postgres/nonesuch@KERB.TEST" in issued.refused["x"].message


REFUSALS = {"user_not_delegable", "account_disabled", "service_not_allowed", "broker_not_trusted",
            "unknown_principal", "service_unknown", "kdc_refused"}
BASE = -1765328384  # ERROR_TABLE_BASE_krb5


def test_every_kdc_error_code_is_a_refusal_or_an_outage_on_purpose() -> None:
    listed = set(KDC_ERRORS)
    assert listed == set(range(1, 30)) | set(range(31, 43)) | set(range(44, 53)) | set(range(60, 82)) | \
        set(range(90, 94))  # RFC 4120 7.5.9 (30 and 43 are unassigned), RFC 4556, RFC 6113
    for code in range(128):
        for at_self in (True, False):
            name, reason = kdc_error(BASE + code, at_self)
            assert reason in REFUSALS | OUTAGES | {"delegation"}, (code, name, reason)


@pytest.mark.parametrize(("code", "at_self", "expected"), [
    # permanent refusals
    (18, True, "account_disabled"), (1, True, "account_disabled"), (6, True, "unknown_principal"),
    (7, True, "unknown_principal"), (7, False, "service_unknown"), (12, True, "account_disabled"),
    (13, True, "broker_not_trusted"), (60, False, "kdc_refused"),
    # told apart by the evidence ticket
    (13, False, "delegation"), (12, False, "delegation"),
    # outages: the notebook retries
    (29, False, "kdc_unreachable"), (37, True, "clock_skew"), (32, True, "broker_ticket"),
    (24, True, "credentials_rejected"),
    # unknown codes: a permanent refusal, never a 503 retried forever
    (30, False, "kdc_refused"), (127, True, "kdc_refused"),
])
def test_kdc_error_classes(code: int, at_self: bool, expected: str) -> None:
    assert kdc_error(BASE + code, at_self)[1] == expected


def test_library_errors() -> None:
    assert kdc_error(-1765328228, False) == ("KRB5_KDC_UNREACH", "kdc_unreachable")
    assert kdc_error(-1765328163, False) == ("KRB5_TKT_NOT_FORWARDABLE", "delegation")
    assert kdc_error(-1765328163, True)[1] == "broker_not_trusted"
    assert kdc_error(BASE + 500, False) == ("krb5 error -1765327884", "kdc_refused")  # unknown: not retried
    assert kdc_error(12345, False) == ("krb5 error 12345", "kdc_refused")  # not a krb5 code at all


@pytest.mark.parametrize(("user", "spns", "lifetime"), [
    ("broker/localhost", SPNS, 600), ("krbtgt/KERB.TEST", SPNS, 600), ("alice", {}, 600), ("alice", SPNS, 0),
    ("", SPNS, 600), ("alice@", SPNS, 600), ("al ice", SPNS, 600), ("alice", {"x": "a@b@c"}, 60),
])
def test_bad_requests_are_refused_before_the_kdc(issuer: Issuer, user: str, spns: dict[str, str],
                                                 lifetime: int) -> None:
    with pytest.raises((IdentityError, TicketError)) as err:
        issuer.issue(user, spns, lifetime)
    assert err.value.code == "invalid_request"


def test_a_keytab_that_is_missing(realm: tuple[LdapRealm, Path], issuer: Issuer, tmp_path: Path) -> None:
    with pytest.raises(CredentialsRejectedError, match=r"nope\.keytab"):
        Issuer("broker/localhost@KERB.TEST", tmp_path / "nope.keytab").issue("alice@KERB.TEST", SPNS, 600)


def test_the_kdc_down(issuer: Issuer, realm: tuple[LdapRealm, Path]) -> None:
    issuer.issue("alice@KERB.TEST", SPNS, 600)  # the broker's own TGT is now cached
    Realm.stop(realm[0])
    try:
        with pytest.raises(KdcUnreachableError, match="cannot reach the KDC"):
            issuer.issue("alice@KERB.TEST", SPNS, 600)
        with pytest.raises(KdcUnreachableError, match="cannot reach the KDC"):
            Issuer("broker/localhost@KERB.TEST", realm[1]).issue("alice@KERB.TEST", SPNS, 600)  # no TGT yet
    finally:
        Realm.start(realm[0])


def test_spn_keys_and_a_truncated_credential() -> None:
    assert spn_key("postgres/DB.example@") == spn_key("postgres/db.example@EXAMPLE") == "postgres/db.example"
    with pytest.raises(TicketError, match="could not be decoded"):
        rewrite_creds(b"\x00\x00\x00\x01", "postgres/x@R")
