"""Tags, filters, CIDRs, security-group rules and error advice: the pure parts of the AWS tasks."""
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from tasks import cloud, errors, state
from tests.fixtures import context


def client_error(code, operation="CreateVpc", message="no"):
    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


def test_every_resource_carries_its_stack_name_and_maker():
    c = context(aws={"stack": "demo"})
    assert cloud.tags(c, "vpc") == [{"Key": "Project", "Value": "demo"}, {"Key": "Name", "Value": "demo-vpc"},
                                    {"Key": "ManagedBy", "Value": "fabric"}]
    assert {"Key": "Role", "Value": "backend"} in cloud.tags(c, "backend", role="backend")
    assert cloud.tag_spec(c, "vpc", "vpc") == [{"ResourceType": "vpc", "Tags": cloud.tags(c, "vpc")}]


def test_filters_select_the_stack_role_name_and_more():
    c = context(aws={"stack": "demo"})
    assert cloud.tag_filters(c, "worker", "public", vpc_id="vpc-1", instance_state_name=["running", "stopped"]) == [
        {"Name": "tag:Project", "Values": ["demo"]},
        {"Name": "tag:Role", "Values": ["worker"]},
        {"Name": "tag:Name", "Values": ["demo-public"]},
        {"Name": "vpc-id", "Values": ["vpc-1"]},
        {"Name": "instance-state-name", "Values": ["running", "stopped"]},
    ]


def test_an_api_that_ignores_a_filter_never_hands_over_another_stacks_resource():
    filters = cloud.tag_filters(context(aws={"stack": "demo"}), role="backend")
    ours = {"Tags": [{"Key": "Project", "Value": "demo"}, {"Key": "Role", "Value": "backend"}]}
    theirs = {"Tags": [{"Key": "Project", "Value": "other"}, {"Key": "Role", "Value": "backend"}]}
    untagged = {}
    assert [cloud._tagged(r, filters) for r in (ours, theirs, untagged)] == [True, False, False]


@pytest.mark.parametrize("value", ["192.168.0.0/16", " 10.0.0.0/8 ", "203.0.113.7/32"])
def test_cidrs_are_read(value):
    assert str(cloud.network(value, "aws.vpc_cidr")) == value.strip()


@pytest.mark.parametrize("value", ["192.168.0.1/16", "10.0.0.0/33", "everyone", ""])
def test_a_bad_cidr_names_its_setting(value):
    with pytest.raises(errors.ConfigError) as error:
        cloud.network(value, "aws.ssh_cidr")
    assert error.value.message.startswith(f"bad config: aws.ssh_cidr={value!r} is not a CIDR block")


def test_security_group_rules_flatten_to_comparable_tuples():
    permissions = [
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
         "IpRanges": [{"CidrIp": "203.0.113.7/32"}], "Ipv6Ranges": [{"CidrIpv6": "2001:db8::/64"}]},
        {"IpProtocol": "tcp", "FromPort": 5000, "ToPort": 5000, "UserIdGroupPairs": [{"GroupId": "sg-front"}]},
        {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
    ]
    assert state.rules(permissions) == {
        ("tcp", 22, 22, "203.0.113.7/32"), ("tcp", 22, 22, "2001:db8::/64"),
        ("tcp", 5000, 5000, "sg-front"), ("-1", None, None, "0.0.0.0/0"),
    }
    assert state.rules([]) == set()


@pytest.mark.parametrize(
    ("error", "says", "never"),
    [
        (client_error("UnauthorizedOperation", message="not authorized to perform: ec2:CreateVpc on x"),
         "missing permission ec2:CreateVpc: attach the policy in iam/digits-operator.json", None),
        (client_error("AccessDenied", "GetServiceQuota"), "missing permission servicequotas:GetServiceQuota", None),
        (client_error("VcpuLimitExceeded", "RunInstances"), "--quota-code L-1216C47A", "re-run `fab"),
        (client_error("AuthFailure"), "aws sts get-caller-identity", None),
        (client_error("InsufficientInstanceCapacity", "RunInstances"), "fab preflight", "it finds what exists"),
        (client_error("RequestLimitExceeded"), "re-run `fab create-vpc`", None),
        (EndpointConnectionError(endpoint_url="https://ec2.x"), "re-run `fab create-vpc`", None),
    ],
)
def test_each_error_ends_with_the_step_that_helps(error, says, never):
    advice = errors.advice(error, "create-vpc")
    assert says in advice
    if never:
        assert never not in advice.split("once granted")[0]  # a limit is not cured by re-running
