"""Whether a credential source changed since the KDC rejected it: keytab or cache file, or secret version."""

from __future__ import annotations

import os
from typing import Any

from .errors import KerbJupyterError
from .sources import SecretsManagerSource, Source, quiet_aws_debug_logs


def source_stamp(source: Source, principal: str | None) -> Any:
    """Something that changes when the source does (None: cannot tell). Blocks: may call AWS.

    A keytab or kinit cache: the file's identity, size and mtime. Secrets Manager: the AWSCURRENT version id,
    from DescribeSecret (metadata only: the secret's value is never fetched for this).
    """
    try:
        if isinstance(source, SecretsManagerSource):
            return None if principal is None else _secret_version(source, source.secret_name(principal))
        path = getattr(source, "keytab", None) or getattr(source, "cache", None)
        if path is None:
            return None
        st = os.stat(path)
        return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)
    except (OSError, KerbJupyterError):
        return None


def _secret_version(src: SecretsManagerSource, name: str) -> Any:
    import boto3
    import botocore.exceptions

    try:
        with quiet_aws_debug_logs():
            if src.client_factory is not None:
                client = src.client_factory("secretsmanager", region_name=src.region)
            else:
                client = boto3.client("secretsmanager", **({"region_name": src.region} if src.region else {}))
            desc = client.describe_secret(SecretId=name)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
        return None
    versions = desc.get("VersionIdsToStages") or {}
    return next((v for v, stages in versions.items() if "AWSCURRENT" in stages), None)
