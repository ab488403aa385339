"""The ``broker`` credential source: the notebook proves its AWS identity to the broker and gets service tickets.

    "source": {"type": "broker", "url": "https://broker.corp.example.com:8443", "audience": "kerb-jupyter-broker",
               "region": "eu-west-1", "ca_bundle": "/etc/pki/broker-ca.pem"}

No secret of the user exists on the notebook: the request is signed with the notebook's own AWS credentials
(the role it already has), and the answer is a cache holding service tickets only (no TGT), which the keeper
stores atomically in the shared cache and fetches again before the first ticket expires.

The broker issues each cluster on its own: a 200 lists the clusters granted and those the KDC refused, each with
a reason code and a one-line message (``refused``); a 403 that lists refusals means none was granted. The refusals
are kept on the source (the keeper copies them into its state), so the status page, ``%kerbstatus``, the doctor and
``%%kerbsql`` on a refused cluster name the broker's reason instead of "not granted".
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..core import files, tickets
from ..core.errors import (
    ConfigError,
    CredentialsRejectedError,
    IdentityError,
    KdcUnreachableError,
    KerbJupyterError,
    SourceError,
)
from ..core.grants import describe_refused, parse_refused
from ..core.tickets import TicketInfo

MAX_ANSWER = 1 << 20
MAX_REFUSAL = 1 << 16  # a 403 listing every cluster refused, each with a one-line message
_KEYS = {"type", "url", "audience", "region", "ca_bundle", "sts_url", "timeout"}


@dataclass
class BrokerSource:
    url: str
    audience: str
    region: str
    ca_bundle: str | None = None
    sts_url: str | None = None
    timeout: float = 15.0
    credentials: Callable[[], Any] | None = None  # botocore credentials provider; default: boto3's chain
    kind: str = "broker"
    can_acquire: bool = True
    granted: dict[str, dict[str, Any]] = field(default_factory=dict)
    refused: dict[str, dict[str, str]] = field(default_factory=dict)  # cluster -> {"reason", "message"}
    caller_arn: str | None = None

    def describe(self) -> str:
        return f"broker {self.url}"

    def acquire(self, principal: str | None, cache: Path, lifetime: int | None, renew_life: int | None) -> TicketInfo:
        """Ask the broker; store its cache atomically at ``cache``. Raises CredentialsRejectedError (the caller
        refused), SourceError coded ``clusters_refused`` (every cluster refused by the KDC: retried, an administrator
        can fix it), KdcUnreachableError (broker, STS or KDC unreachable: retry), SourceError, CacheError."""
        answer = self._ask()
        got = str(answer.get("principal", ""))
        if principal is not None and got.lower() != principal.lower():
            raise SourceError(f"the broker issued tickets for {got}, not for {principal}", code="wrong_principal")
        try:
            data = base64.b64decode(str(answer.get("cache", "")), validate=True)
        except (binascii.Error, ValueError):
            raise SourceError("the broker's answer holds no readable cache", code="bad_answer") from None
        store_cache(data, cache)
        granted = answer.get("clusters")
        self.granted = granted if isinstance(granted, dict) else {}
        self.refused = parse_refused(answer.get("refused"))
        return tickets.read_cache(cache, allow_expired=True)

    def resolver(self, cache: Path) -> Callable[[], tuple[dict[str, Any], str]]:
        """For a keeper without a configured principal: the broker says who the user is (and fills the cache)."""

        def resolve() -> tuple[dict[str, Any], str]:
            try:
                info = self.acquire(None, cache, None, None)
            except CredentialsRejectedError as err:
                raise IdentityError(str(err), code=err.code) from None
            except KerbJupyterError as err:
                # The keeper retries identity errors coded aws_unreachable; every other one waits for the user.
                raise IdentityError(str(err), code="aws_unreachable") from None
            detail = f"clusters {', '.join(sorted(self.granted))}"
            if self.refused:
                detail += f"; refused {', '.join(sorted(self.refused))}"
            identity = {"name": self.caller_arn or info.principal, "source": "broker", "trusted": True,
                        "arn": self.caller_arn, "detail": detail}
            return identity, info.principal

        return resolve

    def _ask(self) -> dict[str, Any]:
        from ..core.signing import sign_request

        creds = (self.credentials or _default_credentials(self.region))()
        if creds is None:
            raise SourceError("no AWS credentials on this notebook to sign the broker request",
                              code="no_aws_credentials")
        sts_url = self.sts_url or f"https://sts.{self.region}.amazonaws.com/"
        payload = json.dumps(sign_request(creds, self.region, sts_url, self.audience)).encode()
        req = urllib.request.Request(self.url.rstrip("/") + "/v1/credentials", data=payload, method="POST",  # noqa: S310
                                     headers={"Content-Type": "application/json"})
        ctx = ssl.create_default_context(cafile=self.ca_bundle) if self.url.startswith("https:") else None
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=ctx) as resp:  # noqa: S310 - checked
                body = resp.read(MAX_ANSWER)
        except urllib.error.HTTPError as err:
            doc = _json_object(err.read(MAX_REFUSAL))
            refused = parse_refused(doc.get("refused")) if err.code == 403 else {}
            if refused:  # the caller was accepted, but the KDC refused every cluster: say which and why
                self.granted, self.refused = {}, refused
                raise SourceError(f"the broker granted no cluster: {describe_refused(refused)} (request id "
                                  f"{str(doc.get('request_id', '?'))[:40]})", code="clusters_refused") from None
            raise _refusal(err.code, doc) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise KdcUnreachableError(f"cannot reach the broker at {self.url}: {reason}",
                                      code="broker_unreachable") from None
        try:
            doc = json.loads(body)
        except ValueError:
            raise SourceError(f"the broker at {self.url} answered something that is not JSON",
                              code="bad_answer") from None
        if not isinstance(doc, dict):
            raise SourceError("the broker's answer is not a JSON object", code="bad_answer")
        self.caller_arn = str(doc["caller_arn"])[:300] if doc.get("caller_arn") else None
        return doc


def _default_credentials(region: str) -> Callable[[], Any]:
    def get() -> Any:
        import boto3

        return boto3.Session(region_name=region).get_credentials()

    return get


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _refusal(status: int, doc: dict[str, Any]) -> KerbJupyterError:
    rid = str(doc.get("request_id", "?"))[:40]
    if status in (401, 403):
        return CredentialsRejectedError(
            f"the broker refused this notebook's AWS identity (HTTP {status} {str(doc.get('error'))[:40]}, "
            f"request id {rid}); the broker's administrator can look the request id up in its audit log",
            code="broker_refused")
    if status == 429:
        return SourceError(f"the broker's rate limit was reached (request id {rid}); trying again later",
                           code="broker_rate_limited")
    message = str(doc.get("message") or doc.get("error") or f"HTTP {status}")[:200]
    return KdcUnreachableError(f"the broker cannot issue tickets right now: {message} (request id {rid})",
                               code=str(doc.get("error", "broker_error"))[:40])


def store_cache(data: bytes, cache: Path) -> None:
    """Write ``data`` as the shared cache: private temporary file next to it, then ``os.replace``."""
    directory = tickets.ensure_private_dir(cache.parent)
    with files.private_temp(directory, f".{cache.name}.") as tmp:
        tmp.write_bytes(data)
        tickets.read_cache(tmp, allow_expired=True)  # refuse to install a cache libkrb5 cannot read
        os.replace(tmp, cache)


def build_broker_source(spec: dict[str, Any]) -> BrokerSource:
    """The ``source`` section with ``type: broker``. Raises ConfigError."""
    unknown = sorted(set(spec) - _KEYS)
    if unknown:
        raise ConfigError(f"source: unknown key(s) {', '.join(unknown)} for a broker source; "
                          f"allowed: {', '.join(sorted(_KEYS))}")
    for key in ("url", "audience", "region"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise ConfigError(f"source.{key} is required for a broker source")
    url = urlsplit(spec["url"])
    host = url.hostname or ""
    if url.scheme != "https" and not (url.scheme == "http" and (host == "localhost" or host.startswith("127."))):
        raise ConfigError("source.url must be https:// (plain http only to a broker on loopback)")
    if spec.get("ca_bundle") and not Path(spec["ca_bundle"]).is_file():
        raise ConfigError(f"source.ca_bundle {spec['ca_bundle']} does not exist")
    return BrokerSource(url=spec["url"], audience=spec["audience"], region=spec["region"],
                        ca_bundle=spec.get("ca_bundle"), sts_url=spec.get("sts_url"),
                        timeout=float(spec.get("timeout", 15.0)))
