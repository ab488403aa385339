"""The kerb_jupyter error tree: every error a user can see, each with a plain-words message.

    KerbJupyterError
    ├── ConfigError                 malformed or missing configuration
    │   └── UnknownClusterError     a cluster name that is not configured
    ├── IdentityError               who the user is could not be established or mapped
    ├── SourceError                 a credential source could not provide key material
    ├── TicketError                 Kerberos ticket problems
    │   ├── NoTicketError           no usable cache / no TGT in it
    │   ├── TicketExpiredError      the TGT in the cache has expired
    │   ├── KdcUnreachableError     the KDC could not be reached (retry later)
    │   ├── CredentialsRejectedError the KDC refused the key (wrong password/keytab, disabled): do not retry
    │   └── CacheError              the cache file is corrupt, empty, or has unsafe owner or mode
    ├── DatabaseError               a query or connection failed (classified: auth, network, sql)
    └── SandboxError                the local demo/test realm or database could not start

Messages never contain a secret: they name principals, paths, clusters and error codes only.
"""

from __future__ import annotations


class KerbJupyterError(Exception):
    """Base class; ``code`` is a stable machine-readable identifier used by the REST API."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ConfigError(KerbJupyterError):
    code = "config_error"


class UnknownClusterError(ConfigError):
    code = "unknown_cluster"

    def __init__(self, name: str, known: list[str]) -> None:
        listing = ", ".join(sorted(known)) if known else "none are configured"
        super().__init__(f"unknown cluster {name!r}: configured clusters are {listing}")
        self.name = name
        self.known = sorted(known)


class IdentityError(KerbJupyterError):
    code = "identity_error"


class SourceError(KerbJupyterError):
    code = "source_error"


class TicketError(KerbJupyterError):
    code = "ticket_error"


class NoTicketError(TicketError):
    code = "no_ticket"


class TicketExpiredError(TicketError):
    code = "ticket_expired"


class KdcUnreachableError(TicketError):
    code = "kdc_unreachable"


class CredentialsRejectedError(TicketError):
    code = "credentials_rejected"


class CacheError(TicketError):
    code = "cache_error"


class DatabaseError(KerbJupyterError):
    code = "database_error"


class SandboxError(KerbJupyterError):
    code = "sandbox_error"


__all__ = [
    "CacheError",
    "ConfigError",
    "CredentialsRejectedError",
    "DatabaseError",
    "IdentityError",
    "KdcUnreachableError",
    "KerbJupyterError",
    "NoTicketError",
    "SandboxError",
    "SourceError",
    "TicketError",
    "TicketExpiredError",
    "UnknownClusterError",
]

for _name in __all__:
    globals()[_name].__module__ = "kerb_jupyter"
