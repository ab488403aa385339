#!/bin/bash
# A SageMaker Studio JupyterLab space (SageMaker Distribution) faked on this machine's root inside mount and PID
# namespaces: sagemaker-user (1000:100) owns /opt/conda and the image's /etc/krb5.conf; /opt, /etc, /usr/local and
# /run are fresh at each app start, the home directory persists (with ~/.conda/envs/myenv); a supervisord stand-in
# runs the server with the container's environment and restarts it; restart-jupyter-server returns at once.
# Usage (as root): unshare --mount --pid --fork --mount-proc bash studio.sh MODE WORK
# MODE: main (start, run, checks, app restart, run, checks, re-run) | shared | nosudo
set -uo pipefail
mode="$1" work="$2"
out="$work/out"
mkdir -p "$out" "$work/home"
mount --make-rprivate /
if [ -d /root/.pyenv ]; then  # this machine's Python lives under /root (0700): expose just it, as an image would
    mkdir -p "$work/pyenv" && mount --bind /root/.pyenv "$work/pyenv"
    mount -t tmpfs -o mode=0755 tmpfs /root && mkdir /root/.pyenv && mount --move "$work/pyenv" /root/.pyenv
fi
H=/home/sagemaker-user
container_env=(HOME="$H" PATH=/opt/conda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
               AWS_REGION=eu-west-1 SAGEMAKER_SPACE_NAME=fake-space SAGEMAKER_APP_TYPE=JupyterLab
               AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/fake)

fix_shebangs() {  # dir old new
    for f in "$1"/bin/*; do
        if [ -f "$f" ] && [ ! -L "$f" ] && head -c2 "$f" | grep -q '#!'; then sed -i "1s|$2|$3|" "$f"; fi
    done
}

start_app() {  # n
    local b="$work/app$1" tpl="$work/template/anaconda3"
    mkdir -p "$b"/{etc,usr,bin}/{u,w}
    mount -t overlay overlay -o "lowerdir=/etc,upperdir=$b/etc/u,workdir=$b/etc/w" /etc
    mount -t overlay overlay -o "lowerdir=/usr/local,upperdir=$b/usr/u,workdir=$b/usr/w" /usr/local
    mount -t overlay overlay -o "lowerdir=/usr/bin,upperdir=$b/bin/u,workdir=$b/bin/w" /usr/bin
    mount -t tmpfs tmpfs /run
    mount -t tmpfs tmpfs /opt
    mount -t tmpfs tmpfs /dev/shm
    mount -t tmpfs tmpfs /home
    sed -i '/:x:1000:/d' /etc/passwd
    echo "sagemaker-user:x:1000:100::$H:/bin/bash" >> /etc/passwd
    rm -f /etc/pip.conf
    printf '[libdefaults]\n    default_realm = IMAGE.EXAMPLE\n' > /etc/krb5.conf  # the image's, the user's file
    chown 1000:100 /etc/krb5.conf
    install -d -o 1000 -g 100 "$H" && mount --bind "$work/home" "$H"
    cp -a "$tpl/envs/JupyterSystemEnv/." /opt/conda
    fix_shebangs /opt/conda /home/ec2-user/anaconda3/envs/JupyterSystemEnv /opt/conda
    chown -R 1000:100 /opt/conda
    if [ ! -d "$H/.conda/envs/myenv" ]; then  # persistent: created once, by the user, long ago
        mkdir -p "$H/.conda/envs" && cp -a "$tpl/envs/python3" "$H/.conda/envs/myenv"
        fix_shebangs "$H/.conda/envs/myenv" /home/ec2-user/anaconda3/envs/python3 "$H/.conda/envs/myenv"
        chown -R 1000:100 "$H"
    fi
    [ "$mode" != nosudo ] || rm -f /usr/bin/kinit  # an image without the Kerberos client (an overlay whiteout)
    cat > /usr/local/bin/restart-jupyter-server <<'SH'
#!/bin/bash
# SMD's restart-jupyter-server: backgrounds the restart and returns at once.
(sleep 0.5; kill "$(cat /run/jupyterlabserver.pid)") > /dev/null 2>&1 < /dev/null &
SH
    cat > /usr/local/bin/fake-supervisord <<'SH'
#!/bin/bash
# supervisord's [program:jupyterlabserver]: the server with the container's environment, restarted when it exits.
port="$1"; shift
while [ ! -e /run/fake-supervisord.stop ]; do
    /opt/conda/bin/python -m jupyter_server --no-browser --ip=127.0.0.1 --port="$port" \
        --ServerApp.base_url=/jupyterlab/default --IdentityProvider.token='' --ServerApp.disable_check_xsrf=True \
        >> /run/jupyterlabserver.log 2>&1 &
    echo $! > /run/jupyterlabserver.pid
    echo "start $!" >> /run/fake-supervisord.log
    wait $!
done
SH
    chmod 0755 /usr/local/bin/restart-jupyter-server /usr/local/bin/fake-supervisord
    local extra=()
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    [ "$mode" != shared ] || extra=(--collaborative)
    rm -f "$H"/.local/share/jupyter/runtime/jpserver-*  # a stale one from the last app would look like a server
    (cd "$H" && setsid runuser -u sagemaker-user -- env -i "${container_env[@]}" bash /usr/local/bin/fake-supervisord \
        "$port" jupyter lab --port 8888 --ServerApp.base_url=/jupyterlab/default "${extra[@]}" < /dev/null &)
}

stop_app() {
    kill -KILL -1 2>/dev/null
    sleep 0.5
    umount -l "$H" /home /dev/shm /opt /run /usr/bin /usr/local /etc  # lazy: umount itself runs from /usr/bin
}

runner() {  # name: the LCC, as sagemaker-user with the container's environment, 300 s
    local tmp rc
    tmp="$(mktemp /tmp/lcc-XXXXXX)"
    cp "$work/script.sh" "$tmp" && chmod 0644 "$tmp"
    (cd "$H" && exec runuser -u sagemaker-user -- env -i "${container_env[@]}" timeout 300 bash "$tmp") > "$out/$1.out" 2>&1
    rc=$?
    rm -f "$tmp"
    echo "$rc" > "$out/$1.rc"
}

# shellcheck disable=SC2129
checks() {  # name
    local f="$out/$1.checks" e pid
    : > "$f"
    for e in /opt/conda "$H/.conda/envs/myenv"; do
        if runuser -u sagemaker-user -- "$e/bin/python" -c 'import kerb_jupyter.magic' 2>/dev/null; then
            echo "import:${e##*/} ok" >> "$f"; else echo "import:${e##*/} missing" >> "$f"; fi
    done
    if runuser -u sagemaker-user -- env -i "${container_env[@]}" /opt/conda/bin/kerb-jupyter doctor --only extension \
        > "$out/$1.doctor" 2>&1; then echo "loaded yes" >> "$f"; else echo "loaded no" >> "$f"; fi
    echo "etc-krb5.conf $(stat -c '%U %a' /etc/krb5.conf) $(grep -c IMAGE.EXAMPLE /etc/krb5.conf)" >> "$f"
    echo "private-krb5.conf $(stat -c '%U %a' "$H/.kerb_jupyter/krb5.conf" 2>&1)" >> "$f"
    # What a kernel the server starts gets (its environment is fixed at exec, unlike the server's own).
    pid="$(runuser -u sagemaker-user -- python3 - "$port" <<'PY'
import json, sys, time, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}/jupyterlab/default/api/kernels"
kernel = json.load(urllib.request.urlopen(urllib.request.Request(base, data=b"{}", method="POST"), timeout=60))
for _ in range(200):
    for proc in __import__("pathlib").Path("/proc").glob("[0-9]*"):
        try:
            if kernel["id"] in proc.joinpath("cmdline").read_text():
                print(proc.name)
                sys.exit(0)
        except OSError:
            pass
    time.sleep(0.1)
PY
)"
    echo "kernel-KRB5_CONFIG $(tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep '^KRB5_CONFIG=' | cut -d= -f2)" >> "$f"
    echo "state-dir $(python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("state_dir"))' \
        "$H/.jupyter/kerb_jupyter.json" 2>&1)" >> "$f"
    echo "record $(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["status"])' \
        "$H/.jupyter/kerb_jupyter_install.json" 2>&1)" >> "$f"
    echo "root-owned $(find "$H" -uid 0 | wc -l)" >> "$f"
    echo "server-starts $(wc -l < /run/fake-supervisord.log)" >> "$f"
    echo "config-blocks $(grep -c '# kerb_jupyter: private krb5.conf' /opt/conda/etc/jupyter/jupyter_server_config.py 2>/dev/null)" >> "$f"
    find "$H" -uid 0 > "$out/$1.root-owned"
    cp /run/jupyterlabserver.log "$out/$1.server.log" 2>/dev/null
}

wait_server() { timeout 60 bash -c 'until ls /home/sagemaker-user/.local/share/jupyter/runtime/jpserver-*.json >/dev/null 2>&1; do sleep 0.2; done'; }

start_app 1
wait_server
case "$mode" in
    main)
        runner run1
        checks run1
        stop_app
        start_app 2
        wait_server
        runner run2
        checks run2
        runner run3
        checks run3 ;;
    *)
        runner run1
        checks run1 ;;
esac
stop_app
