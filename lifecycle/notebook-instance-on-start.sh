#!/bin/bash
# SageMaker notebook instance lifecycle configuration (on-start): install and enable kerb_jupyter.
# Runs as root in / with a minimal PATH and a 5-minute limit; the slow part runs in the background.
# Edit the settings below (or set them as environment variables in a wrapper), then see lifecycle/README.md.
set -euo pipefail

REALM="${KERB_REALM:-CORP.EXAMPLE.COM}"                 # the AD realm
KDCS="${KERB_KDCS:-dc1.corp.example.com dc2.corp.example.com}"  # domain controllers, space-separated
OWNER_TAG="${KERB_OWNER_TAG:-owner}"                    # tag on the notebook instance naming its user
USER_DOMAIN="${KERB_USER_DOMAIN:-example.com}"          # e-mail domain of the owner tag values
SECRET_ID="${KERB_SECRET_ID:-kerberos/keytabs/{user\}}" # Secrets Manager keytab per user (template)
CLUSTERS_JSON="${KERB_CLUSTERS_JSON:-{\}}"              # {"name": {"host": ..., "port": ..., "dbname": ...}}
PIP_SPEC="${KERB_JUPYTER_PIP_SPEC:-kerb_jupyter}"       # or an s3-downloaded wheel path
NOTEBOOK_USER=ec2-user
CONDA=/home/ec2-user/anaconda3
SERVER_ENV="$CONDA/envs/JupyterSystemEnv"
LOG=/var/log/kerb-jupyter-lifecycle.log

export PATH="/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin:$PATH"

if [ "${1:-}" != "--now" ]; then
    # Installing can take longer than the 5 minutes SageMaker allows: go on in the background.
    nohup bash "$0" --now >> "$LOG" 2>&1 &
    echo "kerb_jupyter: installing in the background; see $LOG"
    exit 0
fi

# MIT Kerberos client libraries and headers (gssapi and krb5 build against them).
yum install -y -q krb5-workstation krb5-libs krb5-devel gcc
# The server extension lives in the Jupyter server's env; the magic in every kernel env.
"$SERVER_ENV/bin/pip" install -q "$PIP_SPEC"
for env in "$CONDA"/envs/*/; do
    [ "$env" = "$SERVER_ENV/" ] && continue
    if [ ! -x "$env/bin/pip" ] || [ ! -x "$env/bin/python" ]; then continue; fi
    "$env/bin/pip" install -q "$PIP_SPEC" || echo "kerb_jupyter: could not install into $env" >&2
done
read -ra kdcs <<< "$KDCS"
kdc_args=()
for kdc in "${kdcs[@]}"; do kdc_args+=(--kdc "$kdc"); done
"$SERVER_ENV/bin/kerb-jupyter" krb5-conf --realm "$REALM" "${kdc_args[@]}" --domain "${REALM,,}" \
    > /etc/krb5.conf.kerb_jupyter
install -m 0644 /etc/krb5.conf.kerb_jupyter /etc/krb5.conf
install -d -m 0700 -o "$NOTEBOOK_USER" -g "$NOTEBOOK_USER" "/home/$NOTEBOOK_USER/.jupyter"
sudo -u "$NOTEBOOK_USER" tee "/home/$NOTEBOOK_USER/.jupyter/kerb_jupyter.json" >/dev/null <<JSON
{
  "identity": {"order": ["notebook_tag"], "owner_tag": "$OWNER_TAG"},
  "mapping": {"rules": [{"template": "{local}@$REALM", "case": "lower", "domain": "$USER_DOMAIN"}]},
  "source": {"type": "secretsmanager_keytab", "secret_id": "$SECRET_ID"},
  "clusters": $CLUSTERS_JSON
}
JSON
systemctl --no-block restart jupyter-server.service
echo "kerb_jupyter: installed and the Jupyter server restarted"
