"""Running things as another Unix user in tests: which interpreter that user can run, and the command prefix."""

from __future__ import annotations

import hashlib
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def shared_venv() -> Path:
    """Where scripts/setup builds the virtualenv other users run: ``$KERB_JUPYTER_SHARED_VENV``, else
    ``/opt/kerb-jupyter/venv-<first 12 hex digits of sha256(checkout path)>`` (outside the checkout, which may sit
    under a 0700 directory such as /root; one per checkout)."""
    override = os.environ.get("KERB_JUPYTER_SHARED_VENV")
    if override:
        return Path(override)
    return Path("/opt/kerb-jupyter") / f"venv-{hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]}"


def user_python(user: str) -> Path:
    """A Python with kerb_jupyter installed that ``user`` can run: this one, or scripts/setup's shared venv
    (built from the system python3 when this interpreter lives where other users cannot reach, e.g. /root)."""
    candidates = [Path(sys.executable), shared_venv() / "bin" / "python"]
    for python in candidates:
        probe = subprocess.run([*as_user(user, {"PATH": "/usr/bin:/bin"}), str(python), "-c", "import kerb_jupyter"],
                               capture_output=True, timeout=60)
        if probe.returncode == 0:
            return python
    pytest.fail(f"no Python with kerb_jupyter that {user} can run: run scripts/setup as root (it builds "
                f"{candidates[1].parent.parent} from /usr/bin/python3)")


def as_user(user: str, env: dict[str, str]) -> list[str]:
    """The command prefix that runs what follows as ``user`` with exactly ``env`` (setpriv execs, so a signal
    sent to the process reaches the command itself)."""
    run_env = ["env", "-i", *(f"{k}={v}" for k, v in env.items())]
    if user == pwd.getpwuid(os.geteuid()).pw_name:
        return run_env
    return ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--clear-groups", "--", *run_env]

