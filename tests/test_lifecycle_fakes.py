"""The notebook-instance lifecycle script run for real on a faked AL2023 instance (tests/fakes/), twice.

Needs root and mount/PID/network namespaces: `scripts/test-fakes` runs this job when it can and says so when it
cannot; the ordinary suite skips it unless KERB_JUPYTER_FAKES=1.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kerb_jupyter.wheelhouse import build_wheelhouse

ROOT = Path(__file__).resolve().parent.parent
FAKES = ROOT / "tests" / "fakes"
pytestmark = [
    pytest.mark.skipif(os.environ.get("KERB_JUPYTER_FAKES") != "1", reason="the fakes job: scripts/test-fakes"),
    pytest.mark.timeout(900),
]
ENVS = ["anaconda3", "anaconda3/envs/JupyterSystemEnv", "anaconda3/envs/python3"]


@pytest.fixture(scope="session")
def image():
    """The instance image: the wheelhouse and ec2-user's anaconda3 (base, JupyterSystemEnv with jupyter_server, a
    python3 kernel env), created at its real path inside a mount namespace. Cached across sessions under
    /var/tmp, keyed by the wheels; not under pytest's 0700 basetemp: ec2-user must traverse it."""
    wheelhouse = Path(tempfile.mkdtemp(prefix="kerb-jupyter-wheelhouse-"))
    build_wheelhouse(wheelhouse, str(ROOT))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheelhouse), "ipykernel"],
                   check=True)  # the image's kernels (not installed by the scripts)
    key = hashlib.sha256("\n".join(sorted(w.name for w in wheelhouse.glob("*.whl"))).encode()).hexdigest()[:12]
    base = Path(f"/var/tmp/kerb-jupyter-fakes-{key}")
    for old in Path("/var/tmp").glob("kerb-jupyter-fakes-*"):  # images for other wheel sets
        if old != base:
            shutil.rmtree(old, ignore_errors=True)
    if not (base / "complete").exists():
        shutil.rmtree(base, ignore_errors=True)
        (base / "anaconda3").mkdir(parents=True)
        base.chmod(0o755)
        a = "/home/ec2-user/anaconda3"
        setup = f"""set -euo pipefail
mount --make-rprivate /
mount -t tmpfs tmpfs /home
if [ -d /root/.pyenv ]; then
    mkdir -p {base}/pyenv && mount --bind /root/.pyenv {base}/pyenv
    mount -t tmpfs -o mode=0755 tmpfs /root && mkdir /root/.pyenv && mount --move {base}/pyenv /root/.pyenv
fi
mkdir -p {a} && mount --bind {base}/anaconda3 {a}
{sys._base_executable} -m venv {a}/envs/JupyterSystemEnv
{a}/envs/JupyterSystemEnv/bin/python -m pip install -q --disable-pip-version-check --no-index \
    --find-links {wheelhouse} jupyter_server ipykernel ipython boto3 sqlalchemy
cp -a {a}/envs/JupyterSystemEnv {a}/envs/python3
cp -a {a}/envs/JupyterSystemEnv/. {a}/
fix() {{ for f in "$1"/bin/*; do  # entry points' shebangs name their env (never follow a symlink)
    if [ -f "$f" ] && [ ! -L "$f" ] && head -c2 "$f" | grep -q '#!'; then sed -i "1s|$2|$3|" "$f"; fi; done; }}
fix {a} envs/JupyterSystemEnv/ ""
fix {a}/envs/python3 envs/JupyterSystemEnv/ envs/python3/
chown -R 1000:1000 {a}
"""
        subprocess.run(["unshare", "--mount", "bash", "-c", setup], check=True)
        (base / "complete").touch()
    shutil.rmtree(base / "wheelhouse", ignore_errors=True)
    shutil.move(wheelhouse, base / "wheelhouse")
    (base / "wheelhouse").chmod(0o755)
    return base


def machine(image, tmp_path, mode, *, wheelhouse=True, net=True, wait=3, kind="notebook-instance"):
    work = Path(tempfile.mkdtemp(prefix=f"kerb-jupyter-fake-{mode}-", dir="/tmp"))  # not under a faked path
    work.chmod(0o755)
    studio_space = kind == "studio"
    persistent, owner = (work / "home", (1000, 100)) if studio_space else (work / "SageMaker", (1000, 1000))
    persistent.mkdir(parents=True)
    (work / "template").mkdir()
    (work / "template" / "anaconda3").symlink_to(image / "anaconda3")
    if wheelhouse:
        shutil.copytree(image / "wheelhouse", persistent / "kerb-jupyter-wheelhouse")
    for path in [persistent, *persistent.rglob("*")]:
        os.chown(path, *owner)
    script = (ROOT / "lifecycle" / f"{kind}-on-start.sh").read_text()
    script = re.sub(r'^WAIT="\$\{KERB_WAIT:-240\}"', f'WAIT="${{KERB_WAIT:-{wait}}}"', script, flags=re.M)
    (work / "script.sh").write_text(script)
    cmd = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc", *([] if net else ["--net"]),
           "bash", str(FAKES / f"{kind}.sh"), mode, str(work)]
    started = time.monotonic()
    try:
        subprocess.run(cmd, check=True, timeout=840)
    finally:
        if (work / "out").is_dir():
            shutil.copytree(work / "out", tmp_path / "out", dirs_exist_ok=True)  # kept by pytest for a look
        shutil.rmtree(work, ignore_errors=True)
    return tmp_path / "out", time.monotonic() - started


def checks(out, name):
    return dict(line.split(" ", 1) for line in (out / f"{name}.checks").read_text().splitlines())


def assert_installed(c, out, name):
    for env in ENVS:
        assert c[f"import:{env}"] == "ok", (out / f"{name}.install.log").read_text()
        assert c[f"dist-info:{env}"] == "1"
    assert c["enabled"] == "1" and c["loaded"] == "yes", (out / f"{name}.doctor").read_text()
    assert c["krb5.conf"] == "root 644" and c["config"] == "ec2-user 600"
    assert c["record"] == "ok"
    assert c["root-owned"] == "0", (out / f"{name}.root-owned").read_text()
    assert c["servers"] == "1"
    assert c["lock"] == "free"  # nothing the install started (the server) keeps it


def test_install_restart_and_rerun(image, tmp_path):
    out, _ = machine(image, tmp_path, "main")
    run1 = (out / "run1.out").read_text()
    assert (out / "run1.rc").read_text().strip() == "0"
    assert "installing in the background" in run1 and "still installing after 3 s" in run1
    # The runner deleted the script when run1 returned: the background job carried on from its copy.
    log1 = (out / "run1.install.log").read_text()
    assert "package manager: dnf" in log1 and "Amazon Linux 2023" in log1
    assert "pip source: --no-index --find-links /home/ec2-user/SageMaker/kerb-jupyter-wheelhouse" in log1
    assert "(as ec2-user)" in log1 and "restarting the Jupyter server" in log1
    # The same-boot re-run found the first install still running and left it alone.
    assert "still running; leaving it to finish" in (out / "run2.out").read_text()
    c1 = checks(out, "run1")
    assert_installed(c1, out, "run1")
    assert c1["installs"] == "1" and c1["server-starts"] == "2"  # boot + one restart
    # After a restart (everything but ~/SageMaker wiped) the script installs again.
    c3 = checks(out, "run3")
    assert_installed(c3, out, "run3")
    assert c3["installs"] == "1"
    # Run again on the same boot, nothing changed: no restart, nothing duplicated.
    c4 = checks(out, "run4")
    assert_installed(c4, out, "run4")
    assert c4["server-starts"] == c3["server-starts"]
    assert "already installed and loaded; the server was not restarted" in (out / "run4.install.log").read_text()


def test_offline_without_wheelhouse_fails_fast_and_says_why(image, tmp_path):
    out, took = machine(image, tmp_path, "once", wheelhouse=False, net=False, wait=240)
    text = (out / "run1.out").read_text()
    assert "the package index is unreachable" in text and "kerb-jupyter wheelhouse DIR" in text
    assert (out / "run1.rc").read_text().strip() == "0"  # the instance still starts
    c = checks(out, "run1")
    assert c["record"] == "failed" and c["import:anaconda3/envs/JupyterSystemEnv"] == "missing"
    assert took < 120


def test_classic_notebookapp_platform_is_named(image, tmp_path):
    out, _ = machine(image, tmp_path, "notebookapp", wait=240)
    text = (out / "run1.out").read_text()
    assert "server application: notebook" in text and "classic NotebookApp" in text
    c = checks(out, "run1")
    assert c["record"] == "failed"
    assert c["import:anaconda3/envs/python3"] == "ok"  # the magic is in the kernels


def studio(image, tmp_path, mode):
    return machine(image, tmp_path, mode, kind="studio")[0]


def test_studio_space_install_app_restart_and_rerun(image, tmp_path):
    out = studio(image, tmp_path, "main")
    for run in ("run1", "run2", "run3"):
        c = checks(out, run)
        assert c["import:conda"] == "ok" and c["import:myenv"] == "ok", (out / f"{run}.out").read_text()
        assert c["loaded"] == "yes", (out / f"{run}.doctor").read_text()
        assert c["etc-krb5.conf"] == "sagemaker-user 644 1"  # the image's file, untouched
        assert c["private-krb5.conf"].startswith("sagemaker-user ")
        assert c["kernel-KRB5_CONFIG"] == "/home/sagemaker-user/.kerb_jupyter/krb5.conf"
        assert c["state-dir"] == "/dev/shm/kerb_jupyter-1000"
        assert c["record"] == "ok" and c["root-owned"] == "0", (out / f"{run}.root-owned").read_text()
        assert c["config-blocks"] == "1"
    run1 = (out / "run1.out").read_text()
    assert "Kerberos client present (no apt)" in run1 and "pip source: --no-index" in run1
    assert "restarting the Jupyter server" in run1
    assert checks(out, "run1")["server-starts"] == "2"  # app start + one restart
    # Same app, nothing changed: no restart.
    assert "the server was not restarted" in (out / "run3.out").read_text()
    assert checks(out, "run3")["server-starts"] == checks(out, "run2")["server-starts"]


def test_studio_shared_space_is_refused(image, tmp_path):
    out = studio(image, tmp_path, "shared")
    assert "this is a shared space" in (out / "run1.out").read_text()
    c = checks(out, "run1")
    assert c["record"] == "failed" and c["import:conda"] == "missing" and c["loaded"] == "no"


def test_studio_image_without_kerberos_client_or_sudo(image, tmp_path):
    out = studio(image, tmp_path, "nosudo")
    assert "missing krb5-user and no sudo in this image" in (out / "run1.out").read_text()
    assert checks(out, "run1")["record"] == "failed"
