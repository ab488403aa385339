"""Issue 14's attacks: another account's links and files, look-alikes, options that undo GSSAPI, secrets in logs."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import boto3
import pytest
from conftest import write_config
from helpers import start_extensions, wait_state
from moto import mock_aws
from tornado.httpclient import HTTPClientError

from kerb_jupyter import ConfigError, CredentialsRejectedError, IdentityError
from kerb_jupyter.core import tickets
from kerb_jupyter.core.config import FORBIDDEN_OPTIONS, parse_settings
from kerb_jupyter.core.identity import IdentityResolver
from kerb_jupyter.core.mapping import map_identity
from kerb_jupyter.server.keeper import TicketKeeper
from kerb_jupyter.server.sources import ExistingCacheSource, KeytabSource, SecretsManagerSource
from kerb_jupyter.sql import audit, db

OTHER_UID = 65534  # nobody: the hostile neighbour

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a second OS account needs root to switch to")


def as_other_user(code: str, **values: Path | str) -> None:
    """Run Python ``code`` as the unprivileged account (its own process, setuid by the kernel), with ``values``
    given to it as string variables."""
    prelude = "".join(f"{k} = {str(v)!r}\n" for k, v in values.items())
    subprocess.run(["/usr/bin/python3", "-c", "import os\n" + prelude + code], user=OTHER_UID, group=OTHER_UID,
                   extra_groups=[], check=True, cwd="/", env={"PATH": "/usr/bin:/bin"})


@pytest.fixture
def shared(tmp_path):
    """A directory every account may write to (a leftover with loose modes; not sticky, so the kernel's
    protected_symlinks/protected_regular do not step in) and a victim file where an attacker wants our writes."""
    d = Path(tempfile.mkdtemp(prefix="kj-shared-", dir="/tmp"))
    d.chmod(0o777)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    victim.chmod(0o666)  # the attacker cannot open it, but may aim our writes at it through a symlink
    yield d, victim
    shutil.rmtree(d, ignore_errors=True)


def keeper(sandbox, state_dir: Path, source=None) -> TicketKeeper:
    return TicketKeeper(sandbox.principal, source or KeytabSource(sandbox.keytab), state_dir / "krb5cc",
                        state_dir / "state.json", retry_interval=0.3, max_retry_interval=0.6)


# -- 1. state files no one else can redirect -------------------------------------------------------------------
@needs_root
def test_a_state_dir_that_is_someone_elses_symlink_is_refused(sandbox, shared):
    d, _victim = shared
    as_other_user("os.mkdir(d + '/mine', 0o777); os.symlink(d + '/mine', d + '/state')", d=d)
    k = keeper(sandbox, d / "state")
    k.step()
    assert k.state.state == "error" and k.state.last_error["code"] == "unsafe_directory"
    assert f"{d / 'state'} is a symbolic link" in k.state.last_error["message"]
    assert os.listdir(d / "mine") == []  # no ticket, no state file where the attacker wanted them


@needs_root
def test_a_state_dir_owned_by_another_account_is_refused(sandbox, shared):
    d, _ = shared
    as_other_user("os.mkdir(d + '/state', 0o755)", d=d)
    k = keeper(sandbox, d / "state")
    k.step()
    assert k.state.state == "error"
    assert f"belongs to uid {OTHER_UID}, not to this user" in k.state.last_error["message"]
    assert os.listdir(d / "state") == []


@needs_root
def test_a_loose_state_dir_is_refused_not_tightened_and_planted_links_are_never_followed(sandbox, shared):
    d, victim = shared
    state = d / "state"
    state.mkdir()
    state.chmod(0o777)  # a leftover with loose modes: the neighbour plants links to our victim file
    planted = ["krb5cc", ".krb5cc.copy", "state.json", f".state.json.{os.getpid()}", ".keytab.1"]
    as_other_user("for n in names.split(','): os.symlink(victim, state + '/' + n)", state=state, victim=victim,
                  names=",".join(planted))
    k = keeper(sandbox, state)
    k.step()
    assert k.state.state == "error" and "is writable by group and others (mode 777)" in k.state.last_error["message"]
    assert stat.S_IMODE(state.stat().st_mode) == 0o777  # not silently changed to 0700 and used
    assert all((state / n).is_symlink() for n in planted)
    assert victim.read_text() == "precious\n"


def test_writes_replace_planted_symlinks_instead_of_following_them(sandbox, tmp_path):
    # Even in a private directory (where only root or we could have planted them), every file we write is new.
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    outside = tmp_path / "outside"
    outside.write_text("outside\n")
    for name in ("krb5cc", "state.json", ".krb5cc.copy"):
        (state / name).symlink_to(outside)
    kinit = tmp_path / "kinit" / "cc"
    tickets.acquire_with_keytab(sandbox.principal, sandbox.keytab, kinit)
    for source in (ExistingCacheSource(kinit), KeytabSource(sandbox.keytab)):
        k = keeper(sandbox, state, source)
        k.step(force=True)
        assert k.state.state == "valid", k.state.last_error
    for name in ("krb5cc", "state.json"):
        assert (state / name).is_file() and not (state / name).is_symlink()
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600
    assert outside.read_text() == "outside\n"
    assert tickets.read_cache(state / "krb5cc").principal == sandbox.principal


@needs_root
@pytest.mark.parametrize("plant", ["symlink", "other_owner", "hardlink"])
def test_the_audit_log_refuses_links_and_other_peoples_files(shared, tmp_path, plant):
    d, victim = shared
    log = d / "audit.jsonl"
    if plant == "symlink":
        as_other_user("os.symlink(victim, log)", victim=victim, log=log)
        why = "symbolic link"
    elif plant == "other_owner":
        as_other_user("open(log, 'w').close(); os.chmod(log, 0o666)", log=log)
        why = f"belongs to uid {OTHER_UID}"
    else:
        mine = d / "mine.jsonl"
        mine.write_text("")
        mine.chmod(0o600)
        os.link(mine, log)
        why = "2 hard links"
    with pytest.raises(OSError) as err:
        audit.record(log, statement="SELECT 1", principal="alice@KERB.TEST", outcome="ok")
    assert why in err.value.strerror
    assert victim.read_text() == "precious\n"


def test_the_audit_log_is_created_private(tmp_path):
    log = tmp_path / "new" / "audit.jsonl"
    audit.record(log, statement="SELECT 1", outcome="ok")
    assert stat.S_IMODE(log.stat().st_mode) == 0o600 and json.loads(log.read_text())["outcome"] == "ok"


# -- 6. a keytab from Secrets Manager never touches disk; no secret reaches any log -----------------------------
@pytest.fixture
def aws_env(monkeypatch):
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    with mock_aws():
        yield boto3.client("secretsmanager", region_name="us-east-1")


@pytest.mark.parametrize("form", ["binary", "string"])
def test_secrets_manager_keytab_stays_in_memory_and_out_of_every_log(sandbox, tmp_path, aws_env, caplog, form):
    raw = sandbox.keytab.read_bytes()
    encoded = base64.b64encode(raw).decode()
    if form == "binary":
        aws_env.create_secret(Name="kt/alice", SecretBinary=raw)
    else:
        aws_env.create_secret(Name="kt/alice", SecretString=encoded)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / ".keytab.4242").write_bytes(raw)  # what an older version left after a kill -9
    (state / ".keytab.4242").chmod(0o600)
    outside = tmp_path / "outside"
    outside.write_bytes(b"outside")
    (state / ".keytab.4243").symlink_to(outside)
    caplog.set_level(logging.DEBUG)  # the root logger and every library under it at DEBUG
    k = keeper(sandbox, state, SecretsManagerSource("kt/{user}", "keytab", region="us-east-1"))
    k.step()
    assert k.state.state == "valid", k.state.last_error
    assert sorted(p.name for p in state.iterdir()) == [".keytab.4243", "krb5cc", "state.json"]
    assert outside.read_bytes() == b"outside"  # a planted link is left alone: neither followed nor removed
    for path in state.iterdir():
        if path.is_file() and not path.is_symlink():
            assert raw[-40:] not in path.read_bytes()
    records = "\n".join(r.getMessage() for r in caplog.records)
    assert encoded[:24] not in records and raw.hex()[:24] not in records and encoded[-24:] not in records
    # Control: the same call without our guard does log the secret at DEBUG, so the assertion above can fail.
    caplog.clear()
    boto3.client("secretsmanager", region_name="us-east-1").get_secret_value(SecretId="kt/alice")
    assert any("botocore" in r.name for r in caplog.records)
    leaked = "\n".join(r.getMessage() for r in caplog.records)
    assert encoded[:24] in leaked or encoded[:24] in leaked.replace("\\n", "")


def test_a_secret_password_never_reaches_a_debug_log(sandbox, tmp_path, aws_env, caplog):
    password = "S3cret-" + os.urandom(6).hex()
    aws_env.create_secret(Name="pw/alice", SecretString=password)
    caplog.set_level(logging.DEBUG)
    k = keeper(sandbox, tmp_path / "state", SecretsManagerSource("pw/{user}", "password", region="us-east-1"))
    k.step()  # the KDC rejects this password for alice: the failure is logged, the password is not
    assert password not in json.dumps(k.state.as_dict())
    assert password not in caplog.text and base64.b64encode(password.encode()).decode() not in caplog.text


def test_bytes_that_are_not_a_keytab_are_rejected_clearly(tmp_path):
    for junk in (b"", b"\x05\x02", b"\x05\x02\x00\x00\x00\x30garbage", b"PK\x03\x04"):
        with pytest.raises(CredentialsRejectedError, match="is not a valid keytab"):
            tickets.acquire_with_keytab_data("alice@KERB.TEST", junk, tmp_path / "cc")


# -- 3. one identity, one principal ------------------------------------------------------------------------------
KELVIN, LONG_S, DOTLESS_I = "\u212a", "\u017f", "\u0131"
LOOKALIKES = [
    f"{KELVIN}ate@example.com",      # lower-cases to kate@example.com
    f"ro{LONG_S}e@example.com",      # upper-cases to ROSE@EXAMPLE.COM
    f"adm{DOTLESS_I}n@example.com",  # upper-cases to ADMIN@EXAMPLE.COM
    "ｋate@example.com",             # fullwidth k: NFKC makes it k
]
RULE_KINDS = {
    "table": {"table": {"kate@example.com": "kate@CORP.TEST", "ROSE@EXAMPLE.COM": "rose@CORP.TEST",
                        "ADMIN@example.com": "admin@CORP.TEST"}},
    "table_exact": {"table": {"kate@example.com": "kate@CORP.TEST"}, "case_insensitive": False},
    "regex_i": {"regex": r"(?i)(?P<u>kate|rose|admin)@example\.com", "principal": "{u}@CORP.TEST", "case": "lower"},
    "regex_w": {"regex": r"(?P<u>\w+)@example\.com", "principal": "{u}@CORP.TEST"},
    "template_domain": {"template": "{local}@CORP.TEST", "domain": "EXAMPLE.COM", "case": "upper"},
}


@pytest.mark.parametrize("kind", RULE_KINDS)
@pytest.mark.parametrize("name", LOOKALIKES)
def test_a_lookalike_identity_maps_to_nobody(kind, name):
    with pytest.raises(IdentityError) as err:
        map_identity(name, {"rules": [RULE_KINDS[kind]]})
    assert err.value.code == "bad_identity" and "non-ASCII" in str(err.value)


@pytest.mark.parametrize("kind", RULE_KINDS)
def test_the_ascii_names_still_map(kind):
    expected = {"table": "kate@CORP.TEST", "table_exact": "kate@CORP.TEST", "regex_i": "kate@CORP.TEST",
                "regex_w": "kate@CORP.TEST", "template_domain": "KATE@CORP.TEST"}[kind]
    assert map_identity("kate@example.com", {"rules": [RULE_KINDS[kind]]}) == expected


def test_lookalikes_are_refused_by_every_resolver_that_reads_a_name(monkeypatch, tmp_path):
    monkeypatch.setenv("JUPYTERHUB_USER", LOOKALIKES[0])
    with pytest.raises(IdentityError, match="non-ASCII"):
        IdentityResolver({"order": ["jupyterhub"]}).resolve()
    with pytest.raises(IdentityError, match="non-ASCII"):
        IdentityResolver({"order": ["config"], "user": LOOKALIKES[1], "require_trusted_identity": False}).resolve()


# -- 4. options that undo the security model -------------------------------------------------------------------
@pytest.mark.parametrize("key", sorted(FORBIDDEN_OPTIONS))
def test_every_forbidden_option_is_that_clusters_error(sandbox, key):
    spec = {**sandbox.cluster_config("analytics"), "options": {key: "x"}}
    settings = parse_settings({"clusters": {"bad": spec, "good": sandbox.cluster_config("analytics")}})
    bad = settings.cluster("bad")
    assert bad.error and f"clusters.bad.options.{key} is not allowed" in bad.error
    assert bad.public()["error"] == bad.error and settings.cluster("good").error is None
    with pytest.raises(ConfigError, match=f"options.{key} is not allowed"):
        db.conninfo(bad, "alice@KERB.TEST")


@pytest.mark.parametrize(("options", "why"), [
    ({"no_such_option": "1"}, "no_such_option is not a libpq connection parameter"),
    ({"Require_Auth": "password"}, "Require_Auth is not a libpq connection parameter"),
    ({"application_name": "a\x00b"}, "application_name contains a NUL character"),
])
def test_unknown_options_are_configuration_errors_naming_them(sandbox, options, why):
    spec = {**sandbox.cluster_config("analytics"), "options": options}
    assert why in (parse_settings({"clusters": {"c": spec}}).cluster("c").error or "")


def test_known_harmless_options_pass(sandbox):
    spec = {**sandbox.cluster_config("analytics"), "options": {"keepalives_idle": 30, "target_session_attrs": "any"}}
    cluster = parse_settings({"clusters": {"c": spec}}).cluster("c")
    assert cluster.error is None
    params = db.conninfo(cluster, "alice@KERB.TEST")
    assert params["keepalives_idle"] == "30" and params["require_auth"] == "gss"


# -- the check and the clusters list show a refused option as that cluster's error (real Jupyter server) --------
@pytest.fixture
def jp_server_config(kj_config, sandbox, request):
    clusters = {n: sandbox.cluster_config(n) for n in sandbox.servers}
    clusters["loose"] = {**sandbox.cluster_config("analytics"), "options": {"gssencmode": "disable"}}
    extra = {}
    if getattr(request, "param", None) == "loose_state_dir":
        state = kj_config.parent / "loose"
        state.mkdir()
        state.chmod(0o777)
        extra["state_dir"] = str(state)
    write_config(kj_config, sandbox, clusters=clusters, **extra)
    return {"ServerApp": {"jpserver_extensions": {"kerb_jupyter": True}},
            "KerbJupyterApp": {"config_file": str(kj_config), "retry_interval": 0.3}}


async def test_check_and_list_name_the_refused_option(jp_serverapp, jp_fetch):
    await start_extensions(jp_serverapp)
    await wait_state(jp_fetch, "valid")
    listing = json.loads((await jp_fetch("kerb-jupyter", "api", "clusters")).body)["clusters"]
    errors = {c["name"]: c["error"] for c in listing}
    assert errors["analytics"] is None and "options.gssencmode is not allowed" in errors["loose"]
    with pytest.raises(HTTPClientError) as caught:
        await jp_fetch("kerb-jupyter", "api", "clusters", "loose", "check", method="POST", body=b"")
    body = json.loads(caught.value.response.body)
    assert "clusters.loose.options.gssencmode is not allowed" in body["error"]["message"]
    assert "Traceback" not in caught.value.response.body.decode()
    ok = json.loads((await jp_fetch("kerb-jupyter", "api", "clusters", "analytics", "check", method="POST",
                                    body=b"")).body)
    assert ok["ok"] and ok["gss_authenticated"]


@pytest.mark.parametrize("jp_server_config", ["loose_state_dir"], indirect=True)
async def test_a_loose_state_dir_is_the_keepers_error_on_the_status_api(jp_serverapp, jp_fetch, kj_config):
    await start_extensions(jp_serverapp)
    doc = await wait_state(jp_fetch, "error")
    assert doc["last_error"]["code"] == "unsafe_directory"
    assert f"{kj_config.parent / 'loose'} is writable by group and others (mode 777)" in doc["last_error"]["message"]
    assert os.listdir(kj_config.parent / "loose") == []
