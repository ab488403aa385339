"""How often the keeper may ask the KDC: the retry schedule, and whether a rejected credential source changed."""

from __future__ import annotations

import os
import random
from typing import Any

from ..core.errors import KerbJupyterError
from .sources import SecretsManagerSource, Source


def retry_delay(failures: int, time_left: float | None, retry_interval: float, max_retry_interval: float,
                jitter: float) -> float:
    """Seconds before retry number ``failures`` (1 = the first retry).

    ``retry_interval`` doubling per failure up to ``max_retry_interval``; while the ticket is still valid
    (``time_left`` seconds) at most a third of that, so more attempts land before it expires; never less than
    ``retry_interval``; then 0-``jitter`` (5%) longer, so servers whose tickets were issued together spread out
    instead of hitting a recovering KDC in step.
    """
    delay = min(retry_interval * 2 ** min(failures - 1, 60), max_retry_interval)
    if time_left is not None:
        delay = min(delay, time_left / 3)
    delay = max(delay, retry_interval)
    return float(delay * (1 + random.uniform(0, jitter)))


def source_stamp(source: Source, principal: str | None) -> Any:
    """Something that changes when the source does (None: cannot tell). Blocks: may call AWS.

    A keytab or kinit cache: the file's identity, size and mtime. Secrets Manager: the AWSCURRENT version id,
    from DescribeSecret (metadata only: the secret's value is never fetched for this).
    """
    try:
        if isinstance(source, SecretsManagerSource):
            return None if principal is None else source.current_version(principal)
        path = getattr(source, "keytab", None) or getattr(source, "cache", None)
        if path is None:
            return None
        st = os.stat(path)
        return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)
    except (OSError, KerbJupyterError):
        return None
