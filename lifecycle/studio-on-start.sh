#!/bin/bash
# SageMaker Studio (JupyterLab space) lifecycle configuration: install and enable kerb_jupyter.
# Runs as sagemaker-user (passwordless sudo) with a 5-minute limit. The user is the private space's owner,
# resolved through DescribeSpace + DescribeUserProfile (the execution role needs both permissions).
set -euo pipefail

REALM="${KERB_REALM:-CORP.EXAMPLE.COM}"
KDCS="${KERB_KDCS:-dc1.corp.example.com dc2.corp.example.com}"
USER_DOMAIN="${KERB_USER_DOMAIN:-example.com}"
SECRET_ID="${KERB_SECRET_ID:-kerberos/keytabs/{user\}}"
CLUSTERS_JSON="${KERB_CLUSTERS_JSON:-{\}}"
PIP_SPEC="${KERB_JUPYTER_PIP_SPEC:-kerb_jupyter}"
CONDA="${KERB_CONDA:-/opt/conda}"
KRB5_CONF="${KERB_KRB5_CONF:-/etc/krb5.conf}"

sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq krb5-user libkrb5-dev gcc
"$CONDA/bin/pip" install -q "$PIP_SPEC"
read -ra kdcs <<< "$KDCS"
kdc_args=()
for kdc in "${kdcs[@]}"; do kdc_args+=(--kdc "$kdc"); done
"$CONDA/bin/kerb-jupyter" krb5-conf --realm "$REALM" "${kdc_args[@]}" --domain "${REALM,,}" \
    | sudo tee "$KRB5_CONF" >/dev/null
mkdir -p "$HOME/.jupyter" && chmod 0700 "$HOME/.jupyter"
cat > "$HOME/.jupyter/kerb_jupyter.json" <<JSON
{
  "identity": {"order": ["studio_space", "sts"]},
  "mapping": {"rules": [{"template": "{local}@$REALM", "case": "lower", "domain": "$USER_DOMAIN"}]},
  "source": {"type": "secretsmanager_keytab", "secret_id": "$SECRET_ID"},
  "clusters": $CLUSTERS_JSON
}
JSON
restart-jupyter-server
echo "kerb_jupyter: installed; the Jupyter server is restarting"
