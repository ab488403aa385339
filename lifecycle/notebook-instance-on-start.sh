#!/bin/bash
# kerb_jupyter on a SageMaker notebook instance (Amazon Linux 2023; AL2 too): lifecycle configuration, OnStart.
# The runner starts this as root in / with PATH=/sbin:bin:/usr/sbin:/usr/bin from a temporary file it deletes
# when this exits, and allows 5 minutes. The install runs in the background from a copy of this script, under a
# lock; its log is echoed here while the runner waits, then stays in $LOG, and its outcome is recorded for
# `kerb-jupyter doctor`. Edit the settings below; see lifecycle/README.md.
set -euo pipefail

REALM="${KERB_REALM:-CORP.EXAMPLE.COM}"                         # the AD realm
KDCS="${KERB_KDCS:-dc1.corp.example.com dc2.corp.example.com}"  # domain controllers, space-separated
ADMIN_SERVER="${KERB_ADMIN_SERVER:-}"                           # kpasswd/admin server (default: the first KDC)
OWNER_TAG="${KERB_OWNER_TAG:-owner}"                            # instance tag naming its user
USER_DOMAIN="${KERB_USER_DOMAIN:-example.com}"                  # e-mail domain of the owner tag's values
SECRET_ID="${KERB_SECRET_ID:-kerberos/keytabs/{user\}}"         # Secrets Manager keytab per user (template)
CLUSTERS_JSON="${KERB_CLUSTERS_JSON:-{\}}"                      # {"name": {"host": ..., "port": ..., "dbname": ...}}
WHEELHOUSE="${KERB_WHEELHOUSE:-/home/ec2-user/SageMaker/kerb-jupyter-wheelhouse}"  # directory or s3://bucket/prefix
PIP_SPEC="${KERB_JUPYTER_PIP_SPEC:-kerb_jupyter}"
WAIT="${KERB_WAIT:-240}"                                        # seconds the runner shows the log (limit: 300)

NB_USER=ec2-user
NB_HOME=/home/ec2-user
CONDA="$NB_HOME/anaconda3"
SERVER_ENV="$CONDA/envs/JupyterSystemEnv"
WORK=/var/lib/kerb-jupyter
LOG=/var/log/kerb-jupyter/install.log
LOCK=/run/kerb-jupyter.lock
RECORD="$NB_HOME/.jupyter/kerb_jupyter_install.json"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "kerb_jupyter: $*"; }
as_user() { runuser -u "$NB_USER" -- env HOME="$NB_HOME" PATH="$PATH" "$@"; }

record() {  # status message: the outcome the doctor and the status page show
    install -d -m 0700 -o "$NB_USER" -g "$NB_USER" "$NB_HOME/.jupyter"
    as_user python3 -c 'import json, sys, time
json.dump({"status": sys.argv[1], "message": sys.argv[2], "platform": "notebook-instance", "log": sys.argv[3],
           "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, open(sys.argv[4], "w"))' \
        "$1" "$2" "$LOG" "$RECORD" || say "warning: could not write $RECORD"
    say "$1: $2"
}

fail() { record failed "$1"; exit 1; }

foreground() {
    install -d -m 0755 "$WORK" "$(dirname "$LOG")"
    exec 9>"$LOCK"
    if ! flock -n 9; then
        say "an install started earlier during this boot is still running; leaving it to finish (log: $LOG)"
        exit 0
    fi
    # The runner deletes this file when we exit: the background job runs from its own copy.
    install -m 0700 "${BASH_SOURCE[0]}" "$WORK/lifecycle.sh"
    : > "$LOG"
    setsid bash "$WORK/lifecycle.sh" --background >> "$LOG" 2>&1 < /dev/null &
    local bg=$!
    exec 9>&-  # the background job keeps the lock
    say "installing in the background (pid $bg); its log follows for up to $WAIT s, then stays in $LOG"
    timeout "$WAIT" tail -n +1 -f --pid="$bg" "$LOG" || true
    if kill -0 "$bg" 2>/dev/null; then
        say "still installing after $WAIT s; the outcome will be in $LOG and $RECORD (kerb-jupyter doctor shows it)"
    fi
    exit 0  # never fail the notebook's start: the outcome is recorded
}

system_packages() {
    local pm="" missing=()
    if command -v dnf >/dev/null; then pm=dnf; elif command -v yum >/dev/null; then pm=yum; fi
    # shellcheck disable=SC1091
    say "system: $(. /etc/os-release 2>/dev/null && echo "${PRETTY_NAME:-unknown}"), package manager: ${pm:-none}"
    command -v kinit >/dev/null || missing+=(krb5-workstation)
    ldconfig -p | grep 'libgssapi_krb5.so.2 ' >/dev/null || missing+=(krb5-libs)
    ((${#missing[@]})) || { say "Kerberos client packages present"; return 0; }
    [ -n "$pm" ] || fail "missing ${missing[*]} and neither dnf nor yum is available"
    say "$pm install ${missing[*]}"
    if ! timeout 120 "$pm" install -y -q "${missing[@]}"; then
        ldconfig -p | grep 'libgssapi_krb5.so.2 ' >/dev/null || fail "$pm could not install ${missing[*]} (no repository access?)"
        say "warning: $pm could not install ${missing[*]}; the libraries are present, going on"
    fi
}

pip_source() {  # sets PIP_ARGS
    PIP_ARGS=()
    if [[ "$WHEELHOUSE" == s3://* ]]; then
        say "fetching the wheelhouse $WHEELHOUSE"
        timeout 60 aws s3 sync --only-show-errors "$WHEELHOUSE" "$WORK/wheelhouse" || fail "cannot read $WHEELHOUSE"
        chmod -R a+rX "$WORK/wheelhouse"
        PIP_ARGS=(--no-index --find-links "$WORK/wheelhouse")
    elif [ -n "$WHEELHOUSE" ] && [ -d "$WHEELHOUSE" ]; then
        PIP_ARGS=(--no-index --find-links "$WHEELHOUSE")
    else
        say "no wheelhouse at '$WHEELHOUSE': probing the package index (5 s)"
        if ! timeout 20 "$SERVER_ENV/bin/python" -m pip download -q --no-deps --timeout 5 --retries 0 \
                -d "$WORK/probe" "$PIP_SPEC" >/dev/null 2>&1; then
            fail "the package index is unreachable (DirectInternetAccess disabled, no NAT?) and there is no \
wheelhouse: build one with 'kerb-jupyter wheelhouse DIR' and put it at $WHEELHOUSE or on S3"
        fi
        say "warning: installing from the package index: krb5 and gssapi compile (gcc, krb5-devel; ~2 min)"
    fi
    say "pip source: ${PIP_ARGS[*]:-the package index}"
}

kernel_envs() {  # base, JupyterSystemEnv, every conda env, and envs registered from ~/SageMaker
    local py
    echo "$CONDA"
    for env in "$CONDA"/envs/*/; do echo "${env%/}"; done
    for spec in "$NB_HOME"/.local/share/jupyter/kernels/*/kernel.json; do
        [ -f "$spec" ] || continue
        py="$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["argv"][0])' "$spec" 2>/dev/null)" || continue
        [[ "$py" == */bin/python* ]] && echo "${py%/bin/python*}"
    done
}

install_into() {  # env
    local env="$1" out
    [ -x "$env/bin/python" ] || return 0
    say "pip install into $env (as $NB_USER)"
    if out="$(as_user "$env/bin/python" -m pip install -q --disable-pip-version-check "${PIP_ARGS[@]}" \
            --only-binary=krb5,gssapi,psycopg-binary "$PIP_SPEC" 2>&1)"; then
        return 0
    fi
    echo "$out" | tail -5
    say "no prebuilt wheel fits $env ($("$env/bin/python" -V 2>&1)): trying to compile krb5 and gssapi (gcc, krb5-devel)"
    as_user "$env/bin/python" -m pip install -q --disable-pip-version-check "${PIP_ARGS[@]}" "$PIP_SPEC"
}

configure() {  # prints "changed" when krb5.conf or the configuration changed
    local kdc_args=() conf new
    read -ra kdcs <<< "$KDCS"
    for kdc in "${kdcs[@]}"; do kdc_args+=(--kdc "$kdc"); done
    [ -z "$ADMIN_SERVER" ] || kdc_args+=(--admin-server "$ADMIN_SERVER")
    new="$("$SERVER_ENV/bin/kerb-jupyter" krb5-conf --realm "$REALM" "${kdc_args[@]}" --domain "${REALM,,}")"
    if [ "$new" != "$(cat /etc/krb5.conf 2>/dev/null)" ]; then
        printf '%s\n' "$new" > /etc/krb5.conf.kerb_jupyter && chmod 0644 /etc/krb5.conf.kerb_jupyter
        mv /etc/krb5.conf.kerb_jupyter /etc/krb5.conf && echo changed
    fi
    conf="$NB_HOME/.jupyter/kerb_jupyter.json"
    new="$(cat <<JSON
{
  "identity": {"order": ["notebook_tag"], "owner_tag": "$OWNER_TAG"},
  "mapping": {"rules": [{"template": "{local}@$REALM", "case": "lower", "domain": "$USER_DOMAIN"}]},
  "source": {"type": "secretsmanager_keytab", "secret_id": "$SECRET_ID"},
  "clusters": $CLUSTERS_JSON
}
JSON
)"
    install -d -m 0700 -o "$NB_USER" -g "$NB_USER" "$NB_HOME/.jupyter"
    if [ "$new" != "$(cat "$conf" 2>/dev/null)" ]; then
        printf '%s\n' "$new" | as_user tee "$conf.tmp" >/dev/null
        chmod 0600 "$conf.tmp" && mv "$conf.tmp" "$conf" && echo changed
    fi
}

loaded() {  # [old pid]: a server other than that one answers for kerb_jupyter; prints its pid
    as_user "$SERVER_ENV/bin/kerb-jupyter" doctor --only extension --json 2>/dev/null |
        python3 -c 'import json, sys; p = [x for x in json.load(sys.stdin).get("pids", []) if str(x) != sys.argv[1]]
print(p[0]) if p else sys.exit(1)' "${1:-none}"
}

background() {
    set -E
    trap 'record failed "the install stopped unexpectedly (line $LINENO); see $LOG"' ERR
    say "background install started $(date -u +%FT%TZ), pid $$"
    record running "installing (log: $LOG)"
    system_packages
    SERVER_APP="$("$SERVER_ENV/bin/python" - <<'PY'
import importlib.metadata as m
def major(name):
    try:
        return int(m.version(name).split(".")[0])
    except (m.PackageNotFoundError, ValueError):
        return None
server, lab, nb = major("jupyter_server"), major("jupyterlab"), major("notebook")
classic = server is None or (lab is not None and lab < 4 and nb is not None and nb < 7)
print("notebook" if classic else "jupyter_server")
PY
)"
    say "server application: $SERVER_APP"
    pip_source
    local before after changed=""
    before="$("$SERVER_ENV/bin/python" -m pip show kerb_jupyter 2>/dev/null | sed -n "s/^Version: //p" || true)"
    local pids=() envs=() status
    while read -r env; do  # kernel envs in parallel (the 5-minute limit), each pip's output kept together
        [ "$env" != "$SERVER_ENV" ] || continue
        install_into "$env" > "$WORK/pip.${#envs[@]}.log" 2>&1 &
        pids+=($!) envs+=("$env")
    done < <(kernel_envs | sort -u)
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" && status=0 || status=$?
        cat "$WORK/pip.$i.log"
        [ "$status" -eq 0 ] || fail "pip could not install $PIP_SPEC into ${envs[$i]}"
    done
    install_into "$SERVER_ENV" || fail "pip could not install $PIP_SPEC into the server env $SERVER_ENV"
    after="$("$SERVER_ENV/bin/python" -m pip show kerb_jupyter 2>/dev/null | sed -n "s/^Version: //p" || true)"
    [ "$before" = "$after" ] || changed=yes
    [ -z "$(configure)" ] || changed=yes
    if [ "$SERVER_APP" = notebook ]; then
        fail "this instance's server is the classic NotebookApp (notebook < 7, JupyterLab < 4): the server extension \
needs jupyter_server (platform notebook-al2023-v1 or al2-v3). The %kerbsql magic is installed in the kernels."
    fi
    local old
    old="$(loaded)" || old=""
    if [ -z "$changed" ] && [ -n "$old" ]; then
        record ok "already installed and loaded; the server was not restarted"
        return 0
    fi
    say "restarting the Jupyter server (kernels already running are interrupted)"
    # The server must not inherit the lock (fd 9), or it would hold it for as long as it runs.
    systemctl --no-block restart jupyter-server.service 9>&- || fail "systemctl could not restart jupyter-server"
    for _ in $(seq 1 90); do
        if loaded "$old" >/dev/null; then record ok "installed $after; the extension is loaded"; return 0; fi
        sleep 1
    done
    fail "installed, but the running server does not answer for kerb_jupyter: see /var/log/jupyter.log"
}

if [ "${1:-}" = "--background" ]; then
    background  # holds the lock on the fd 9 it inherited
else
    foreground
fi
