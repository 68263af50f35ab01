"""One context per AWS task (cloud.AwsRun) and the find-then-reconcile ensure_* steps, against a
recording stand-in for the EC2 client: no AWS, no moto."""
import pytest
from botocore.exceptions import ClientError

from tasks import cloud, errors, instances, network
from tests.fixtures import context

TAGS = [{"Key": "Project", "Value": "demo"}]


class RecordingEc2:
    """Answers describe_<kind> with `found`, and records every other call made on it."""

    def __init__(self, **found):
        self.found, self.calls = found, []

    def __getattr__(self, name):
        if name.startswith("describe_"):
            return lambda **params: self.found[name]
        return lambda **params: self.calls.append((name, params)) or {}


def run(ec2, dry_run=False, task="create-vpc"):
    return cloud.AwsRun(context(aws={"stack": "demo"}), task, dry_run, about="test", ec2=ec2)


def test_a_step_failure_names_the_resource_and_the_runs_own_task(capsys):
    aws = run(RecordingEc2(), task="launch")
    with pytest.raises(errors.StepFailed) as failed:
        with aws.step("vpc 10.0.0.0/16"):
            raise ClientError({"Error": {"Code": "Throttling", "Message": "slow down"}}, "CreateVpc")
    assert failed.value.message.startswith("step failed: vpc 10.0.0.0/16:")
    assert "re-run `fab launch`" in failed.value.message and failed.value.code == 1
    assert capsys.readouterr().out == "TASK [launch] aws (test)\n"


def test_two_resources_where_the_stack_has_one_is_a_step_failure_with_the_next_step():
    two = [{"VpcId": "vpc-1", "Tags": TAGS}, {"VpcId": "vpc-2", "Tags": TAGS}]
    aws = run(RecordingEc2(describe_vpcs={"Vpcs": two}))
    with pytest.raises(errors.StepFailed, match=r"vpcs tagged Project=demo: found 2.*\ndelete the extra ones") as found:
        aws.find_one("vpcs")
    assert found.value.code == 1


@pytest.mark.parametrize("dry_run", [False, True])
def test_each_route_table_step_says_whether_it_changed_something(dry_run, capsys):
    ec2 = RecordingEc2()
    aws = run(ec2, dry_run)
    table = {"RouteTableId": "rtb-1", "Routes": [{"DestinationCidrBlock": "10.0.0.0/16", "GatewayId": "local"}],
             "Associations": []}
    assert network.ensure_default_route(aws, table, ("GatewayId", "igw-1")) is True
    assert network.ensure_association(aws, table, "subnet-1") is True
    assert ec2.calls == ([] if dry_run else [
        ("create_route", {"RouteTableId": "rtb-1", "DestinationCidrBlock": "0.0.0.0/0", "GatewayId": "igw-1"}),
        ("associate_route_table", {"RouteTableId": "rtb-1", "SubnetId": "subnet-1"})])
    done = {**table, "Routes": [{"DestinationCidrBlock": "0.0.0.0/0", "GatewayId": "igw-1"}],
            "Associations": [{"SubnetId": "subnet-1"}]}
    assert network.ensure_default_route(aws, done, ("GatewayId", "igw-1")) is False
    assert network.ensure_association(aws, done, "subnet-1") is False
    out = capsys.readouterr().out
    assert ("would change route-table rtb-1 0.0.0.0/0 -> igw-1" in out) is dry_run
    assert out.count("  ok: route-table rtb-1") == 2
    assert aws.counts["changed"] == (0 if dry_run else 2)


def test_a_route_to_another_target_is_replaced_not_added():
    ec2 = RecordingEc2()
    table = {"RouteTableId": "rtb-1", "Routes": [{"DestinationCidrBlock": "0.0.0.0/0", "GatewayId": "igw-old"}]}
    assert network.ensure_default_route(run(ec2), table, ("GatewayId", "igw-1")) is True
    assert [name for name, _ in ec2.calls] == ["replace_route"]


def test_an_address_on_another_instance_is_moved_and_one_in_place_left_alone():
    ec2 = RecordingEc2()
    aws = run(ec2, task="launch")
    address = {"AllocationId": "eipalloc-1", "PublicIp": "198.51.100.7", "InstanceId": "i-old"}
    assert instances.ensure_address_associated(aws, address, "worker", "i-new") is True
    assert ec2.calls == [("associate_address", {"AllocationId": "eipalloc-1", "InstanceId": "i-new",
                                                "AllowReassociation": True})]
    assert instances.ensure_address_associated(aws, {**address, "InstanceId": "i-new"}, "worker", "i-new") is False
    assert len(ec2.calls) == 1
