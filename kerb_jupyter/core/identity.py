"""Who the notebook user is: a chain of resolvers, each saying where the answer came from and whether AWS
enforces it (``trusted``) or the user or an admin merely claims it.

Resolvers, tried in the configured order (first answer wins):

- ``config``: ``identity.user`` in the configuration file (claimed);
- ``jupyterhub``: the user the hub's API names for this server's token (``GET $JUPYTERHUB_API_URL/user`` with
  ``JUPYTERHUB_API_TOKEN``; trusted), which must equal ``JUPYTERHUB_USER``; without the API URL and token, the
  bare ``JUPYTERHUB_USER`` variable (claimed: anyone can set it);
- ``studio_space``: SageMaker Studio: the space in ``resource-metadata.json`` -> ``DescribeSpace`` owner
  profile -> ``DescribeUserProfile`` Identity Center user name (trusted: set by SageMaker);
- ``notebook_tag``: a notebook instance's owner tag, read with ``ListTags`` (claimed: whoever may tag can change it);
- ``sts``: ``GetCallerIdentity``; an IAM Identity Center role session carries the user name: trusted only when
  the role name has the exact ``AWSReservedSSO_<permission set>_<16 hex digits>`` form and the account is listed
  in ``identity.sso_accounts`` (``GetCallerIdentity`` does not show the role's path, so the name alone proves
  nothing); SageMaker's own ``/SageMaker`` session names no human and is skipped.

A resolver that does not apply returns None with a reason; one that applies but fails raises IdentityError.
Names are taken as given, never normalised: plain ASCII letters, digits and ``. _ @ + = , -`` only, so no
look-alike character (Kelvin sign, long s, dotless i...) can stand for another user's name.
``identity.require_trusted_identity`` (true, false or "auto", the default: on when the platform gives an
enforced source, i.e. the hub's API URL and token are set or this is a Studio space) skips answers AWS (or the
hub) does not enforce.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .checks import shown
from .errors import ConfigError, IdentityError

DEFAULT_ORDER = ("config", "jupyterhub", "studio_space", "notebook_tag", "sts")
DEFAULT_METADATA = "/opt/ml/metadata/resource-metadata.json"
MAX_NAME = 256
HUB_TIMEOUT = 10.0  # seconds for the hub API's answer
SPEC_KEYS = {"order", "user", "region", "metadata_file", "owner_tag", "notebook_arn", "require_trusted_identity",
             "sso_accounts"}
# re.ASCII everywhere: without it \w, \d and IGNORECASE accept Unicode look-alikes of ASCII letters.
_NAME_CHARS = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@+=,-]*", re.ASCII)
_SSO_ROLE = re.compile(r"AWSReservedSSO_[A-Za-z0-9+=,.@_-]{1,32}_[0-9a-f]{16}", re.ASCII)
_ACCOUNT = re.compile(r"[0-9]{12}", re.ASCII)

ClientFactory = Callable[..., Any]


@dataclass(frozen=True)
class Identity:
    name: str
    source: str
    trusted: bool
    arn: str | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _boto3_client(service: str, **kwargs: Any) -> Any:
    import boto3

    return boto3.client(service, **{k: v for k, v in kwargs.items() if v is not None})


def validate_name(value: Any, what: str) -> str:
    """An identity name exactly as given: 1-256 characters of ASCII letters, digits and ``. _ @ + = , -``.

    Refused, never normalised (NFKC would turn the Kelvin sign into K: the very look-alike an attacker wants).
    Raises IdentityError (code ``bad_identity``)."""
    if not isinstance(value, str) or not value:
        raise IdentityError(f"{what} is empty", code="bad_identity")
    if len(value) > MAX_NAME:
        raise IdentityError(f"{what} is {len(value)} characters long (at most {MAX_NAME})", code="bad_identity")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise IdentityError(f"{what} {value[:40]!r} contains control characters", code="bad_identity")
    if not value.isascii():
        raise IdentityError(f"{what} {value[:40]!a} contains non-ASCII characters: refused, since a look-alike "
                            "letter could stand for another user's name", code="bad_identity")
    if not _NAME_CHARS.fullmatch(value):
        raise IdentityError(f"{what} {value[:40]!r} contains characters no user name has (allowed: ASCII letters, "
                            "digits and . _ @ + = , - and no leading punctuation)", code="bad_identity")
    return value


def hub_api_settings() -> tuple[str, str] | None:
    """``(JUPYTERHUB_API_URL, JUPYTERHUB_API_TOKEN)`` when the hub gave this server both, else None."""
    url, token = os.environ.get("JUPYTERHUB_API_URL"), os.environ.get("JUPYTERHUB_API_TOKEN")
    return (url.rstrip("/"), token) if url and token else None


def hub_token_owner(api_url: str, token: str, timeout: float = HUB_TIMEOUT) -> str:
    """The user name the hub's ``GET {api_url}/user`` gives for ``token`` (the single-user server's own).

    Raises IdentityError: ``hub_unreachable`` when the hub does not answer, ``hub_refused`` when it refuses the
    token or answers with something that is not a user. The token never appears in a message."""
    parts = urllib.parse.urlsplit(api_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise IdentityError(f"JUPYTERHUB_API_URL {api_url[:80]!r} is not an http(s) URL", code="hub_refused")
    headers = {"Authorization": f"token {token}", "Accept": "application/json"}
    request = urllib.request.Request(f"{api_url}/user", headers=headers)  # noqa: S310 (scheme checked above)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 (scheme checked above)
            body = resp.read(1 << 20)
    except urllib.error.HTTPError as err:
        raise IdentityError(f"the hub at {api_url} refused this server's token (HTTP {err.code}) when asked who "
                            "owns it", code="hub_refused") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise IdentityError(f"cannot ask the hub at {api_url} who this server's user is: {reason}",
                            code="hub_unreachable") from None
    try:
        doc = json.loads(body)
    except ValueError:
        raise IdentityError(f"the hub at {api_url} answered GET /user with something that is not JSON",
                            code="hub_refused") from None
    if not isinstance(doc, dict) or doc.get("kind", "user") != "user" or not isinstance(doc.get("name"), str):
        raise IdentityError(f"the hub at {api_url} says this server's token does not belong to a user",
                            code="hub_refused")
    return str(doc["name"])


def validate_spec(spec: Any) -> dict[str, Any]:
    """Check the ``identity`` section's keys and value types. Raises ConfigError naming the key."""
    if not isinstance(spec, dict):
        raise ConfigError("'identity' must be an object")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ConfigError(f"identity: unknown key(s) {', '.join(map(str, unknown))}; allowed: "
                          f"{', '.join(sorted(SPEC_KEYS))}")
    order = spec.get("order", list(DEFAULT_ORDER))
    if not isinstance(order, list) or not all(isinstance(r, str) for r in order):
        raise ConfigError(f"identity.order must be a list of resolver names, not {shown(order)}")
    bad = [r for r in order if r not in DEFAULT_ORDER]
    if bad:
        raise ConfigError(f"identity.order: unknown resolver(s) {', '.join(bad)}; known: {', '.join(DEFAULT_ORDER)}")
    for key in ("user", "region", "metadata_file", "owner_tag", "notebook_arn"):
        if key in spec and not isinstance(spec[key], str):
            raise ConfigError(f"identity.{key} must be a string, not {shown(spec[key])}")
    if spec.get("require_trusted_identity", "auto") not in (True, False, "auto"):
        raise ConfigError(f"identity.require_trusted_identity must be true, false or \"auto\", not "
                          f"{spec['require_trusted_identity']!r:.40}")
    accounts = spec.get("sso_accounts", [])
    if not isinstance(accounts, list) or not all(isinstance(a, str) and _ACCOUNT.fullmatch(a) for a in accounts):
        raise ConfigError("identity.sso_accounts must be a list of 12-digit AWS account ids (as strings)")
    return spec


class IdentityResolver:
    def __init__(self, spec: dict[str, Any], client_factory: ClientFactory | None = None) -> None:
        """Raises IdentityError (code ``config_error``) for a malformed ``identity`` section."""
        try:
            validate_spec(spec)
        except ConfigError as err:
            raise IdentityError(str(err), code="config_error") from None
        self.order: list[str] = list(spec.get("order", DEFAULT_ORDER))
        self.spec = spec
        self.client = client_factory or _boto3_client
        self.region = spec.get("region")
        self.sso_accounts = set(spec.get("sso_accounts", []))

    def trusted_required(self) -> bool:
        """``require_trusted_identity``: as set, or with "auto" on where the platform gives an enforced source."""
        mode = self.spec.get("require_trusted_identity", "auto")
        if mode != "auto":
            return bool(mode)
        if hub_api_settings() is not None:
            return True
        meta = self._metadata()
        return bool(meta and meta.get("SpaceName") and meta.get("DomainId"))

    def resolve(self) -> Identity:
        """The first resolver's answer (the first enforced one when ``require_trusted_identity`` is on).

        Raises IdentityError listing every resolver tried and why."""
        required = self.trusted_required()
        tried: list[str] = []
        skipped = False
        for name in self.order:
            resolver: Callable[[], tuple[Identity | None, str]] = getattr(self, f"_{name}")
            found, reason = resolver()
            if found is not None and required and not found.trusted:
                skipped = True
                reason = f"{found.name!r} is claimed, not enforced by AWS, and require_trusted_identity is on"
            elif found is not None:
                return found
            tried.append(f"{name}: {reason}")
        raise IdentityError("could not establish who the user is; tried " + "; ".join(tried),
                            code="untrusted_identity" if skipped else IdentityError.code)

    # -- resolvers: each returns (Identity | None, reason) ------------------------------------------
    def _config(self) -> tuple[Identity | None, str]:
        user = self.spec.get("user")
        if not user:
            return None, "identity.user is not set"
        return Identity(validate_name(user, "identity.user"), "config", trusted=False), ""

    def _jupyterhub(self) -> tuple[Identity | None, str]:
        user = os.environ.get("JUPYTERHUB_USER")
        if not user:
            return None, "JUPYTERHUB_USER is not set"
        claimed = validate_name(user, "JUPYTERHUB_USER")
        api = hub_api_settings()
        if api is None:
            return Identity(claimed, "jupyterhub", trusted=False,
                            detail="JUPYTERHUB_USER only: no JUPYTERHUB_API_URL and JUPYTERHUB_API_TOKEN to confirm "
                                   "it with the hub"), ""
        name = validate_name(hub_token_owner(*api), "the user the hub names")
        if name != claimed:
            raise IdentityError(f"JUPYTERHUB_USER is {claimed!r} but the hub says this server's token belongs to "
                                f"{name!r}: refused", code="identity_mismatch")
        return Identity(name, "jupyterhub", trusted=True, detail=f"confirmed by the hub at {api[0]}"), ""

    def _metadata(self) -> dict[str, Any] | None:
        path = Path(self.spec.get("metadata_file", DEFAULT_METADATA))
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise IdentityError(f"cannot read the SageMaker metadata file {path}: {err}") from None
        if not isinstance(doc, dict):
            raise IdentityError(f"the SageMaker metadata file {path} is not a JSON object")
        return doc

    def _studio_space(self) -> tuple[Identity | None, str]:
        meta = self._metadata()
        if meta is None or not meta.get("SpaceName") or not meta.get("DomainId"):
            return None, "not a SageMaker Studio space (no SpaceName/DomainId in the metadata file)"
        domain, space = str(meta["DomainId"]), str(meta["SpaceName"])
        sm = self._aws("sagemaker")
        desc = self._call(sm.describe_space, "DescribeSpace", DomainId=domain, SpaceName=space)
        if (desc.get("SpaceSharingSettings") or {}).get("SharingType") == "Shared":
            return None, f"space {space!r} is shared: it has no single owner"
        profile = (desc.get("OwnershipSettings") or {}).get("OwnerUserProfileName")
        if not profile:
            return None, f"space {space!r} has no owner profile"
        user = self._call(sm.describe_user_profile, "DescribeUserProfile", DomainId=domain, UserProfileName=profile)
        name = user.get("SingleSignOnUserValue") or profile
        arn = user.get("UserProfileArn") or desc.get("SpaceArn")
        return Identity(validate_name(name, "the space owner's user name"), "studio_space", trusted=True, arn=arn,
                        detail=f"space {space}, profile {profile}"), ""

    def _notebook_tag(self) -> tuple[Identity | None, str]:
        key = self.spec.get("owner_tag", "owner")
        meta = self._metadata()
        arn = (meta or {}).get("ResourceArn") or self.spec.get("notebook_arn")
        if not arn or ":notebook-instance/" not in str(arn):
            return None, "not a SageMaker notebook instance (no notebook-instance ResourceArn)"
        resp = self._call(self._aws("sagemaker").list_tags, "ListTags", ResourceArn=str(arn))
        for tag in resp.get("Tags", []):
            if tag.get("Key") == key:
                return Identity(validate_name(tag.get("Value"), f"tag {key!r}"), "notebook_tag", trusted=False,
                                arn=str(arn), detail=f"tag {key}"), ""
        return None, f"the notebook instance has no {key!r} tag"

    def _sts(self) -> tuple[Identity | None, str]:
        doc = self._call(self._aws("sts").get_caller_identity, "GetCallerIdentity")
        arn = str(doc.get("Arn", ""))
        parts = arn.split(":", 5)[-1].split("/")
        if len(parts) < 3 or parts[0] != "assumed-role":
            return None, f"the caller {arn or '(unknown)'} is not an assumed-role session"
        role, session = parts[1], "/".join(parts[2:])
        if session == "SageMaker":
            return None, f"role {role} runs as SageMaker's own session, which names no person"
        account = arn.split(":")[4] if arn.count(":") >= 5 else ""
        sso_form = bool(_SSO_ROLE.fullmatch(role))
        trusted = sso_form and account in self.sso_accounts
        detail = f"role {role}"
        if sso_form and not trusted:
            detail += f" (an Identity Center role name, but account {account} is not in identity.sso_accounts)"
        return Identity(validate_name(session, "the role session name"), "sts", trusted=trusted, arn=arn,
                        detail=detail), ""

    # -- AWS plumbing ----------------------------------------------------------------------------
    def _aws(self, service: str) -> Any:
        return self.client(service, region_name=self.region)

    def _call(self, method: Callable[..., Any], name: str, **kwargs: Any) -> dict[str, Any]:
        import botocore.exceptions

        try:
            return method(**kwargs)  # type: ignore[no-any-return]
        except botocore.exceptions.ClientError as err:
            code = err.response.get("Error", {}).get("Code", "ClientError")
            raise IdentityError(f"{name} was refused: {code}") from None
        except (botocore.exceptions.BotoCoreError, OSError) as err:
            raise IdentityError(f"{name} failed: cannot reach AWS ({type(err).__name__})",
                                code="aws_unreachable") from None
