"""The audit log: one JSON line per statement (who, where, what shape, how it went), never parameter values.

The file is private (0600, created with O_APPEND so concurrent kernels interleave whole lines); a symlink, a file
of another user, one others may write or one with other hard links is refused (OSError saying which). The statement
is recorded as a fingerprint (literals replaced by ``?``, then SHA-256) plus that literal-free text, cut short.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from ..core import files
from .sqlparse import fingerprint_text

TEXT_MAX = 300


def fingerprint(statement: str) -> tuple[str, str]:
    text = fingerprint_text(statement)
    return hashlib.sha256(text.encode()).hexdigest()[:16], text[:TEXT_MAX]


def record(path: Path, **fields: Any) -> None:
    """Append one record; a failure to audit is reported by the caller, never silently dropped. Raises OSError."""
    statement = fields.pop("statement", "")
    digest, shape = fingerprint(statement)
    doc = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "fingerprint": digest, "statement": shape, **fields}
    line = (json.dumps(doc, default=str, ensure_ascii=True) + "\n").encode()
    fd = files.open_append(path)  # refuses a symlink, another user's file, a shared or hard-linked one
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
