"""The demo notebook executed headlessly (nbclient) as an unprivileged user, the way Binder runs it: binder/start
brings up the sandbox, a real Jupyter server with kerb_jupyter keeps the ticket, and a real kernel runs every cell."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from unprivileged import ROOT, as_user, user_python

from kerb_jupyter.sandbox.procs import free_port

DEMO = ROOT / "kerb_jupyter" / "sandbox" / "demo.ipynb"
RUN = """
import json, os, sys
import nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
os.environ.update(json.load(open(sys.argv[3]))["env"])
if sys.argv[4] == "server":  # what the server extension exports to the kernels it starts
    from kerb_jupyter.core.config import load_settings
    os.environ["KRB5CCNAME"] = f"FILE:{load_settings().cache_path}"
client = NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True,
                        resources={"metadata": {"path": os.environ["HOME"]}})
client.execute()
nbformat.write(nb, sys.argv[2])
print("executed", flush=True)
"""


def _wait_ready(port: int, token: str, start: subprocess.Popen[str], log: Path) -> dict[str, object]:
    """The extension's status once the keeper holds a ticket (fails with the logs if binder/start dies)."""
    deadline = time.monotonic() + 150
    last: object = None
    while time.monotonic() < deadline:
        if start.poll() is not None:
            pytest.fail(f"binder/start ended ({start.returncode}):\n{log.read_text()[-3000:]}")
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/kerb-jupyter/api/status",
                                         headers={"Authorization": f"token {token}"})
            with urllib.request.urlopen(req, timeout=5) as resp:
                last = json.loads(resp.read())
            if isinstance(last, dict) and last.get("principal") and last.get("expires_at"):
                return last
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the server's keeper never held a ticket; last status {last}\n{log.read_text()[-3000:]}")


def _texts(cell: dict) -> str:
    out = []
    for o in cell.get("outputs", []):
        out.append(o.get("text", ""))
        for mime in ("text/plain", "text/html"):
            value = (o.get("data") or {}).get(mime, "")
            out.append("".join(value) if isinstance(value, list) else value)
    return "\n".join(out)


@pytest.mark.parametrize("kernel", [
    "server",
    "standalone",
])
def test_the_demo_notebook_runs_as_an_unprivileged_user(kernel):
    """The kernel as the server starts it, and standalone (``jupyter execute``, papermill: no KRB5CCNAME)."""
    me = pwd.getpwuid(os.geteuid()).pw_name
    user = "nobody" if os.geteuid() == 0 else me
    account = pwd.getpwnam(user)
    python = user_python(user)
    work = Path(tempfile.mkdtemp(prefix="kj-demo-"))
    shutil.copy(DEMO, work / "demo.ipynb")
    shutil.copy(ROOT / "binder" / "start", work / "start")  # the checkout may be closed to the user (under /root)
    for path in (work, work / "demo.ipynb", work / "start"):
        os.chown(path, account.pw_uid, account.pw_gid)
    port, token = free_port(), "demo-test-token"
    env = {"HOME": str(work), "USER": user, "LANG": "C.UTF-8",
           "PATH": f"{python.parent}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
           "KERB_JUPYTER_SANDBOX_DIR": str(work / "sb")}
    server = [str(python), "-m", "jupyter_server", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
              f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
              "--ServerApp.jpserver_extensions={'kerb_jupyter': True}"]
    log = work / "start.log"
    with open(log, "w") as out:
        start = subprocess.Popen([*as_user(user, env), "bash", str(work / "start"), *server],
                                 stdout=out, stderr=subprocess.STDOUT, text=True, cwd=work, start_new_session=True)
    try:
        status = _wait_ready(port, token, start, log)
        run = subprocess.run([*as_user(user, env), str(python), "-c", RUN, str(work / "demo.ipynb"),
                              str(work / "out.ipynb"), str(work / "sb" / "sandbox.json"), kernel],
                             capture_output=True, text=True, timeout=170, cwd=work)
        assert run.returncode == 0, run.stderr[-4000:]
        nb = nbformat.read(work / "out.ipynb", as_version=4)
    finally:
        start.send_signal(signal.SIGTERM)
        start.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    assert start.returncode == 0
    assert status["principal"] == "alice@KERB.TEST"
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [(c.source, o) for c in code for o in c.outputs
              if o.output_type == "error" or (o.output_type == "stream" and o.name == "stderr")]
    assert errors == [], {c.source.splitlines()[0]: _texts(c) for c in code}
    assert all(c.get("execution_count") for c in code)
    by_source = {c.source.splitlines()[0]: _texts(c) for c in code}
    assert "alice@KERB.TEST" in by_source["%kerbstatus"]
    assert "analytics" in by_source["%kerbsql --list"] and "finance" in by_source["%kerbsql --list"]
    gss = by_source["%%kerbsql analytics"]
    # current_user | gss_authenticated | encrypted: the GSSAPI login as alice, on an encrypted connection
    assert re.search(r"^alice@KERB\.TEST\s*\|\s*(t|True)\s*\|\s*(t|True)\s*$", gss, re.M), gss
    assert "Dublin" in by_source["%%kerbsql analytics -o trips"]
    assert "avg_fare" in by_source["%%kerbsql finance --dataframe"]
