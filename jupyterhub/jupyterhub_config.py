# JupyterHub with LocalProcessSpawner (each user's server runs as that Unix user) and kerb_jupyter.
# A working example: tests/test_jupyterhub.py runs a hub with exactly these settings. Adjust the paths.
# ruff: noqa: F821 (JupyterHub provides `c` when it loads this file)
from __future__ import annotations

import os

c.JupyterHub.bind_url = os.environ.get("KJ_HUB_URL", "http://127.0.0.1:8000")
c.JupyterHub.authenticator_class = "pam"  # real Unix accounts and passwords
c.Authenticator.allowed_users = set(os.environ.get("KJ_HUB_USERS", "").split(",")) - {""}
c.JupyterHub.spawner_class = "localprocess"
c.Spawner.ip = "127.0.0.1"
# The single-user server must be a Python every user can run, with kerb_jupyter installed (and enabled).
c.Spawner.cmd = [os.environ.get("KJ_SINGLEUSER", "jupyterhub-singleuser")]
# LocalProcessSpawner passes on only Spawner.env_keep (PATH, PYTHONPATH, CONDA_*, VIRTUAL_ENV, LANG, LC_ALL,
# JUPYTERHUB_SINGLEUSER_APP) plus JUPYTERHUB_*: no KRB5_* variable reaches the user's server. Give it the realm's
# krb5.conf and kerb_jupyter's configuration explicitly (a callable value may give each user their own).
c.Spawner.environment = {
    "KRB5_CONFIG": os.environ.get("KJ_KRB5_CONFIG", "/etc/krb5.conf"),
    "KERB_JUPYTER_CONFIG": os.environ.get("KJ_CONFIG", "/etc/kerb_jupyter/config.json"),
}
