"""Who the notebook user is: a chain of resolvers, each saying where the answer came from and whether AWS
enforces it (``trusted``) or the user or an admin merely claims it.

Resolvers, tried in the configured order (first answer wins):

- ``config``: ``identity.user`` in the configuration file (claimed);
- ``jupyterhub``: ``JUPYTERHUB_USER``, set by the hub that authenticated the user (trusted);
- ``studio_space``: SageMaker Studio: the space in ``resource-metadata.json`` -> ``DescribeSpace`` owner
  profile -> ``DescribeUserProfile`` Identity Center user name (trusted: set by SageMaker);
- ``notebook_tag``: a notebook instance's owner tag, read with ``ListTags`` (claimed: whoever may tag can change it);
- ``sts``: ``GetCallerIdentity``; an IAM Identity Center role session (``AWSReservedSSO_*``) carries the user
  name (trusted); SageMaker's own ``/SageMaker`` session names no human and is skipped.

A resolver that does not apply returns None with a reason; one that applies but fails raises IdentityError.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import IdentityError

DEFAULT_ORDER = ("config", "jupyterhub", "studio_space", "notebook_tag", "sts")
DEFAULT_METADATA = "/opt/ml/metadata/resource-metadata.json"
MAX_NAME = 256

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


def _clean(value: Any, what: str) -> str:
    """Identity names come from tags and APIs: refuse what no user name contains."""
    if not isinstance(value, str) or not value.strip():
        raise IdentityError(f"{what} is empty")
    if len(value) > MAX_NAME:
        raise IdentityError(f"{what} is {len(value)} characters long (at most {MAX_NAME})")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise IdentityError(f"{what} {value[:40]!r} contains control characters")
    return value.strip()


class IdentityResolver:
    def __init__(self, spec: dict[str, Any], client_factory: ClientFactory | None = None) -> None:
        order = spec.get("order", list(DEFAULT_ORDER))
        unknown = [r for r in order if r not in DEFAULT_ORDER]
        if unknown:
            raise IdentityError(f"identity.order: unknown resolver(s) {', '.join(map(str, unknown))}; "
                                f"known: {', '.join(DEFAULT_ORDER)}", code="config_error")
        self.order: list[str] = list(order)
        self.spec = spec
        self.client = client_factory or _boto3_client
        self.region = spec.get("region")

    def resolve(self) -> Identity:
        """The first resolver's answer. Raises IdentityError listing every resolver tried and why."""
        tried: list[str] = []
        for name in self.order:
            resolver: Callable[[], tuple[Identity | None, str]] = getattr(self, f"_{name}")
            found, reason = resolver()
            if found is not None:
                return found
            tried.append(f"{name}: {reason}")
        raise IdentityError("could not establish who the user is; tried " + "; ".join(tried))

    # -- resolvers: each returns (Identity | None, reason) ------------------------------------------
    def _config(self) -> tuple[Identity | None, str]:
        user = self.spec.get("user")
        if not user:
            return None, "identity.user is not set"
        return Identity(_clean(user, "identity.user"), "config", trusted=False), ""

    def _jupyterhub(self) -> tuple[Identity | None, str]:
        user = os.environ.get("JUPYTERHUB_USER")
        if not user:
            return None, "JUPYTERHUB_USER is not set"
        return Identity(_clean(user, "JUPYTERHUB_USER"), "jupyterhub", trusted=True), ""

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
        return Identity(_clean(name, "the space owner's user name"), "studio_space", trusted=True, arn=arn,
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
                return Identity(_clean(tag.get("Value"), f"tag {key!r}"), "notebook_tag", trusted=False,
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
        trusted = role.startswith("AWSReservedSSO_")
        return Identity(_clean(session, "the role session name"), "sts", trusted=trusted, arn=arn,
                        detail=f"role {role}"), ""

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
