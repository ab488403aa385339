"""Where a ticket comes from: a local keytab, a keytab or password in AWS Secrets Manager, or a cache the
user made with kinit (then we can only renew it).

Each source turns into one call of ``tickets.acquire_*``. Secret material is held in local variables for
the duration of that call only; a keytab fetched from Secrets Manager goes into an in-process ``MEMORY:``
keytab, never to disk, and no log record of the AWS libraries is emitted while a secret is being fetched.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import string
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..core import files, tickets
from ..core.errors import CacheError, ConfigError, CredentialsRejectedError, KdcUnreachableError, SourceError
from ..core.tickets import TicketInfo

ClientFactory = Callable[..., Any]


class Source(Protocol):
    """Something that can put a fresh TGT for a principal into a cache."""

    kind: str
    can_acquire: bool

    def acquire(self, principal: str, cache: Path, lifetime: int | None, renew_life: int | None) -> TicketInfo: ...

    def describe(self) -> str: ...


@dataclass
class KeytabSource:
    keytab: Path
    kind: str = "keytab"
    can_acquire: bool = True

    def acquire(self, principal: str, cache: Path, lifetime: int | None, renew_life: int | None) -> TicketInfo:
        return tickets.acquire_with_keytab(principal, self.keytab, cache, lifetime, renew_life)

    def describe(self) -> str:
        return f"keytab {self.keytab}"


@dataclass
class ExistingCacheSource:
    """A cache made by ``kinit``: copied once into our private cache, then only renewed."""

    cache: Path
    kind: str = "existing_cache"
    can_acquire: bool = True  # becomes False after the first copy: a copy of an old ticket is no help

    def acquire(self, principal: str, cache: Path, lifetime: int | None, renew_life: int | None) -> TicketInfo:
        info = tickets.read_cache(self.cache)  # raises NoTicket/Expired/CacheError
        if info.principal != principal:
            raise SourceError(f"the cache {self.cache} holds a ticket for {info.principal}, not {principal}")
        try:
            data = self.cache.read_bytes()
        except OSError as err:
            raise SourceError(f"cannot read the cache {self.cache}: {err.strerror}") from None
        try:
            files.write_private(cache, data, "credential directory")  # fresh 0600 file, renamed into place
        except OSError as err:
            raise CacheError(f"could not write the credential cache {cache}: {err.strerror}") from None
        self.can_acquire = False
        return tickets.read_cache(cache)

    def describe(self) -> str:
        return f"existing cache {self.cache}"


@dataclass
class SecretsManagerSource:
    """A keytab (``SecretBinary``, or base64 in ``SecretString``) or a password held in Secrets Manager.

    ``secret_id`` is a template: ``{user}`` is the principal's user part, ``{principal}`` the principal,
    ``{realm}`` the realm.
    """

    secret_id: str
    secret_kind: str = "keytab"  # or "password"
    region: str | None = None
    client_factory: ClientFactory | None = None
    kind: str = "secretsmanager"
    can_acquire: bool = True

    def secret_name(self, principal: str) -> str:
        user, _, realm = principal.partition("@")
        try:
            return string.Formatter().vformat(self.secret_id, (), {"user": user, "principal": principal,
                                                                     "realm": realm})
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(f"source.secret_id {self.secret_id!r}: bad template ({err}); "
                              "use {user}, {principal} or {realm}") from None

    def acquire(self, principal: str, cache: Path, lifetime: int | None, renew_life: int | None) -> TicketInfo:
        directory = tickets.ensure_private_dir(cache.parent)  # checked before any secret is fetched
        # Earlier versions wrote the keytab to .keytab.<pid>; a process killed meanwhile left it behind.
        files.remove_leftovers(directory, ".keytab.")
        name = self.secret_name(principal)
        secret = self._fetch(name)
        if self.secret_kind == "password":
            password = secret if isinstance(secret, bytes) else secret.encode()
            return tickets.acquire_with_password(principal, password, cache, lifetime, renew_life)
        keytab = secret if isinstance(secret, bytes) else _b64(secret, name)
        return tickets.acquire_with_keytab_data(principal, keytab, cache, lifetime, renew_life)  # never on disk

    def _fetch(self, name: str) -> bytes | str:
        import botocore.exceptions

        factory = self.client_factory or _boto3_client
        try:
            with quiet_aws_debug_logs():
                client = factory("secretsmanager", region_name=self.region)
                _guard_aws_loggers()  # loggers of modules the client imported just now
                resp = client.get_secret_value(SecretId=name)
        except botocore.exceptions.ClientError as err:
            code = err.response.get("Error", {}).get("Code", "ClientError")
            raise SourceError(f"Secrets Manager refused secret {name!r}: {code}", code="secret_unavailable") from None
        except (botocore.exceptions.BotoCoreError, OSError) as err:
            raise KdcUnreachableError(f"cannot reach Secrets Manager for secret {name!r}: {type(err).__name__}",
                                      code="aws_unreachable") from None
        if resp.get("SecretBinary") is not None:
            return bytes(resp["SecretBinary"])
        if resp.get("SecretString") is not None:
            return str(resp["SecretString"])
        raise SourceError(f"secret {name!r} has no value")

    def current_version(self, principal: str) -> str | None:
        """The AWSCURRENT version id of this principal's secret (DescribeSecret: metadata, never the value);
        None when it cannot be read. Raises ConfigError for a bad secret_id template."""
        import botocore.exceptions

        factory = self.client_factory or _boto3_client
        try:
            with quiet_aws_debug_logs():
                desc = factory("secretsmanager", region_name=self.region).describe_secret(
                    SecretId=self.secret_name(principal))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
            return None
        versions = desc.get("VersionIdsToStages") or {}
        return next((str(v) for v, stages in versions.items() if "AWSCURRENT" in stages), None)

    def describe(self) -> str:
        return f"Secrets Manager {self.secret_kind} {self.secret_id}"


_AWS_LOGGERS = ("botocore", "boto3", "urllib3", "s3transfer")
_fetching = threading.local()


class _SecretFetchFilter(logging.Filter):
    """Drops every record the AWS libraries emit in a thread that is fetching a secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_fetching, "active", False)


_FILTER = _SecretFetchFilter()


def _guard_aws_loggers() -> None:
    # A logger's filters only see records created on that very logger, so the filter goes on every AWS logger
    # (botocore.parsers logs whole response bodies at DEBUG). Loggers created later are caught on the next call,
    # and the client is made inside the guarded block after this runs.
    import botocore.endpoint
    import botocore.parsers  # noqa: F401  (their loggers must exist before we walk the registry)

    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in _AWS_LOGGERS]
    for name in [*_AWS_LOGGERS, *names]:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


@contextmanager
def quiet_aws_debug_logs() -> Iterator[None]:
    """While a secret is fetched, this thread's AWS library loggers (botocore, boto3, urllib3) say nothing at any
    level: botocore logs response bodies, secret values included, at DEBUG. Other threads are unaffected and no
    logger level is changed."""
    _guard_aws_loggers()
    _fetching.active = True
    try:
        yield
    finally:
        _fetching.active = False


def _b64(text: str, name: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise CredentialsRejectedError(f"secret {name!r} is a string but not a base64 keytab") from None


def _boto3_client(service: str, **kwargs: Any) -> Any:
    import boto3

    return boto3.client(service, **{k: v for k, v in kwargs.items() if v is not None})


def build_source(spec: dict[str, Any], client_factory: ClientFactory | None = None) -> Source:
    """Turn the ``source`` section of the configuration into a Source. Raises ConfigError."""
    kind = spec.get("type", "keytab" if spec.get("keytab") else None)
    if kind == "keytab":
        if not spec.get("keytab"):
            raise ConfigError("source.keytab: the path of the keytab is required for a keytab source")
        return KeytabSource(Path(spec["keytab"]).expanduser())
    if kind == "existing_cache":
        path = spec.get("cache") or os.environ.get("KRB5CCNAME", "")
        if not path:
            raise ConfigError("source.cache: the path of the kinit cache is required")
        return ExistingCacheSource(Path(str(path).removeprefix("FILE:")).expanduser())
    if kind in ("secretsmanager_keytab", "secretsmanager_password"):
        if not spec.get("secret_id"):
            raise ConfigError(f"source.secret_id is required for a {kind} source, e.g. 'kerberos/{{user}}'")
        return SecretsManagerSource(
            secret_id=str(spec["secret_id"]), secret_kind=kind.rsplit("_", 1)[1],
            region=spec.get("region"), client_factory=client_factory,
        )
    if kind == "broker":
        from .brokersource import build_broker_source

        return build_broker_source(spec)
    from ..core.checks import SOURCE_TYPES

    raise ConfigError(f"source.type {kind!r:.40} is not one of: {', '.join(SOURCE_TYPES)}")
