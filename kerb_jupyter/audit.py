"""The audit log: one JSON line per statement (who, where, what shape, how it went), never parameter values.

The file is private (0600, created with O_APPEND so concurrent kernels interleave whole lines). The statement
is recorded as a fingerprint (literals replaced by ``?``, then SHA-256) plus that literal-free text, cut short.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from .sqlparse import fingerprint_text

TEXT_MAX = 300


def fingerprint(statement: str) -> tuple[str, str]:
    text = fingerprint_text(statement)
    return hashlib.sha256(text.encode()).hexdigest()[:16], text[:TEXT_MAX]


def record(path: Path, **fields: Any) -> None:
    """Append one record; a failure to audit is reported by the caller, never silently dropped."""
    statement = fields.pop("statement", "")
    digest, shape = fingerprint(statement)
    doc = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "fingerprint": digest, "statement": shape, **fields}
    line = (json.dumps(doc, default=str, ensure_ascii=True) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
