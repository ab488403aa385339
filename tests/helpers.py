"""Test helpers: the server extension's start hook, real kernels and shells, the doctor and the keeper."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client import BlockingKernelClient

from kerb_jupyter.doctor.run import run_doctor
from kerb_jupyter.server.keeper import TicketKeeper
from kerb_jupyter.server.sources import KeytabSource


@dataclass
class CellOutput:
    stdout: str = ""
    stderr: str = ""
    data: list[dict[str, Any]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        parts = [self.stdout, self.stderr]
        parts += [d.get("text/plain", "") for d in self.data]
        parts += [d.get("text/html", "") for d in self.data]
        if self.error:
            parts += [self.error["ename"], self.error["evalue"], *self.error["traceback"]]
        return "\n".join(parts)


class KernelSession:
    def __init__(self, connection_info: dict[str, Any]) -> None:
        self.client = BlockingKernelClient()
        self.client.load_connection_info(connection_info)
        # Without a kernel manager the client judges "alive" by heartbeats; the default 1 s is too short on a
        # loaded 2-core machine while the kernel is still importing ("Kernel died before replying").
        self.client.hb_channel.time_to_dead = 10.0
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 60) -> CellOutput:
        out = CellOutput()
        self.client.execute_interactive(code, output_hook=lambda msg: collect(out, msg), timeout=timeout)
        return out

    async def arun(self, code: str, timeout: float = 60) -> CellOutput:
        """Like run, but yields to the event loop while the kernel works (so the keeper keeps running)."""
        out = CellOutput()
        msg_id = self.client.execute(code)
        deadline = asyncio.get_running_loop().time() + timeout
        idle = False
        while not idle:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"the kernel did not finish {code[:40]!r} in {timeout} s")
            while self.client.iopub_channel.msg_ready():
                msg = self.client.get_iopub_msg(timeout=1)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    idle = True
                collect(out, msg)
            await asyncio.sleep(0.05)
        return out

    def close(self) -> None:
        self.client.stop_channels()


def collect(out: CellOutput, msg: dict[str, Any]) -> None:
    """Add one IOPub message to what a notebook would show."""
    kind, content = msg["msg_type"], msg["content"]
    if kind == "stream":
        if content["name"] == "stdout":
            out.stdout += content["text"]
        else:
            out.stderr += content["text"]
    elif kind in ("execute_result", "display_data"):
        out.data.append(content["data"])
    elif kind == "update_display_data":
        out.updates.append(content["data"])
    elif kind == "error":
        out.error = content


async def start_extensions(app) -> None:  # the hook a real server runs after its event loop starts
    await app.extension_manager.start_all_extensions()


async def wait_state(jp_fetch, want: str, timeout: float = 15) -> dict:
    doc: dict = {}
    for _ in range(int(timeout / 0.1)):
        doc = json.loads((await jp_fetch("kerb-jupyter", "api", "status")).body)
        if doc["state"] == want:
            return doc
        await asyncio.sleep(0.1)
    raise AssertionError(f"state never became {want!r}: {doc}")




def extension(app):
    return app.extension_manager.extension_points["kerb_jupyter"].app


async def wait_keeper(app, want: str, timeout: float = 15) -> None:
    keeper = extension(app).keeper
    for _ in range(int(timeout / 0.05)):
        if keeper.state.state == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"keeper state never became {want!r}: {keeper.state}")


def doctor(*clusters, **kwargs):
    """run_doctor as the doctor tests call it: no running server to find unless ``runtime_dir`` says where."""
    return run_doctor(clusters, runtime_dir=kwargs.pop("runtime_dir", Path("/nonexistent")), **kwargs)


def statuses(report):
    """Each check's name -> its status."""
    return {c.name: c.status for c in report.checks}


def krb5_conf_copy(sandbox, tmp_path, edit):
    """A copy of the sandbox's krb5.conf with ``edit`` applied, made this test's KRB5_CONFIG."""
    conf = tmp_path / "krb5.conf"
    conf.write_text(edit(sandbox.realm.krb5_conf.read_text()))
    os.environ["KRB5_CONFIG"] = str(conf)
    return conf


def run(shell, code: str) -> Any:
    """Run one cell in a real shell; its result (the cell must parse)."""
    result = shell.run_cell(code)
    assert result.error_before_exec is None
    return result.result


def keeper_for(sandbox, cache, source=None, principal=None, **kw) -> TicketKeeper:
    """A TicketKeeper for ``cache`` (keytab source, the sandbox principal) with short retry intervals."""
    kw.setdefault("retry_interval", 0.3)
    kw.setdefault("max_retry_interval", 0.6)
    return TicketKeeper(principal or sandbox.principal, source or KeytabSource(sandbox.keytab), cache,
                        cache.parent / "state.json", **kw)
