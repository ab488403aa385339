"""Caller authentication: a SigV4-signed sts:GetCallerIdentity request, checked here, then verified by STS.

The notebook signs the request with its own AWS credentials (``core.signing.sign_request``) and sends its parts as JSON.
The broker never uses a URL, host or name the caller sends: it checks the action, the signed audience and
nonce headers, the date (at most ``max_age`` seconds off) and refuses a replayed signature, then forwards the
same signed bytes to its *own* configured STS endpoint and believes only the ARN STS returns (Vault's scheme,
stricter: Vault checks neither the date nor replays).
"""

from __future__ import annotations

import base64
import binascii
import calendar
import re
import secrets
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from ..core.errors import KerbJupyterError
from ..core.signing import AUDIENCE_HEADER, NONCE_HEADER, STS_BODY

MAX_AGE = 300.0
# Headers a botocore-signed GetCallerIdentity carries; anything else is refused (as Vault does).
ALLOWED_HEADERS = {
    "authorization", "content-type", "content-length", "host", "user-agent", "x-amz-date",
    "x-amz-security-token", "x-amz-content-sha256", AUDIENCE_HEADER, NONCE_HEADER,
}
REQUIRED_SIGNED = {"host", "x-amz-date", AUDIENCE_HEADER, NONCE_HEADER}
_AUTH = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<akid>[A-Z0-9]{16,128})/(?P<date>\d{8})/(?P<region>[a-z0-9-]{1,32})/"
    r"(?P<service>[a-z0-9-]{1,32})/aws4_request, ?SignedHeaders=(?P<signed>[a-z0-9;-]{1,512}), ?"
    r"Signature=(?P<sig>[0-9a-f]{64})$"
)
_NONCE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_ARN = re.compile(r"^arn:aws[a-z-]*:(?P<svc>sts|iam)::(?P<account>\d{12}):(?P<resource>[\x21-\x7e]{1,1024})$")
_NS = "{https://sts.amazonaws.com/doc/2011-06-15/}"


class AuthError(KerbJupyterError):
    """The caller's proof of identity is refused; ``code`` is the audited reason, never sent to the caller."""

    code = "unauthenticated"


@dataclass(frozen=True)
class SignedRequest:
    """The parts of the caller's signed request: headers (lower-case names) and the body."""

    headers: dict[str, str]
    body: str
    signature: str = ""


@dataclass(frozen=True)
class Caller:
    """Who STS says the caller is: ``kind`` is ``assumed-role`` or ``user``."""

    arn: str
    account: str
    kind: str
    role: str
    session: str
    user_id: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"arn": self.arn, "account": self.account, "kind": self.kind, "role": self.role,
                "session": self.session}


def parse_payload(doc: Any, max_bytes: int = 8192) -> SignedRequest:
    """The JSON body the notebook sent -> SignedRequest. Raises AuthError("malformed")."""
    if not isinstance(doc, dict) or not isinstance(doc.get("headers"), dict) or not isinstance(doc.get("body"), str):
        raise AuthError("the request must be a JSON object with 'headers' and 'body'", code="malformed")
    try:
        body = base64.b64decode(doc["body"], validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError):
        raise AuthError("'body' must be base64 of an ASCII form body", code="malformed") from None
    headers: dict[str, str] = {}
    for name, value in doc["headers"].items():
        if not isinstance(name, str) or not isinstance(value, str) or len(value) > max_bytes:
            raise AuthError("header names and values must be strings", code="malformed")
        if not (name + value).isascii() or not (name + value).isprintable():
            raise AuthError("header names and values must be printable ASCII", code="malformed")
        if name.lower() in headers:
            raise AuthError(f"header {name[:40]!r} appears twice", code="malformed")
        headers[name.lower()] = value
    return SignedRequest(headers=headers, body=body)


def check_request(req: SignedRequest, *, audience: str, sts_host: str, now: float | None = None,
                  max_age: float = MAX_AGE, region: str | None = None,
                  not_before: float | None = None) -> SignedRequest:
    """Everything the broker checks before STS sees the request. Raises AuthError with the reason as code.

    ``region``: the credential scope's region must be this one. ``not_before``: requests signed earlier are
    refused (``signed_before_start``: a broker without a shared store cannot know what it saw before it started).

    Returns the request with its signature set (the replay key).
    """
    unexpected = sorted(set(req.headers) - ALLOWED_HEADERS)
    if unexpected:
        raise AuthError(f"unexpected header(s) {', '.join(h[:40] for h in unexpected[:5])}", code="bad_header")
    if sorted(parse_qsl(req.body, keep_blank_values=True)) != sorted(parse_qsl(STS_BODY)) or len(req.body) > 200:
        raise AuthError(f"the signed request is not sts:GetCallerIdentity ({req.body[:60]!r})", code="wrong_action")
    m = _AUTH.match(req.headers.get("authorization", ""))
    if not m:
        raise AuthError("no AWS4-HMAC-SHA256 Authorization header", code="malformed")
    if m["service"] != "sts":
        raise AuthError(f"signed for service {m['service']!r}, not sts", code="wrong_action")
    if region is not None and m["region"] != region:
        raise AuthError(f"signed for region {m['region']!r}, not {region}", code="wrong_region")
    signed = set(m["signed"].split(";"))
    missing = sorted(REQUIRED_SIGNED - signed)
    if missing:
        raise AuthError(f"header(s) {', '.join(missing)} are not among the signed headers", code="unsigned_header")
    if "x-amz-security-token" in req.headers and "x-amz-security-token" not in signed:
        raise AuthError("the session token is not signed", code="unsigned_header")
    if not secrets.compare_digest(req.headers.get(AUDIENCE_HEADER, "").encode(), audience.encode()):
        raise AuthError(f"signed for audience {req.headers.get(AUDIENCE_HEADER, '')[:80]!r}", code="wrong_audience")
    if req.headers.get("host", "").lower() != sts_host.lower():
        raise AuthError(f"signed for host {req.headers.get('host', '')[:80]!r}, not {sts_host}", code="wrong_host")
    if not _NONCE.match(req.headers.get(NONCE_HEADER, "")):
        raise AuthError("the nonce header must be 16-128 URL-safe characters", code="malformed")
    signed_at = parse_amz_date(req.headers.get("x-amz-date", ""))
    age = (time.time() if now is None else now) - signed_at
    if abs(age) > max_age:
        raise AuthError(f"signed {age:.0f} s ago (at most {max_age:.0f} s either way)", code="expired")
    if m["date"] != req.headers["x-amz-date"][:8]:
        raise AuthError("the credential scope's date is not the signing date", code="malformed")
    if not_before is not None and signed_at < not_before:
        raise AuthError(f"signed {not_before - signed_at:.0f} s before the broker started", code="signed_before_start")
    return SignedRequest(headers=req.headers, body=req.body, signature=m["sig"])


def parse_amz_date(text: str) -> float:
    """``YYYYMMDDTHHMMSSZ`` -> Unix seconds. Raises AuthError."""
    try:
        return float(calendar.timegm(time.strptime(text, "%Y%m%dT%H%M%SZ")))
    except ValueError:
        raise AuthError(f"X-Amz-Date {text[:40]!r} is not a SigV4 date", code="malformed") from None


def parse_caller(status: int, xml_body: bytes) -> Caller:
    """STS's answer -> Caller. Raises AuthError("sts_refused") for an error answer or an unexpected ARN."""
    if status != 200:
        code = "?"
        try:
            root = ET.fromstring(xml_body)  # noqa: S314 - our own STS endpoint
            code = next((e.text or "?" for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Code"), "?")
        except ET.ParseError:
            pass
        raise AuthError(f"STS refused the signed request: HTTP {status} {code[:60]}", code="sts_refused")
    try:
        root = ET.fromstring(xml_body)  # noqa: S314 - our own STS endpoint
    except ET.ParseError:
        raise AuthError("STS answered with something that is not XML", code="sts_error") from None
    arn = (root.findtext(f".//{_NS}Arn") or "").strip()
    user_id = (root.findtext(f".//{_NS}UserId") or "").strip()
    return parse_arn(arn, user_id)


def parse_arn(arn: str, user_id: str = "") -> Caller:
    """An STS or IAM ARN -> Caller (assumed-role sessions and IAM users only). Raises AuthError."""
    m = _ARN.match(arn)
    if not m:
        raise AuthError(f"STS returned an ARN of an unexpected form: {arn[:120]!r}", code="sts_error")
    parts = m["resource"].split("/")
    if m["svc"] == "sts" and parts[0] == "assumed-role" and len(parts) == 3:
        return Caller(arn, m["account"], "assumed-role", parts[1], parts[2], user_id)
    if m["svc"] == "iam" and parts[0] == "user" and len(parts) >= 2:
        return Caller(arn, m["account"], "user", "", parts[-1], user_id)
    raise AuthError(f"callers must be role sessions or IAM users, not {arn[:120]!r}", code="unsupported_caller")


