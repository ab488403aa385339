#!/bin/bash
# kerb_jupyter in a SageMaker Studio JupyterLab space (SageMaker Distribution image): lifecycle configuration.
# Runs as sagemaker-user with a 5-minute limit; /opt/conda, /etc and /usr are fresh at each app start, the home
# directory persists. supervisord starts the server with the container's environment, so nothing exported here
# reaches it: the private krb5.conf travels through Jupyter's own configuration in /opt/conda/etc/jupyter.
# /etc/krb5.conf (the image's, also rewritten by %sm_analytics) is left alone. See lifecycle/README.md.
set -euo pipefail

REALM="${KERB_REALM:-CORP.EXAMPLE.COM}"
KDCS="${KERB_KDCS:-dc1.corp.example.com dc2.corp.example.com}"
ADMIN_SERVER="${KERB_ADMIN_SERVER:-}"
USER_DOMAIN="${KERB_USER_DOMAIN:-example.com}"
SECRET_ID="${KERB_SECRET_ID:-kerberos/keytabs/{user\}}"
CLUSTERS_JSON="${KERB_CLUSTERS_JSON:-{\}}"
IDENTITY_ORDER="${KERB_IDENTITY_ORDER:-\"studio_space\", \"sts\"}"
WHEELHOUSE="${KERB_WHEELHOUSE:-$HOME/kerb-jupyter-wheelhouse}"  # directory or s3://bucket/prefix
PIP_SPEC="${KERB_JUPYTER_PIP_SPEC:-kerb_jupyter}"
CONDA="${KERB_CONDA:-/opt/conda}"
LOAD_WAIT="${KERB_LOAD_WAIT:-90}"                                # seconds to wait for the restarted server

KJ="$HOME/.kerb_jupyter"
LOG="$KJ/install.log"
RECORD="$HOME/.jupyter/kerb_jupyter_install.json"
export PATH="$CONDA/bin:$PATH:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
mkdir -p "$KJ" "$HOME/.jupyter" && chmod 0700 "$KJ" "$HOME/.jupyter"
exec > >(tee -a "$LOG") 2>&1  # the LCC stream (CloudWatch) and a local copy

say() { echo "kerb_jupyter: $*"; }
record() {
    python3 -c 'import json, sys, time
json.dump({"status": sys.argv[1], "message": sys.argv[2], "platform": "studio", "log": sys.argv[3],
           "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, open(sys.argv[4], "w"))' \
        "$1" "$2" "$LOG" "$RECORD" || true
    say "$1: $2"
}
stop() { record failed "$1"; exit 0; }  # never block the space from starting: the outcome is recorded

# A shared space would hand the owner's ticket to every collaborator.
if [[ "$IDENTITY_ORDER" == *studio_space* ]] && grep -qa -- '--collaborative' /proc/[0-9]*/cmdline 2>/dev/null; then
    stop "this is a shared space (the server runs with --collaborative): the studio_space identity would give \
every collaborator the owner's ticket. kerb_jupyter is not set up here; use a private space"
fi

[ -w "$CONDA/bin" ] || stop "$CONDA is missing or not writable by $(id -un): this image is not a SageMaker \
Distribution image; install kerb_jupyter into the image instead"

missing=()
command -v kinit >/dev/null || missing+=(krb5-user)
ldconfig -p 2>/dev/null | grep 'libgssapi_krb5.so.2 ' >/dev/null || missing+=(libgssapi-krb5-2)
if ((${#missing[@]})); then
    if ! sudo -n true 2>/dev/null; then
        stop "missing ${missing[*]} and no sudo in this image: use an image with the MIT Kerberos client"
    fi
    say "installing ${missing[*]} with apt"
    timeout 90 sudo -n apt-get update -qq || say "warning: apt-get update failed (no internet?)"
    timeout 90 sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" ||
        stop "apt-get could not install ${missing[*]}"
else
    say "Kerberos client present (no apt)"
fi

pip_args=()
if [[ "$WHEELHOUSE" == s3://* ]]; then
    timeout 60 aws s3 sync --only-show-errors "$WHEELHOUSE" "$KJ/wheelhouse" || stop "cannot read $WHEELHOUSE"
    pip_args=(--no-index --find-links "$KJ/wheelhouse")
elif [ -d "$WHEELHOUSE" ]; then
    pip_args=(--no-index --find-links "$WHEELHOUSE")
elif ! timeout 20 "$CONDA/bin/python" -m pip download -q --no-deps --timeout 5 --retries 0 -d "$KJ/probe" \
        "$PIP_SPEC" >/dev/null 2>&1; then
    stop "the package index is unreachable (VPC-only domain without NAT?) and there is no wheelhouse: build one \
with 'kerb-jupyter wheelhouse DIR' and put it at $WHEELHOUSE or on S3"
fi
say "pip source: ${pip_args[*]:-the package index}"

versions() { "$1/bin/python" -c 'import importlib.metadata as m
for p in ("krb5", "gssapi", "kerb_jupyter"):
    try: print(f"{p} {m.version(p)}", end="; ")
    except m.PackageNotFoundError: print(f"{p} -", end="; ")'; }

changed=""
for env in "$CONDA" "$HOME"/.conda/envs/*; do
    [ -x "$env/bin/python" ] || continue
    before="$(versions "$env")"
    say "$env before: $before"
    "$env/bin/python" -m pip install -q --disable-pip-version-check "${pip_args[@]}" \
        --only-binary=krb5,gssapi,psycopg-binary "$PIP_SPEC" || stop "pip could not install $PIP_SPEC into $env"
    after="$(versions "$env")"
    if [ "$before" != "$after" ]; then
        # The image pins krb5<0.6; kerb_jupyter needs a newer one: replaced on purpose, said here.
        say "$env after: $after (replaced on purpose where the versions differ)"
        [ "$env" != "$CONDA" ] || changed=yes
    fi
    "$env/bin/python" -m pip check || say "warning: pip check reports conflicts in $env (above)"
done

read -ra kdcs <<< "$KDCS"
kdc_args=()
for kdc in "${kdcs[@]}"; do kdc_args+=(--kdc "$kdc"); done
[ -z "$ADMIN_SERVER" ] || kdc_args+=(--admin-server "$ADMIN_SERVER")
"$CONDA/bin/kerb-jupyter" krb5-conf --realm "$REALM" "${kdc_args[@]}" --domain "${REALM,,}" > "$KJ/krb5.conf.new"
replace() { if cmp -s "$1.new" "$1"; then rm "$1.new"; else mv "$1.new" "$1"; changed=yes; fi; }
replace "$KJ/krb5.conf"

# XDG_RUNTIME_DIR is unset in Studio: keep the ticket cache on a tmpfs, not on the persistent EBS home.
state="${XDG_RUNTIME_DIR:+$XDG_RUNTIME_DIR/kerb_jupyter}"
if [ -z "$state" ] && [ "$(stat -f -c %T /dev/shm 2>/dev/null)" = tmpfs ]; then state="/dev/shm/kerb_jupyter-$(id -u)"; fi
state="${state:-$HOME/.local/state/kerb_jupyter}"
conf="$HOME/.jupyter/kerb_jupyter.json"
cat > "$conf.new" <<JSON
{
  "identity": {"order": [$IDENTITY_ORDER]},
  "mapping": {"rules": [{"template": "{local}@$REALM", "case": "lower", "domain": "$USER_DOMAIN"}]},
  "source": {"type": "secretsmanager_keytab", "secret_id": "$SECRET_ID"},
  "state_dir": "$state",
  "clusters": $CLUSTERS_JSON
}
JSON
chmod 0600 "$conf.new"
replace "$conf"

# The server and its kernels get KRB5_CONFIG from Jupyter's configuration (Python config files run in the server).
jconf="$CONDA/etc/jupyter/jupyter_server_config.py"
mkdir -p "$(dirname "$jconf")"
if ! grep -q '# kerb_jupyter: private krb5.conf' "$jconf" 2>/dev/null; then
    cat >> "$jconf" <<PY

# kerb_jupyter: private krb5.conf for the server and its kernels (/etc/krb5.conf is left to the image)
import os as _kj_os
_kj_os.environ["KRB5_CONFIG"] = "$KJ/krb5.conf"
PY
    changed=yes
fi

loaded() {  # [old pid]: a server other than that one answers for kerb_jupyter; prints its pid
    "$CONDA/bin/kerb-jupyter" doctor --only extension --json 2>/dev/null | python3 -c 'import json, sys
p = [x for x in json.load(sys.stdin).get("pids", []) if str(x) != sys.argv[1]]
print(p[0]) if p else sys.exit(1)' "${1:-none}"
}
old="$(loaded)" || old=""
if [ -z "$changed" ] && [ -n "$old" ]; then
    record ok "already installed and loaded; the server was not restarted"
    exit 0
fi
say "restarting the Jupyter server (kernels already running are interrupted)"
restart-jupyter-server || stop "restart-jupyter-server failed: restart the space to load kerb_jupyter"
for _ in $(seq 1 "$LOAD_WAIT"); do
    sleep 1
    if loaded "$old" >/dev/null; then record ok "installed; the extension is loaded"; exit 0; fi
done
stop "installed, but the running server does not answer for kerb_jupyter: see /var/log/apps/app_container.log"
