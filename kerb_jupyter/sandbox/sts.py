"""A moto server on 127.0.0.1 standing in for AWS STS and IAM, with SigV4 verification switched on.

moto answers any signature with 200 by default; ``start()`` creates an admin user and the roles first, then
turns verification on (``/moto-api/reset-auth``), so forged or tampered requests get 403 as from AWS.
Date, replay and Host checks remain the broker's own (moto never makes them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from ..errors import SandboxError
from .procs import free_port, tail, wait_for_port

ACCOUNT = "123456789012"
REGION = "us-east-1"
SSO_ROLE = "AWSReservedSSO_DataScientists_0123456789abcdef"
_TRUST = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                  "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:user/sandbox-admin"}}]}
_ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


class MotoSts:
    """``start()`` -> an admin key pair and roles; ``session(role, name)`` -> credentials of a role session."""

    def __init__(self, root: Path, port: int = 0) -> None:
        self.root = Path(root).resolve()
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_file = self.root / "moto.log"
        self.admin: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, service: str, creds: dict[str, str] | None = None) -> Any:
        import boto3

        c = creds or self.admin or {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        return boto3.client(service, endpoint_url=self.url, region_name=REGION, **c)

    def start(self, roles: tuple[str, ...] = (SSO_ROLE,)) -> MotoSts:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        exe = Path(sys.executable).with_name("moto_server")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(self.port)], stdout=log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        if not wait_for_port(self.port, self.proc, 30):
            self.stop()
            raise SandboxError(f"moto_server did not start: {tail(self.log_file.read_text())}")
        iam = self.client("iam")
        iam.create_user(UserName="sandbox-admin")
        policy = iam.create_policy(PolicyName="sandbox-all", PolicyDocument=json.dumps(_ALLOW_ALL))["Policy"]["Arn"]
        iam.attach_user_policy(UserName="sandbox-admin", PolicyArn=policy)
        key = iam.create_access_key(UserName="sandbox-admin")["AccessKey"]
        self.admin = {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}
        for role in roles:
            self.create_role(role)
        self._post("/moto-api/reset-auth", b"0")  # from now on moto verifies every signature
        return self

    def create_role(self, name: str) -> str:
        iam = self.client("iam", self.admin or None)
        arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(_TRUST))["Role"]["Arn"]
        iam.attach_role_policy(RoleName=name, PolicyArn=f"arn:aws:iam::{ACCOUNT}:policy/sandbox-all")
        return str(arn)

    def session(self, role: str, name: str) -> dict[str, str]:
        """Credentials of ``assumed-role/<role>/<name>`` (as IAM Identity Center would hand a signed-in user)."""
        resp = self.client("sts").assume_role(RoleArn=f"arn:aws:iam::{ACCOUNT}:role/{role}", RoleSessionName=name)
        c = resp["Credentials"]
        return {"aws_access_key_id": c["AccessKeyId"], "aws_secret_access_key": c["SecretAccessKey"],
                "aws_session_token": c["SessionToken"]}

    def _post(self, path: str, body: bytes) -> None:
        req = urllib.request.Request(self.url + path, data=body, method="POST",  # noqa: S310
                                     headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - our own loopback server
            resp.read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
