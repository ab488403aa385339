"""The broker's own checks of a signed sts:GetCallerIdentity, and STS (moto, SigV4 verification on) as the judge.

moto does not verify signatures by default: the fixture switches verification on, and every check that moto
never makes (date, replay, audience, host, action, nonce) is tested against the broker's own code.
"""

from __future__ import annotations

import base64
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from kerb_jupyter.broker.auth import AuthError, check_request, parse_arn, parse_caller, parse_payload
from kerb_jupyter.core.signing import AUDIENCE_HEADER, NONCE_HEADER, sign_request
from kerb_jupyter.sandbox.sts import REGION, SSO_ROLE, MotoSts

AUD = "kerb-jupyter-broker.test"


@pytest.fixture(scope="module")
def sts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoSts]:
    server = MotoSts(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def alice(sts: MotoSts) -> Credentials:
    c = sts.session(SSO_ROLE, "alice")
    return Credentials(c["aws_access_key_id"], c["aws_secret_access_key"], c["aws_session_token"])


def host(sts: MotoSts) -> str:
    return f"127.0.0.1:{sts.port}"


def forward(sts: MotoSts, payload: dict[str, object]) -> tuple[int, bytes]:
    """What the broker does after its checks: the same signed bytes to STS."""
    headers = payload["headers"]
    assert isinstance(headers, dict)
    req = urllib.request.Request(sts.url + "/", data=base64.b64decode(str(payload["body"])), method="POST",
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def signed(creds: Credentials, body: str, headers: dict[str, str], url: str) -> dict[str, object]:
    req = AWSRequest(method="POST", url=url, data=body.encode(), headers=headers)
    SigV4Auth(creds, "sts", REGION).add_auth(req)
    return {"headers": dict(req.prepare().headers), "body": base64.b64encode(body.encode()).decode()}


def test_a_good_request_passes_and_sts_names_the_caller(sts: MotoSts, alice: Credentials) -> None:
    payload = sign_request(alice, REGION, sts.url + "/", AUD)
    req = check_request(parse_payload(payload), audience=AUD, sts_host=host(sts))
    assert len(req.signature) == 64
    caller = parse_caller(*forward(sts, payload))
    assert caller.kind == "assumed-role" and caller.role == SSO_ROLE and caller.session == "alice"
    assert caller.account == "123456789012" and caller.user_id.startswith("AROA")


def test_two_requests_in_the_same_second_differ(alice: Credentials, sts: MotoSts) -> None:
    a, b = (sign_request(alice, REGION, sts.url + "/", AUD) for _ in range(2))
    assert a["headers"][NONCE_HEADER] != b["headers"][NONCE_HEADER]  # type: ignore[index]
    ra = check_request(parse_payload(a), audience=AUD, sts_host=host(sts))
    rb = check_request(parse_payload(b), audience=AUD, sts_host=host(sts))
    assert ra.signature != rb.signature


def test_a_tampered_request_is_refused_by_sts(sts: MotoSts, alice: Credentials) -> None:
    payload = sign_request(alice, REGION, sts.url + "/", AUD)
    headers = dict(payload["headers"])  # type: ignore[call-overload]
    headers[NONCE_HEADER] = "x" * 32  # still passes the broker's own checks: only STS can tell
    payload["headers"] = headers
    check_request(parse_payload(payload), audience=AUD, sts_host=host(sts))
    with pytest.raises(AuthError) as err:
        parse_caller(*forward(sts, payload))
    assert err.value.code == "sts_refused" and "SignatureDoesNotMatch" in str(err.value)


def test_made_up_keys_are_refused_by_sts(sts: MotoSts) -> None:
    payload = sign_request(Credentials("AKIAIOSFODNN7EXAMPLE", "made-up"), REGION, sts.url + "/", AUD)
    with pytest.raises(AuthError, match="InvalidClientTokenId") as err:
        parse_caller(*forward(sts, payload))
    assert err.value.code == "sts_refused"


def _code(payload: dict[str, object], sts: MotoSts, **kw: object) -> str:
    with pytest.raises(AuthError) as err:
        check_request(parse_payload(payload), audience=str(kw.get("audience", AUD)),
                      sts_host=str(kw.get("sts_host", host(sts))), now=kw.get("now"))  # type: ignore[arg-type]
    return err.value.code


def test_wrong_audience_host_and_date(sts: MotoSts, alice: Credentials) -> None:
    payload = sign_request(alice, REGION, sts.url + "/", "some-other-service")
    assert _code(payload, sts) == "wrong_audience"
    payload = sign_request(alice, REGION, "https://sts.amazonaws.com/", AUD)
    assert _code(payload, sts) == "wrong_host"
    payload = sign_request(alice, REGION, sts.url + "/", AUD)
    import time

    assert _code(payload, sts, now=time.time() + 301) == "expired"
    assert _code(payload, sts, now=time.time() - 301) == "expired"  # signed "in the future"
    check_request(parse_payload(payload), audience=AUD, sts_host=host(sts), now=time.time() + 250)


def test_wrong_action_is_refused(sts: MotoSts, alice: Credentials) -> None:
    headers = {"Host": host(sts), AUDIENCE_HEADER: AUD, NONCE_HEADER: "n" * 20,
               "Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    payload = signed(alice, "Action=GetSessionToken&Version=2011-06-15", headers, sts.url + "/")
    assert _code(payload, sts) == "wrong_action"
    payload = signed(alice, "Action=GetCallerIdentity&Version=2011-06-15&Extra=1", headers, sts.url + "/")
    assert _code(payload, sts) == "wrong_action"
    payload = signed(alice, "Action=GetCallerIdentity&Action=GetSessionToken&Version=2011-06-15", headers,
                     sts.url + "/")
    assert _code(payload, sts) == "wrong_action"
    payload = signed(alice, "Version=2011-06-15&Action=GetCallerIdentity", headers, sts.url + "/")
    check_request(parse_payload(payload), audience=AUD, sts_host=host(sts))  # order does not matter


def test_audience_and_nonce_must_be_signed(sts: MotoSts, alice: Credentials) -> None:
    base = {"Host": host(sts), NONCE_HEADER: "n" * 20, "Content-Type": "application/x-www-form-urlencoded"}
    payload = signed(alice, "Action=GetCallerIdentity&Version=2011-06-15", base, sts.url + "/")
    payload["headers"][AUDIENCE_HEADER] = AUD  # type: ignore[index]  # added after signing
    assert _code(payload, sts) == "unsigned_header"


def test_unexpected_and_malformed_input(sts: MotoSts, alice: Credentials) -> None:
    payload = sign_request(alice, REGION, sts.url + "/", AUD)
    payload["headers"]["X-Forwarded-For"] = "10.0.0.1"  # type: ignore[index]
    assert _code(payload, sts) == "bad_header"
    for bad in ({}, {"headers": [], "body": ""}, {"headers": {}, "body": "not base64!"},
                {"headers": {"a": 1}, "body": ""}, {"headers": {"a": "x", "A": "y"}, "body": ""}):
        with pytest.raises(AuthError) as err:
            parse_payload(bad)
        assert err.value.code == "malformed"
    payload = sign_request(alice, REGION, sts.url + "/", AUD)
    payload["headers"]["Authorization"] = "Bearer abc"  # type: ignore[index]
    assert _code(payload, sts) == "malformed"


@pytest.mark.parametrize(("arn", "kind", "role", "session"), [
    ("arn:aws:sts::123456789012:assumed-role/AWSReservedSSO_X_1/alice", "assumed-role", "AWSReservedSSO_X_1",
     "alice"),
    ("arn:aws:iam::123456789012:user/ops/bob", "user", "", "bob"),
])
def test_parse_arn(arn: str, kind: str, role: str, session: str) -> None:
    caller = parse_arn(arn)
    assert (caller.kind, caller.role, caller.session) == (kind, role, session)


@pytest.mark.parametrize("arn", [
    "arn:aws:sts::123456789012:federated-user/bob", "arn:aws:iam::123456789012:root", "not an arn",
    "arn:aws:sts::12345:assumed-role/r/s",
])
def test_parse_arn_refuses_other_callers(arn: str) -> None:
    with pytest.raises(AuthError):
        parse_arn(arn)


def test_sts_error_bodies(tmp_path: Path) -> None:
    with pytest.raises(AuthError, match="HTTP 500"):
        parse_caller(500, b"<not xml")
    with pytest.raises(AuthError) as err:
        parse_caller(200, b"<not xml")
    assert err.value.code == "sts_error"
