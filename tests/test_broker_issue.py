"""Issuing on a real LDAP-backed MIT realm: what the handed-out cache holds, what it never holds, each refusal."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import krb5
import pytest

from kerb_jupyter import tickets
from kerb_jupyter.broker.issue import DelegationRefused, Issuer, rewrite_creds, spn_key
from kerb_jupyter.errors import CredentialsRejectedError, IdentityError, KdcUnreachableError, TicketError
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
    keytab = root / "broker.keytab"
    r.add_delegating_service("broker/localhost", list(SPNS.values()), keytab=keytab)
    r.add_principal("HTTP/plain.localhost", keytab=root / "plain.keytab")  # no delegation rights at all
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


def test_delegation_to_a_service_not_allowed_is_refused(issuer: Issuer) -> None:
    with pytest.raises(DelegationRefused) as err:
        issuer.issue("alice@KERB.TEST", {**SPNS, "other": "postgres/other@KERB.TEST"}, 600)
    assert err.value.code == "delegation_not_allowed"
    assert "broker/localhost@KERB.TEST is not allowed to delegate to postgres/other@KERB.TEST" in str(err.value)


def test_a_service_without_delegation_rights_cannot_act_for_users(realm: tuple[LdapRealm, Path],
                                                                 issuer: Issuer) -> None:
    plain = Issuer("HTTP/plain.localhost@KERB.TEST", realm[1].parent / "plain.keytab")
    with pytest.raises(DelegationRefused) as err:
        plain.issue("alice@KERB.TEST", {"analytics": SPNS["analytics"]}, 600)
    # MIT grants a non-forwardable S4U2Self ticket, then refuses S4U2Proxy; AD may refuse the first step
    assert err.value.code in ("delegation_not_allowed", "impersonation_not_allowed")
    assert "HTTP/plain.localhost@KERB.TEST" in str(err.value)


def test_an_unknown_user_or_service_is_named(issuer: Issuer) -> None:
    with pytest.raises(IdentityError, match=r"mallory@KERB\.TEST: the directory has no such user") as err:
        issuer.issue("mallory", SPNS, 600)
    assert err.value.code == "unknown_principal"
    with pytest.raises(TicketError, match=r"does not know the service principal postgres/nonesuch@KERB\.TEST") as e:
        issuer.issue("alice", {"x": "postgres/nonesuch"}, 600)
    assert e.value.code == "service_unknown"


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
