"""A real `jupyter server` process with the extension: Jupyter's log format, a clean stop on SIGTERM in every
keeper state (a hung KDC or database included), and no configuration executed from next to the settings file."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kerb_jupyter.sandbox.procs import free_port


def start_server(tmp_path: Path, config: Path, krb5_conf: Path) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    home = tmp_path / "home"
    (home / "root").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HOME": str(home), "JUPYTER_CONFIG_DIR": str(home / "cfg"),
           "JUPYTER_DATA_DIR": str(home / "data"), "JUPYTER_RUNTIME_DIR": str(home / "run"),
           "KERB_JUPYTER_CONFIG": str(config), "KRB5_CONFIG": str(krb5_conf), "JUPYTER_PLATFORM_DIRS": "1"}
    env.pop("KRB5CCNAME", None)
    cmd = [sys.executable, "-m", "jupyter_server", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", f"--ServerApp.root_dir={home / 'root'}", "--IdentityProvider.token=t0ken",
           "--ServerApp.jpserver_extensions={'kerb_jupyter': True}", "--KerbJupyterApp.retry_interval=0.3",
           "--KerbJupyterApp.max_retry_interval=0.5", "--allow-root"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    return proc, f"http://127.0.0.1:{port}/kerb-jupyter/"


def _ignore_errors(fn, *args, **kw) -> None:
    try:
        fn(*args, **kw)
    except OSError:
        pass


def server_status(proc, url: str, want: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    doc: dict = {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stderr.read()[-3000:]}")
        try:
            req = urllib.request.Request(url + "api/status", headers={"Authorization": "token t0ken"})
            with urllib.request.urlopen(req, timeout=5) as r:
                doc = json.loads(r.read())
            if doc["state"] == want:
                return doc
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"state never became {want!r}: {doc}")


class SilentPort:
    """A TCP (and UDP) port that accepts and never answers: a hung KDC or database."""

    def __init__(self) -> None:
        import socket
        import threading

        self.tcp = socket.socket()
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(16)
        self.port = self.tcp.getsockname()[1]
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", self.port))
        self.accepted: list = []
        self.tcp.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                self.accepted.append(self.tcp.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self.accepted:
            conn.close()
        self.tcp.close()
        self.udp.close()


@pytest.mark.parametrize("case", ["valid", "bad_setting", "credentials_rejected", "kdc_unreachable", "kdc_hangs",
                                  "check_hangs"])
def test_a_real_server_logs_in_jupyters_format_and_stops_on_sigterm(case, sandbox, tmp_path):
    from conftest import write_config

    (tmp_path / "conf").mkdir()
    marker = tmp_path / "config-as-code-ran"
    # A kerb_jupyter.py next to the configuration must never run as Jupyter configuration.
    (tmp_path / "conf" / "kerb_jupyter.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    overrides: dict = {}
    krb5_conf = sandbox.realm.krb5_conf
    want = {"valid": "valid", "bad_setting": "error", "credentials_rejected": "error", "kdc_unreachable": "expired",
            "kdc_hangs": "starting", "check_hangs": "valid"}[case]
    silent = SilentPort() if case in ("kdc_hangs", "check_hangs") else None
    if case == "kdc_hangs":
        krb5_conf = tmp_path / "hung-krb5.conf"
        krb5_conf.write_text(re.sub(r"kdc = 127\.0\.0\.1:\d+", f"kdc = 127.0.0.1:{silent.port}",
                                    sandbox.realm.krb5_conf.read_text()))
    elif case == "check_hangs":
        overrides["clusters"] = {"hung": {"host": "localhost", "port": silent.port, "dbname": "x",
                                          "connect_timeout": 600, "sslmode": "disable", "gssencmode": "disable"}}
    if case == "bad_setting":
        overrides["source"] = {"type": "keytab", "keytab": 42}
    elif case == "credentials_rejected":
        overrides["principal"] = "nobody@KERB.TEST"
    elif case == "kdc_unreachable":
        krb5_conf = tmp_path / "dead-krb5.conf"
        krb5_conf.write_text(re.sub(r"kdc = 127\.0\.0\.1:\d+", f"kdc = 127.0.0.1:{free_port()}",
                                    sandbox.realm.krb5_conf.read_text()))
    config = write_config(tmp_path / "conf" / "kerb_jupyter.json", sandbox, **overrides)
    proc, url = start_server(tmp_path, config, krb5_conf)
    try:
        doc = server_status(proc, url, want)
        req = urllib.request.Request(url, headers={"Authorization": "token t0ken"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200 and b"Kerberos credentials" in r.read()  # the page stays up
        if case == "kdc_unreachable":
            time.sleep(1.0)  # a few retries reach the log
        if case == "check_hangs":
            import threading

            post = urllib.request.Request(url + "api/clusters/hung/check", method="POST", data=b"",
                                          headers={"Authorization": "token t0ken"})
            threading.Thread(target=lambda: _ignore_errors(urllib.request.urlopen, post, timeout=600),
                             daemon=True).start()
        if silent is not None:  # SIGTERM while the KDC (or the database) holds the call
            while not silent.accepted:
                time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        try:
            rc = proc.wait(timeout=60)
            print(f"{case}: stopped {time.monotonic() - sent:.2f} s after SIGTERM")
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("the server did not stop on SIGTERM") from None
        if silent is not None:
            silent.close()
    log = proc.stderr.read()
    assert rc == 0, log[-3000:]
    assert not marker.exists()
    fmt = re.compile(r"^\[[DIWEC] \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} KerbJupyterApp\] ")
    ours = [line for line in log.splitlines() if "KerbJupyterApp]" in line or line.startswith("kerb_jupyter")]
    assert ours and all(fmt.match(line) for line in ours), ours
    if case == "bad_setting":
        assert "source.keytab must be a string, not int 42" in doc["last_error"]["message"]
    elif case == "credentials_rejected":
        assert doc["last_error"]["code"] == "credentials_rejected"
    elif case == "kdc_hangs":  # the server did not wait for the hung Kerberos call to give up
        assert doc["state"] == "starting" and "cannot reach the KDC" not in log
    elif case == "check_hangs":
        assert "api/clusters/hung/check" not in log  # the check never finished: tornado logs finished requests
    elif case == "kdc_hangs":  # the server did not wait for the hung Kerberos call to give up
        assert doc["state"] == "starting" and "cannot reach the KDC" not in log
    elif case == "check_hangs":
        assert "api/clusters/hung/check" not in log  # the check never finished: tornado logs finished requests
    elif case == "kdc_unreachable":
        retries = [line for line in ours if "retrying in" in line]
        assert len(retries) >= 2 and all(line.startswith(("[W ", "[E ")) for line in retries)
        assert all("cannot reach the KDC" in line and "(krb5 error -1765328228)" in line for line in retries)
    else:
        assert any("acquired a ticket for alice@KERB.TEST" in line for line in ours)
