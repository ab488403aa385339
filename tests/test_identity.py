"""Identity resolvers (through boto3 against moto, or botocore's Stubber where moto has no Studio) and mapping
rules, as tables, including hostile input."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import boto3
import botocore.session
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from kerb_jupyter import ConfigError, IdentityError
from kerb_jupyter.identity import IdentityResolver
from kerb_jupyter.mapping import map_identity

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


def test_sts_identity_center_session_is_trusted(aws):
    factory = assumed_role_factory("AWSReservedSSO_DataScientist_0123abcd", "alice@example.com")
    who = IdentityResolver({"order": ["sts"]}, factory).resolve()
    assert (who.name, who.source, who.trusted) == ("alice@example.com", "sts", True)
    assert who.arn.endswith("assumed-role/AWSReservedSSO_DataScientist_0123abcd/alice@example.com")


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
    assert IdentityResolver({**spec, "user": "carol"}).resolve().source == "config"
    monkeypatch.delenv("JUPYTERHUB_USER")
    with pytest.raises(IdentityError) as err:
        IdentityResolver({**spec, "order": ["config", "jupyterhub", "studio_space"]}).resolve()
    assert "config: identity.user is not set" in str(err.value)
    assert "jupyterhub: JUPYTERHUB_USER is not set" in str(err.value)
    assert "studio_space: not a SageMaker Studio space" in str(err.value)
    with pytest.raises(IdentityError, match="unknown resolver"):
        IdentityResolver({"order": ["ldap"]})


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
    "",
])
def test_mapping_never_guesses(identity):
    with pytest.raises(IdentityError, match="no mapping rule matches") as err:
        map_identity(identity, RULES)
    assert "template '{local}@CORP.EXAMPLE.COM'" in str(err.value)


@pytest.mark.parametrize("identity", [
    "krbtgt/CORP.EXAMPLE.COM@example.com",    # a '/' would make a service principal
    "a'b@example.com",
    'a"b@example.com',
    "a b@example.com",
    "a\nb@example.com",
    "x" * 300 + "@example.com",
    "al*ce@example.com",
    "ålice@example.com",
])
def test_mapping_refuses_hostile_results(identity):
    with pytest.raises(IdentityError) as err:
        map_identity(identity, {"rules": [{"template": "{local}@CORP.EXAMPLE.COM"}]})
    assert err.value.code == "bad_principal"
    assert "\n" not in str(err.value)


def test_mapping_with_bad_rules_is_a_config_error():
    with pytest.raises(ConfigError, match="bad regex"):
        map_identity("a@b", {"rules": [{"regex": "("}]})
    with pytest.raises(ConfigError, match="bad template"):
        map_identity("a@b", {"rules": [{"template": "{nope}@X"}]})
    with pytest.raises(ConfigError, match="has none of"):
        map_identity("a@b", {"rules": [{"something": 1}]})
