"""Identity resolvers (through boto3 against moto, or botocore's Stubber where moto has no Studio) and mapping
rules, as tables, including hostile input."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

import boto3
import botocore.session
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from kerb_jupyter import ConfigError, IdentityError
from kerb_jupyter.core.config import parse_settings
from kerb_jupyter.core.identity import IdentityResolver
from kerb_jupyter.core.mapping import map_identity

REGION = "us-east-1"


@pytest.fixture
def aws(monkeypatch):
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("JUPYTERHUB_USER", raising=False)
    with mock_aws():
        yield


def assumed_role_factory(role_name: str, session_name: str):
    iam = boto3.client("iam", region_name=REGION)
    role = iam.create_role(RoleName=role_name, AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17",
                           "Statement": []}))["Role"]
    creds = boto3.client("sts", region_name=REGION).assume_role(
        RoleArn=role["Arn"], RoleSessionName=session_name)["Credentials"]

    def factory(service, region_name=None):
        return boto3.client(service, region_name=region_name or REGION, aws_access_key_id=creds["AccessKeyId"],
                            aws_secret_access_key=creds["SecretAccessKey"], aws_session_token=creds["SessionToken"])
    return factory


SSO_ROLE = "AWSReservedSSO_DataScientist_0123456789abcdef"


def test_sts_identity_center_session_is_trusted(aws):
    factory = assumed_role_factory(SSO_ROLE, "alice@example.com")
    who = IdentityResolver({"order": ["sts"], "sso_accounts": ["123456789012"]}, factory).resolve()
    assert (who.name, who.source, who.trusted) == ("alice@example.com", "sts", True)
    assert who.arn.endswith(f"assumed-role/{SSO_ROLE}/alice@example.com")


@pytest.mark.parametrize(("role", "accounts", "why"), [
    (SSO_ROLE, [], "is not in identity.sso_accounts"),                         # no account named
    (SSO_ROLE, ["210987654321"], "is not in identity.sso_accounts"),           # another account
    ("AWSReservedSSO_DataScientist_0123abcd", ["123456789012"], ""),            # 8 hex digits, not 16
    ("AWSReservedSSO_DataScientist_0123456789abcdeg", ["123456789012"], ""),    # not hex
    ("AWSReservedSSO_x_0123456789abcdef_evil", ["123456789012"], ""),           # something after the suffix
    ("AWSReservedSSO_Admin", ["123456789012"], ""),                             # a prefix is not the form
    ("MyAWSReservedSSO_Data_0123456789abcdef", ["123456789012"], ""),
])
def test_sts_session_counts_as_sso_only_in_the_exact_form_and_a_named_account(aws, role, accounts, why):
    factory = assumed_role_factory(role, "alice@example.com")
    who = IdentityResolver({"order": ["sts"], "sso_accounts": accounts}, factory).resolve()
    assert (who.name, who.trusted) == ("alice@example.com", False)
    assert why in who.detail


def test_sts_other_role_session_is_claimed(aws):
    factory = assumed_role_factory("analyst", "bob")
    who = IdentityResolver({"order": ["sts"]}, factory).resolve()
    assert (who.name, who.trusted) == ("bob", False)


def test_sts_sagemaker_execution_session_names_no_person(aws):
    factory = assumed_role_factory("SageMakerExecution", "SageMaker")
    with pytest.raises(IdentityError, match="names no person"):
        IdentityResolver({"order": ["sts"]}, factory).resolve()


def test_notebook_instance_owner_tag(aws, tmp_path):
    sm = boto3.client("sagemaker", region_name=REGION)
    arn = sm.create_notebook_instance(
        NotebookInstanceName="nb-alice", InstanceType="ml.t3.medium",
        RoleArn="arn:aws:iam::123456789012:role/SageMakerExecution",
        Tags=[{"Key": "owner", "Value": "alice@example.com"}, {"Key": "team", "Value": "x"}],
    )["NotebookInstanceArn"]
    meta = tmp_path / "resource-metadata.json"
    meta.write_text(json.dumps({"ResourceArn": arn, "ResourceName": "nb-alice"}))
    who = IdentityResolver({"order": ["notebook_tag"], "metadata_file": str(meta)}).resolve()
    assert (who.name, who.source, who.trusted, who.arn) == ("alice@example.com", "notebook_tag", False, arn)
    with pytest.raises(IdentityError, match="no 'creator' tag"):
        IdentityResolver({"order": ["notebook_tag"], "metadata_file": str(meta), "owner_tag": "creator"}).resolve()


def test_hostile_tag_value_is_refused(aws, tmp_path):
    sm = boto3.client("sagemaker", region_name=REGION)
    arn = sm.create_notebook_instance(
        NotebookInstanceName="nb-evil", InstanceType="ml.t3.medium",
        RoleArn="arn:aws:iam::123456789012:role/SageMakerExecution",
        Tags=[{"Key": "owner", "Value": "alice\nadmin@CORP"}],
    )["NotebookInstanceArn"]
    meta = tmp_path / "m.json"
    meta.write_text(json.dumps({"ResourceArn": arn}))
    with pytest.raises(IdentityError, match="control characters"):
        IdentityResolver({"order": ["notebook_tag"], "metadata_file": str(meta)}).resolve()


def studio_factory(space: dict, profile: dict | None):
    client = botocore.session.get_session().create_client("sagemaker", region_name=REGION,
                                                          aws_access_key_id="x", aws_secret_access_key="x")
    stub = Stubber(client)
    stub.add_response("describe_space", space, {"DomainId": "d-abc", "SpaceName": "alice-space"})
    if profile is not None:
        stub.add_response("describe_user_profile", profile, {"DomainId": "d-abc", "UserProfileName": "alice-profile"})
    stub.activate()
    return lambda service, region_name=None: client


def test_studio_space_owner(tmp_path):
    meta = tmp_path / "m.json"
    meta.write_text(json.dumps({"DomainId": "d-abc", "SpaceName": "alice-space",
                                "ResourceArn": "arn:aws:sagemaker:us-east-1:123456789012:app/d-abc/x"}))
    factory = studio_factory(
        {"DomainId": "d-abc", "SpaceName": "alice-space",
         "OwnershipSettings": {"OwnerUserProfileName": "alice-profile"},
         "SpaceSharingSettings": {"SharingType": "Private"}, "CreationTime": datetime.now(timezone.utc)},
        {"DomainId": "d-abc", "UserProfileName": "alice-profile", "SingleSignOnUserValue": "alice@example.com",
         "UserProfileArn": "arn:aws:sagemaker:us-east-1:123456789012:user-profile/d-abc/alice-profile"},
    )
    who = IdentityResolver({"order": ["studio_space"], "metadata_file": str(meta)}, factory).resolve()
    assert (who.name, who.source, who.trusted) == ("alice@example.com", "studio_space", True)
    assert "alice-profile" in who.detail


def test_studio_shared_space_has_no_owner(tmp_path):
    meta = tmp_path / "m.json"
    meta.write_text(json.dumps({"DomainId": "d-abc", "SpaceName": "alice-space"}))
    factory = studio_factory({"DomainId": "d-abc", "SpaceName": "alice-space",
                              "SpaceSharingSettings": {"SharingType": "Shared"}}, None)
    with pytest.raises(IdentityError, match="is shared"):
        IdentityResolver({"order": ["studio_space"], "metadata_file": str(meta)}, factory).resolve()


def test_chain_order_and_reasons(monkeypatch, tmp_path):
    monkeypatch.setenv("JUPYTERHUB_USER", "hubuser")
    spec = {"order": ["config", "jupyterhub"], "metadata_file": str(tmp_path / "none")}
    assert IdentityResolver(spec).resolve().source == "jupyterhub"
    assert IdentityResolver({**spec, "user": "carol", "require_trusted_identity": False}).resolve().source == "config"
    monkeypatch.delenv("JUPYTERHUB_USER")
    with pytest.raises(IdentityError) as err:
        IdentityResolver({**spec, "order": ["config", "jupyterhub", "studio_space"]}).resolve()
    assert "config: identity.user is not set" in str(err.value)
    assert "jupyterhub: JUPYTERHUB_USER is not set" in str(err.value)
    assert "studio_space: not a SageMaker Studio space" in str(err.value)
    with pytest.raises(IdentityError, match="unknown resolver"):
        IdentityResolver({"order": ["ldap"]})


def test_require_trusted_identity_defaults_on_where_the_platform_enforces_one(monkeypatch, tmp_path):
    spec = {"order": ["config", "jupyterhub"], "user": "carol", "metadata_file": str(tmp_path / "none")}
    monkeypatch.delenv("JUPYTERHUB_USER", raising=False)
    # No enforced source on this platform: "auto" is off and the claimed name is used (and marked claimed).
    who = IdentityResolver(spec).resolve()
    assert (who.name, who.trusted) == ("carol", False)
    # Explicitly on: the claimed name is refused and nothing enforced is left.
    with pytest.raises(IdentityError) as err:
        IdentityResolver({**spec, "require_trusted_identity": True}).resolve()
    assert err.value.code == "untrusted_identity"
    assert "'carol' is claimed, not enforced by AWS, and require_trusted_identity is on" in str(err.value)
    # JUPYTERHUB_USER alone (no hub API to confirm it) is claimed and turns nothing on: identity.user placed first
    # still wins (tests/test_jupyterhub.py: with the hub's API, "auto" is on and the hub's user wins).
    monkeypatch.setenv("JUPYTERHUB_USER", "hubuser")
    monkeypatch.delenv("JUPYTERHUB_API_URL", raising=False)
    who = IdentityResolver(spec).resolve()
    assert (who.name, who.source, who.trusted) == ("carol", "config", False)
    # In a Studio space too (its metadata file names the space).
    monkeypatch.delenv("JUPYTERHUB_USER")
    meta = tmp_path / "studio.json"
    meta.write_text(json.dumps({"DomainId": "d-abc", "SpaceName": "s"}))
    with pytest.raises(IdentityError, match="require_trusted_identity is on"):
        IdentityResolver({**spec, "order": ["config"], "metadata_file": str(meta)}).resolve()


@pytest.mark.parametrize(("spec", "key"), [
    ({"require_trusted_identity": "yes"}, "identity.require_trusted_identity"),
    ({"sso_accounts": "123456789012"}, "identity.sso_accounts"),
    ({"sso_accounts": [123456789012]}, "identity.sso_accounts"),
    ({"sso_accounts": ["12345"]}, "identity.sso_accounts"),
    ({"order": "sts"}, "identity.order"),
    ({"user": 42}, "identity.user"),
    ({"require_trusted": True}, "unknown key(s) require_trusted"),
])
def test_bad_identity_settings_are_config_errors_naming_the_key(spec, key):
    with pytest.raises(IdentityError) as err:
        IdentityResolver(spec)
    assert err.value.code == "config_error" and key in str(err.value)


def test_aws_unreachable_is_classified(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")

    def factory(service, region_name=None):
        return boto3.client(service, region_name="us-east-1", endpoint_url="http://127.0.0.1:9",
                            config=botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=1))
    import botocore.config
    with pytest.raises(IdentityError) as err:
        IdentityResolver({"order": ["sts"]}, factory).resolve()
    assert err.value.code == "aws_unreachable"


RULES = {"rules": [
    {"table": {"Boss@Example.com": "ceo@corp.example.com"}},
    {"regex": r"^(?P<first>[a-z]+)\.(?P<last>[a-z]+)@partner\.com$", "principal": "{first}{last}@PARTNER.EXAMPLE.COM"},
    {"template": "{local}@CORP.EXAMPLE.COM", "case": "lower", "domain": "example.com"},
]}


@pytest.mark.parametrize(("identity", "principal"), [
    ("boss@example.com", "ceo@CORP.EXAMPLE.COM"),         # table, case-insensitive key, realm upper-cased
    ("jane.doe@partner.com", "janedoe@PARTNER.EXAMPLE.COM"),
    ("Alice@Example.com", "alice@CORP.EXAMPLE.COM"),
])
def test_mapping_first_match_wins(identity, principal):
    assert map_identity(identity, RULES) == principal


@pytest.mark.parametrize("identity", [
    "mallory@evil.com",                       # no rule matches
    "alice@example.com.evil.com",             # domain must match exactly
])
def test_mapping_never_guesses(identity):
    with pytest.raises(IdentityError, match="no mapping rule matches") as err:
        map_identity(identity, RULES)
    assert "template '{local}@CORP.EXAMPLE.COM'" in str(err.value)


@pytest.mark.parametrize("identity", [
    "",
    "krbtgt/CORP.EXAMPLE.COM@example.com",    # a '/' would make a service principal
    "a'b@example.com",
    'a"b@example.com',
    "a b@example.com",
    " alice@example.com",                     # taken as given: not stripped
    "a\nb@example.com",
    "x" * 300 + "@example.com",
    "al*ce@example.com",
    "ålice@example.com",
])
def test_mapping_refuses_hostile_identities(identity):
    with pytest.raises(IdentityError) as err:
        map_identity(identity, {"rules": [{"template": "{local}@CORP.EXAMPLE.COM"}]})
    assert err.value.code == "bad_identity"
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("result", [
    "krbtgt/CORP.EXAMPLE.COM", "a'b", 'a"b', "a b", "a\nb", "x" * 300, "al*ce", "ålice", "alice\u212a",
])
def test_mapping_refuses_hostile_results(result):
    with pytest.raises(IdentityError) as err:
        map_identity("alice", {"rules": [{"table": {"alice": f"{result}@CORP.EXAMPLE.COM"}}]})
    assert err.value.code == "bad_principal"
    assert "\n" not in str(err.value)


def test_mapping_with_bad_rules_is_a_config_error():
    with pytest.raises(ConfigError, match=r"mapping.rules\[1\].regex '\(' does not compile"):
        map_identity("a@b", {"rules": [{"regex": "("}]})
    with pytest.raises(ConfigError, match=r"mapping.rules\[1\].template '\{nope\}@X' uses \{nope\}"):
        map_identity("a@b", {"rules": [{"template": "{nope}@X"}]})
    with pytest.raises(ConfigError, match="has none of"):
        map_identity("a@b", {"rules": [{"something": 1}]})


KELVIN, LONG_S, DOTLESS_I = "\u212a", "\u017f", "\u0131"  # look-alikes; tests/test_security.py has the attacks


def test_the_lookalikes_are_real_attacks_without_ascii_rules():
    # What Python does by default, i.e. what made the attack work: each look-alike becomes an ASCII name.
    assert f"{KELVIN}ate".lower() == "kate" and f"ro{LONG_S}e".upper() == "ROSE"
    assert f"adm{DOTLESS_I}n".upper() == "ADMIN"
    assert re.fullmatch(r"(?i)kate", f"{KELVIN}ate") and re.fullmatch(r"\w+", f"{KELVIN}ate")


@pytest.mark.parametrize(("rules", "why"), [
    ([{"table": {f"{KELVIN}ate@example.com": "kate@CORP.TEST"}}], "is not plain ASCII"),
    ([{"regex": r"(?u)kate", "principal": "kate@CORP.TEST"}], "does not compile"),
    ([{"template": "{local}@CORP.TEST", "domain": f"{KELVIN}.com"}], "plain ASCII"),
])
def test_rules_with_non_ascii_keys_or_unicode_regexes_are_config_errors(rules, why):
    with pytest.raises(ConfigError, match=why):
        map_identity("kate@example.com", {"rules": rules})


def test_a_non_ascii_principal_in_the_configuration_is_refused():
    with pytest.raises(ConfigError, match="is not a Kerberos principal"):
        parse_settings({"principal": f"{KELVIN}ate@CORP.TEST"})
    with pytest.raises(IdentityError, match="not a valid plain-ASCII user principal"):
        map_identity("kate", {"rules": [{"template": f"{{local}}@CORP.TES{DOTLESS_I}"}]})
