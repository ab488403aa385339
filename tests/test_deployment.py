"""lifecycle/ and binder/: shell that is clean, fits SageMaker's limits, and produces working configuration."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kerb_jupyter import ConfigError, tickets
from kerb_jupyter.cli import krb5_conf
from kerb_jupyter.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = [*sorted((ROOT / "lifecycle").glob("*.sh")), ROOT / "binder" / "start", ROOT / "binder" / "postBuild",
           *sorted((ROOT / "scripts").iterdir()), ROOT / ".ci" / "run"]


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


def test_studio_script_writes_a_valid_configuration(tmp_path):
    """Run the Studio script for real, with the platform's commands (apt-get, sudo, restart-jupyter-server)
    replaced by recorders and our own CLI doing the real work."""
    shims, conda = tmp_path / "shims", tmp_path / "conda" / "bin"
    shims.mkdir()
    conda.mkdir(parents=True)
    calls = tmp_path / "calls"
    for name in ("apt-get", "restart-jupyter-server"):
        (shims / name).write_text(f'#!/bin/bash\necho "{name} $*" >> {calls}\n')
    (shims / "sudo").write_text('#!/bin/bash\nwhile [[ "$1" == *=* ]]; do export "$1"; shift; done\nexec "$@"\n')
    (conda / "pip").write_text(f'#!/bin/bash\necho "pip $*" >> {calls}\n')
    (conda / "kerb-jupyter").write_text(f'#!/bin/bash\nexec {sys.executable} -m kerb_jupyter.cli "$@"\n')
    for f in [*shims.iterdir(), *conda.iterdir()]:
        f.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    clusters = {"analytics": {"host": "analytics.cluster-x.eu-west-1.rds.amazonaws.com", "dbname": "analytics"}}
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "HOME": str(home), "KERB_CONDA": str(conda.parent),
           "KERB_KRB5_CONF": str(tmp_path / "krb5.conf"), "KERB_REALM": "CORP.EXAMPLE.COM",
           "KERB_KDCS": "dc1.corp.example.com dc2.corp.example.com", "KERB_CLUSTERS_JSON": json.dumps(clusters)}
    subprocess.run(["bash", str(ROOT / "lifecycle" / "studio-on-start.sh")], env=env, check=True)
    settings = load_settings(home / ".jupyter" / "kerb_jupyter.json")
    assert settings.identity["order"] == ["studio_space", "sts"]
    assert settings.source == {"type": "secretsmanager_keytab", "secret_id": "kerberos/keytabs/{user}"}
    assert settings.cluster("analytics").host.endswith(".rds.amazonaws.com")
    from kerb_jupyter.mapping import map_identity
    assert map_identity("Alice@example.com", settings.mapping) == "alice@CORP.EXAMPLE.COM"
    conf = (tmp_path / "krb5.conf").read_text()
    assert "kdc = dc1.corp.example.com" in conf and "kdc = dc2.corp.example.com" in conf
    recorded = calls.read_text()
    assert "pip install -q kerb_jupyter" in recorded and "restart-jupyter-server" in recorded


def test_binder_start_brings_up_the_sandbox_for_the_server(tmp_path):
    probe = ("import json, os, psycopg; from kerb_jupyter import tickets; from pathlib import Path;"
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
