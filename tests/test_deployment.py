"""lifecycle/ and binder/: shell that is clean, fits SageMaker's limits, and produces working configuration."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kerb_jupyter import ConfigError
from kerb_jupyter.cli import krb5_conf
from kerb_jupyter.core import tickets
from kerb_jupyter.core.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = [*sorted((ROOT / "lifecycle").glob("*.sh")), ROOT / "binder" / "start", ROOT / "binder" / "postBuild",
           *sorted((ROOT / "scripts").iterdir()), ROOT / ".ci" / "run", *sorted((ROOT / "tests" / "fakes").iterdir())]


def test_shell_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed: run scripts/setup")
    subprocess.run(["shellcheck", *map(str, SCRIPTS)], check=True)


@pytest.mark.parametrize("script", sorted((ROOT / "lifecycle").glob("*.sh")), ids=lambda p: p.name)
def test_lifecycle_scripts_fit_sagemaker_limits(script):
    assert len(base64.b64encode(script.read_bytes())) <= 16384  # SageMaker's limit on the base64 content
    assert script.read_text().startswith("#!/bin/bash\n")
    assert "set -euo pipefail" in script.read_text()


def test_generated_krb5_conf_works_against_a_real_kdc(sandbox, tmp_path):
    conf = tmp_path / "krb5.conf"
    conf.write_text(krb5_conf(sandbox.realm.realm.lower(), [f"127.0.0.1:{sandbox.realm.port}"], ["localhost"]))
    os.environ["KRB5_CONFIG"] = str(conf)
    info = tickets.acquire_with_keytab(sandbox.principal, sandbox.keytab, tmp_path / "cc" / "krb5cc")
    assert info.principal == sandbox.principal
    assert ".rds.amazonaws.com = KERB.TEST" in conf.read_text()


@pytest.mark.parametrize("bad", [("CORP", ["dc1; rm -rf /"]), ("CO RP", ["dc1"]), ("CORP", ["dc1\n[realms]"])])
def test_krb5_conf_refuses_odd_input(bad):
    with pytest.raises(ConfigError):
        krb5_conf(bad[0], bad[1], [])


def _studio(tmp_path, extra_env=None, collaborative=False):
    """Run the Studio script with our own CLI doing the real work and a real pip installing from a wheelhouse of
    one local wheel; the platform's restart-jupyter-server and apt-get are recorders."""
    shims, conda = tmp_path / "shims", tmp_path / "conda"
    shims.mkdir()
    calls = tmp_path / "calls"
    for name in ("apt-get", "restart-jupyter-server"):
        (shims / name).write_text(f'#!/bin/bash\necho "{name} $*" >> {calls}\n')
        (shims / name).chmod(0o755)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(conda)], check=True)
    import site
    (next(conda.glob("lib/python3*/site-packages")) / "dev.pth").write_text(site.getsitepackages()[0] + "\n")
    (conda / "bin" / "kerb-jupyter").write_text(f'#!/bin/bash\nexec {sys.executable} -m kerb_jupyter.cli "$@"\n')
    (conda / "bin" / "kerb-jupyter").chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    clusters = {"analytics": {"host": "analytics.cluster-x.eu-west-1.rds.amazonaws.com", "dbname": "analytics"}}
    env = {"PATH": f"{shims}:/usr/bin:/bin", "HOME": str(home), "KERB_CONDA": str(conda),
           "KERB_REALM": "CORP.EXAMPLE.COM", "KERB_KDCS": "dc1.corp.example.com dc2.corp.example.com",
           "KERB_CLUSTERS_JSON": json.dumps(clusters), "KERB_WHEELHOUSE": str(tmp_path / "wheelhouse"),
           "KERB_JUPYTER_PIP_SPEC": "kerb_jupyter", "KERB_LOAD_WAIT": "2", **(extra_env or {})}
    (tmp_path / "wheelhouse").mkdir()
    script = ROOT / "lifecycle" / "studio-on-start.sh"
    argv = ["bash", str(script)] if not collaborative else ["bash", "-c", f'exec -a "jupyter-lab --collaborative" '
                                                            f'bash {script}']
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)
    return out, home, calls


def test_studio_script_writes_a_private_configuration(tmp_path):
    out, home, calls = _studio(tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "Kerberos client present (no apt)" in text
    settings = load_settings(home / ".jupyter" / "kerb_jupyter.json")
    assert settings.identity["order"] == ["studio_space", "sts"]
    assert settings.source == {"type": "secretsmanager_keytab", "secret_id": "kerberos/keytabs/{user}"}
    assert settings.cluster("analytics").host.endswith(".rds.amazonaws.com")
    assert str(settings.state_dir).startswith("/dev/shm/kerb_jupyter-")  # tmpfs: XDG_RUNTIME_DIR is unset
    from kerb_jupyter.core.mapping import map_identity
    assert map_identity("Alice@example.com", settings.mapping) == "alice@CORP.EXAMPLE.COM"
    conf = (home / ".kerb_jupyter" / "krb5.conf").read_text()
    assert "kdc = dc1.corp.example.com" in conf and "dns_canonicalize_hostname = false" in conf
    jconf = (tmp_path / "conda" / "etc" / "jupyter" / "jupyter_server_config.py").read_text()
    assert f'environ["KRB5_CONFIG"] = "{home}/.kerb_jupyter/krb5.conf"' in jconf
    assert "apt-get" not in (calls.read_text() if calls.exists() else "")
    assert "restart-jupyter-server" in calls.read_text()
    record = json.loads((home / ".jupyter" / "kerb_jupyter_install.json").read_text())
    assert record["platform"] == "studio" and record["status"] == "failed"  # no server answers in this test
    assert "does not answer for kerb_jupyter" in record["message"]


def test_studio_script_refuses_a_shared_space(tmp_path):
    out, home, calls = _studio(tmp_path, collaborative=True)
    assert out.returncode == 0
    assert "this is a shared space" in out.stdout and "use a private space" in out.stdout
    assert not (home / ".jupyter" / "kerb_jupyter.json").exists()
    assert not calls.exists()


def test_studio_script_without_writable_conda(tmp_path):
    out, _, _ = _studio(tmp_path, {"KERB_CONDA": str(tmp_path / "nope")})
    assert out.returncode == 0 and "is missing or not writable" in out.stdout


def test_lifecycle_encode_prints_one_base64_line():
    for script in sorted((ROOT / "lifecycle").glob("*.sh")):
        out = subprocess.run(["bash", str(ROOT / "scripts" / "lifecycle-encode"), str(script)], check=True,
                             capture_output=True, text=True).stdout
        assert out.count("\n") == 1 and base64.b64decode(out) == script.read_bytes()


def test_krb5_conf_for_ad_with_a_trusted_realm(tmp_path):
    conf = krb5_conf("corp.example.com", ["dc1.corp.example.com"], [], "dc2.corp.example.com",
                     ["ONPREM.EXAMPLE=kdc1.onprem.example,kdc2.onprem.example"])
    assert "admin_server = dc2.corp.example.com" in conf and "kpasswd_server = dc2.corp.example.com" in conf
    assert "permitted_enctypes = aes256-cts-hmac-sha1-96 aes128-cts-hmac-sha1-96" in conf
    assert "[capaths]" in conf and "kdc = kdc2.onprem.example" in conf
    from kerb_jupyter.doctor.krbprobe import parse_krb5_conf
    (tmp_path / "krb5.conf").write_text(conf)
    parsed = parse_krb5_conf(tmp_path / "krb5.conf")
    assert parsed.realms["ONPREM.EXAMPLE"]["kdc"] == ["kdc1.onprem.example", "kdc2.onprem.example"]
    assert parsed.realm_for_host("x.cluster-1.eu-west-1.rds.amazonaws.com") == "CORP.EXAMPLE.COM"


def test_binder_start_brings_up_the_sandbox_for_the_server(tmp_path):
    probe = ("import json, os, psycopg; from kerb_jupyter.core import tickets; from pathlib import Path;"
             "cfg = json.load(open(os.environ['KERB_JUPYTER_CONFIG']));"
             "print(cfg['principal'], Path(os.environ['KRB5_CONFIG']).is_file(), sorted(cfg['clusters']))")
    env = {**os.environ, "KERB_JUPYTER_SANDBOX_DIR": str(tmp_path / "sb"), "HOME": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the venv's kerb-jupyter and python
    env.pop("KRB5_CONFIG", None)
    out = subprocess.run(["bash", str(ROOT / "binder" / "start"), sys.executable, "-c", probe], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "alice@KERB.TEST True ['analytics', 'finance']"
    # The sandbox is gone with the command: its KDC port is free again.
    info = json.loads((tmp_path / "sb" / "sandbox.json").read_text())
    from kerb_jupyter.sandbox.procs import port_is_free
    assert port_is_free(int(info["kdc"].rsplit(":", 1)[1]))


def test_binder_start_hands_sigterm_to_the_server_and_stops_the_sandbox(tmp_path):
    server = ("import signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *a: (print('server got SIGTERM', flush=True), sys.exit(0)))\n"
              "print('ready', flush=True)\ntime.sleep(120)\n")
    env = {**os.environ, "KERB_JUPYTER_SANDBOX_DIR": str(tmp_path / "sb"), "HOME": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("KRB5_CONFIG", None)
    start = subprocess.Popen(["bash", str(ROOT / "binder" / "start"), sys.executable, "-c", server], env=env,
                             stdout=subprocess.PIPE, text=True)
    assert start.stdout is not None
    assert start.stdout.readline().strip() == "ready"
    start.send_signal(signal.SIGTERM)  # what the container runtime does on stop
    assert start.wait(30) == 0
    assert "server got SIGTERM" in start.stdout.read()
    info = json.loads((tmp_path / "sb" / "sandbox.json").read_text())
    from kerb_jupyter.sandbox.procs import port_is_free
    assert port_is_free(int(info["kdc"].rsplit(":", 1)[1]))
