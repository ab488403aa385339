#!/bin/bash
# A SageMaker notebook instance (notebook-al2023-v1) faked on this machine's own root, inside mount and PID
# namespaces: overlays make /etc, /var, /usr/local fresh at each boot, /home and /run are tmpfs, and only
# /home/ec2-user/SageMaker persists. The lifecycle runner is root in / with SageMaker's PATH, runs a temporary
# copy of the script that it deletes the moment the script exits, with a 300 s limit; its output is the "CloudWatch
# stream". Usage (as root): unshare --mount --pid --fork --mount-proc bash notebook-instance.sh MODE WORK
# MODE: main (boot, run, same-boot re-run during the install, checks, reboot, run, checks, re-run) | once |
# notebookapp (the classic NotebookApp platform)
set -uo pipefail
mode="$1" work="$2"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$work/out"
mkdir -p "$out" "$work/SageMaker"
mount --make-rprivate /
if [ -d /root/.pyenv ]; then  # this machine's Python lives under /root (0700): expose just it, as an image would
    mkdir -p "$work/pyenv" && mount --bind /root/.pyenv "$work/pyenv"
    mount -t tmpfs -o mode=0755 tmpfs /root && mkdir /root/.pyenv && mount --move "$work/pyenv" /root/.pyenv
fi

boot() {  # n
    local b="$work/boot$1"
    mkdir -p "$b"/{etc,var,usr}/{u,w}
    mount -t overlay overlay -o "lowerdir=/etc,upperdir=$b/etc/u,workdir=$b/etc/w" /etc
    mount -t overlay overlay -o "lowerdir=/var,upperdir=$b/var/u,workdir=$b/var/w" /var
    mount -t overlay overlay -o "lowerdir=/usr/local,upperdir=$b/usr/u,workdir=$b/usr/w" /usr/local
    mount -t tmpfs tmpfs /run
    mount -t tmpfs tmpfs /home
    mkdir -p /opt/ml && mount -t tmpfs tmpfs /opt/ml
    cat > /etc/os-release <<'OS'
NAME="Amazon Linux"
VERSION="2023"
ID="amzn"
VERSION_ID="2023"
PRETTY_NAME="Amazon Linux 2023.9.20261101"
OS
    sed -i '/:x:1000:/d' /etc/passwd /etc/group
    echo "ec2-user:x:1000:1000:EC2 Default User:/home/ec2-user:/bin/bash" >> /etc/passwd
    echo "ec2-user:x:1000:" >> /etc/group
    rm -f /etc/pip.conf /etc/krb5.conf
    install -m 0755 "$here/systemctl" "$here/dnf" /usr/local/bin/
    mkdir -p /opt/ml/metadata
    echo '{"ResourceArn": "arn:aws:sagemaker:eu-west-1:123456789012:notebook-instance/fake", "ResourceName": "fake"}' \
        > /opt/ml/metadata/resource-metadata.json
    install -d -o 1000 -g 1000 /home/ec2-user /home/ec2-user/SageMaker
    mount --bind "$work/SageMaker" /home/ec2-user/SageMaker
    cp -a "$work/template/anaconda3/." /home/ec2-user/anaconda3  # the image's conda, fresh at each boot
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' \
        > /etc/fake-jupyter-port
    systemctl start jupyter-server.service
}

shutdown() {
    kill -KILL -1 2>/dev/null  # every process of this "machine" but us
    sleep 0.5
    umount /home/ec2-user/SageMaker /home /opt/ml /run /usr/local /var /etc
}

runner() {  # name: run the lifecycle script as SageMaker does
    local tmp rc
    tmp="$(mktemp /tmp/lcc-XXXXXX)"
    cp "$work/script.sh" "$tmp"
    (cd / && exec env -i PATH=/sbin:bin:/usr/sbin:/usr/bin timeout 300 bash "$tmp") > "$out/$1.out" 2>&1
    rc=$?
    rm -f "$tmp"
    echo "$rc" > "$out/$1.rc"
}

wait_install() {  # until the background install is gone (the lock must then be free: checked below)
    timeout 200 bash -c 'while pgrep -f "^bash /var/lib/kerb-jupyter/lifecycle.sh" >/dev/null; do sleep 0.2; done'
}

# shellcheck disable=SC2129
checks() {  # name: the state after a run, one "key value" per line
    local f="$out/$1.checks" e
    : > "$f"
    for e in anaconda3 anaconda3/envs/JupyterSystemEnv anaconda3/envs/python3; do
        if runuser -u ec2-user -- "/home/ec2-user/$e/bin/python" -c 'import kerb_jupyter.magic' 2>/dev/null; then
            echo "import:$e ok" >> "$f"; else echo "import:$e missing" >> "$f"; fi
        echo "dist-info:$e $(find "/home/ec2-user/$e/lib" -maxdepth 3 -name 'kerb_jupyter-*.dist-info' | wc -l)" >> "$f"
    done
    echo "enabled $(runuser -u ec2-user -- env HOME=/home/ec2-user /home/ec2-user/anaconda3/envs/JupyterSystemEnv/bin/python \
        -m jupyter_server extension list 2>&1 | grep -c 'kerb_jupyter.*enabled')" >> "$f"
    if runuser -u ec2-user -- env HOME=/home/ec2-user /home/ec2-user/anaconda3/envs/JupyterSystemEnv/bin/kerb-jupyter \
        doctor --only extension > "$out/$1.doctor" 2>&1; then echo "loaded yes" >> "$f"; else echo "loaded no" >> "$f"; fi
    echo "krb5.conf $(stat -c '%U %a' /etc/krb5.conf 2>&1)" >> "$f"
    echo "config $(stat -c '%U %a' /home/ec2-user/.jupyter/kerb_jupyter.json 2>&1)" >> "$f"
    echo "record $(python3 -c 'import json; print(json.load(open("/home/ec2-user/.jupyter/kerb_jupyter_install.json"))["status"])' 2>&1)" >> "$f"
    echo "root-owned $(find /home/ec2-user -uid 0 | wc -l)" >> "$f"
    echo "servers $(pgrep -u ec2-user -f -- '-m jupyter_server' | wc -l)" >> "$f"
    echo "server-starts $(wc -l < /var/log/fake-systemctl.log)" >> "$f"
    if flock -n /run/kerb-jupyter.lock true; then echo "lock free" >> "$f"; else echo "lock held" >> "$f"; fi
    echo "installs $(grep -c 'background install started' /var/log/kerb-jupyter/install.log 2>/dev/null)" >> "$f"
    cp /var/log/kerb-jupyter/install.log "$out/$1.install.log" 2>/dev/null
    find /home/ec2-user -uid 0 > "$out/$1.root-owned"
}

boot 1
case "$mode" in
    notebookapp)  # the JupyterLab 3 platform: classic NotebookApp 6.5 runs the server
        site="$(echo /home/ec2-user/anaconda3/envs/JupyterSystemEnv/lib/python3*/site-packages)"
        for dist in notebook-6.5.4 jupyterlab-3.6.3; do
            mkdir -p "$site/$dist.dist-info"
            printf 'Metadata-Version: 2.1\nName: %s\nVersion: %s\n' "${dist%-*}" "${dist##*-}" > "$site/$dist.dist-info/METADATA"
        done
        chown -R 1000:1000 "$site"
        runner run1
        wait_install
        checks run1 ;;
    once)
        runner run1
        wait_install
        checks run1 ;;
    main)
        runner run1 &
        first=$!
        # The same-boot re-run arrives while the first run's background install is still going.
        timeout 60 bash -c 'until grep -q "background install started" /var/log/kerb-jupyter/install.log 2>/dev/null; do sleep 0.1; done'
        runner run2
        wait "$first"
        wait_install
        checks run1
        shutdown
        boot 2
        runner run3
        wait_install
        checks run3
        runner run4
        wait_install
        checks run4 ;;
esac
shutdown
