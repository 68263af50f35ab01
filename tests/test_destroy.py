"""`destroy` against a moto server: order, completeness, confirmation, dry run, other stacks."""
import json
import os
import subprocess
import sys

import pytest

from tasks import hosts, instances, network, state, teardown
from tasks.config import ROOT
from tests.fixtures.moto import RAISED, REGION, aws_cli, stack_resources

# What must be gone before the next kind can go (moto doesn't enforce it; AWS does).
ORDER = [
    "TerminateInstances",
    "ReleaseAddress",
    "DeleteSecurityGroup",
    "DisassociateRouteTable",
    "DeleteRouteTable",
    "DetachInternetGateway",
    "DeleteInternetGateway",
    "DeleteSubnet",
    "DeleteVpc",
    "DeleteKeyPair",
]


@pytest.fixture
def launched(aws_context):
    """Factory: a Context whose stack is fully up (network, key, instances, addresses)."""

    def build(**sections):
        c = aws_context(**sections)
        network.create_vpc(c)
        instances.launch(c, no_wait=True)
        return c

    return build


def leftovers_by_cli(moto_endpoint, stack):
    """{kind: [ids]} the `aws` CLI still finds for the stack: a check independent of the code here.

    One describe per kind (moto's describe-tags keeps deleted resources' tags).
    """
    tagged = f"Name=tag:Project,Values={stack}"
    live = "Name=instance-state-name,Values=pending,running,stopping,stopped"
    queries = {
        "vpcs": (["describe-vpcs", "--filters", tagged], "Vpcs[].VpcId"),
        "subnets": (["describe-subnets", "--filters", tagged], "Subnets[].SubnetId"),
        "internet-gateways": (["describe-internet-gateways", "--filters", tagged],
                              "InternetGateways[].InternetGatewayId"),
        "route-tables": (["describe-route-tables", "--filters", tagged], "RouteTables[].RouteTableId"),
        "security-groups": (["describe-security-groups", "--filters", tagged], "SecurityGroups[].GroupId"),
        "addresses": (["describe-addresses", "--filters", tagged], "Addresses[].AllocationId"),
        "key-pairs": (["describe-key-pairs", "--filters", tagged], "KeyPairs[].KeyName"),
        "instances": (["describe-instances", "--filters", tagged, live], "Reservations[].Instances[].InstanceId"),
        "nat-gateways": (["describe-nat-gateways", "--filter", tagged, "Name=state,Values=pending,available,deleting"],
                         "NatGateways[].NatGatewayId"),
    }
    return {kind: ids for kind, ids in aws_cli(moto_endpoint, queries).items() if ids}


def test_destroy_removes_everything_in_dependency_order(launched, api_calls, moto_endpoint, ec2, capsys):
    c = launched()
    stack = c.config.aws.stack
    key = state.key_file(c)
    assert key.is_file()
    known_hosts = hosts.known_hosts_file(c)
    known_hosts.write_text("127.0.0.5 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDummy\n")
    calls = api_calls(c)
    capsys.readouterr()

    result = teardown.destroy(c, yes=True)

    changes = [call for call in calls if not call.startswith("Describe")]
    firsts = [changes.index(name) for name in ORDER]
    lasts = [len(changes) - 1 - changes[::-1].index(name) for name in ORDER]
    for kind, next_kind, last, first in zip(ORDER, ORDER[1:], lasts, firsts[1:], strict=False):  # (pairs)
        assert last < first, f"{kind} must be done before {next_kind}: {changes}"
    # The termination is waited for before the addresses go.
    assert "DescribeInstances" in calls[calls.index("TerminateInstances"):calls.index("ReleaseAddress")]
    assert changes.count("DeleteSecurityGroup") == 3 and changes.count("ReleaseAddress") == 3
    assert changes.count("DisassociateAddress") == 3
    assert changes.index("DisassociateAddress") < changes.index("ReleaseAddress")

    assert leftovers_by_cli(moto_endpoint, stack) == {}
    assert not key.exists()  # useless without its key pair
    assert not known_hosts.exists()  # new machines at these addresses will have new host keys
    assert state.load(c)["vpc_id"] is None and state.load(c)["instances"]["worker"]["id"] is None
    out = capsys.readouterr().out
    assert "  changed: vpc vpc-" in out and f"  changed: known_hosts {known_hosts} deleted\n" in out
    # instances, 3 addresses, the back-end group's rule naming the front-end's group (AWS
    # refuses to delete a group another names), 3 groups, table, gateway, subnet, vpc,
    # key pair, private key, known_hosts
    assert "  changed: rules of security-group sg-" in out
    assert result == {"ok": 0, "changed": 15, "checked": 0, "task": "destroy", "role": "aws"}
    assert out.endswith("RECAP [destroy] aws: ok=0 changed=15 checked=0\n")

    assert teardown.destroy(c, yes=True)["changed"] == 0  # nothing left: a second run is a no-op
    assert all(not resources for resources in stack_resources(ec2, stack).values())


def test_destroy_asks_first(launched, ec2, monkeypatch):
    c = launched()
    before = stack_resources(ec2, c.config.aws.stack)
    questions = []

    def answer(question):
        questions.append(question)
        return "n"

    monkeypatch.setattr("builtins.input", answer)
    with pytest.raises(teardown.Exit, match="nothing deleted"):
        teardown.destroy(c)
    assert questions and c.config.aws.stack in questions[0]
    assert stack_resources(ec2, c.config.aws.stack) == before

    monkeypatch.setattr("builtins.input", lambda question: "y")
    teardown.destroy(c)
    assert stack_resources(ec2, c.config.aws.stack)["vpcs"] == []


def test_fab_destroy_without_yes_reads_the_terminal(launched, ec2):
    c = launched()
    env = {**os.environ, "FABRIC_AWS_STACK": c.config.aws.stack, "FABRIC_AWS_REGION": REGION,
           "FABRIC_AWS_STATE_FILE": c.config.aws.state_file}
    answer = subprocess.run([sys.executable, "-m", "fabric", "destroy"], input="no\n",
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert answer.returncode == 1 and "nothing deleted" in answer.stderr
    assert len(stack_resources(ec2, c.config.aws.stack)["instances"]) == 3


def test_destroy_dry_run_changes_nothing(launched, ec2, api_calls, capsys):
    c = launched()
    before = stack_resources(ec2, c.config.aws.stack)
    capsys.readouterr()
    calls = api_calls(c)
    teardown.destroy(c, dry_run=True)
    assert stack_resources(ec2, c.config.aws.stack) == before
    assert all(call.startswith("Describe") for call in calls)
    out = capsys.readouterr().out
    assert f"  would delete vpc {before['vpcs'][0]['VpcId']}\n" in out
    assert out.count("  would delete elastic-ip") == 3
    assert "changed:" not in out and "RECAP [destroy] aws: ok=0 changed=0 checked=0 (dry run: " in out
    assert state.key_file(c).is_file()


def test_two_stacks_in_one_account_dont_see_each_other(launched, ec2, account_quotas):
    # Two stacks need 6 Elastic IPs: more than a new account's 5, so this account has more.
    account_quotas.values.update(RAISED)
    one, two = launched(), launched()
    mine = stack_resources(ec2, one.config.aws.stack)
    theirs = stack_resources(ec2, two.config.aws.stack)
    for kind in set(mine) - {"nat_gateways"}:  # (only backend.mode private has one)
        ids = {json.dumps(r, sort_keys=True, default=str) for r in mine[kind]}
        assert len(mine[kind]) == len(theirs[kind]) >= 1
        assert ids.isdisjoint(json.dumps(r, sort_keys=True, default=str) for r in theirs[kind])

    teardown.destroy(one, yes=True)

    assert all(not resources for resources in stack_resources(ec2, one.config.aws.stack).values())
    assert stack_resources(ec2, two.config.aws.stack) == theirs
    assert state.key_file(two).is_file()


def test_a_users_own_key_pair_is_kept(launched, ec2, tmp_path):
    (tmp_path / "team.pem").write_text(ec2.create_key_pair(KeyName="team-key")["KeyMaterial"])
    c = launched(aws={"key_name": "team-key"}, ssh={"key": str(tmp_path / "team.pem")})
    teardown.destroy(c, yes=True)
    assert [k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"]] == ["team-key"]
    assert (tmp_path / "team.pem").is_file()


def test_destroy_deletes_the_stacks_known_hosts_only(aws_context, tmp_path, capsys):
    """Even with nothing left in AWS; another stack's file stays."""
    c, other = aws_context(), aws_context()
    for context in (c, other):
        hosts.known_hosts_file(context).parent.mkdir(parents=True, exist_ok=True)
        hosts.known_hosts_file(context).write_text("127.0.0.5 ssh-ed25519 AAAA\n")

    teardown.destroy(c, yes=True, dry_run=True)
    assert hosts.known_hosts_file(c).is_file()
    assert f"  would delete known_hosts {hosts.known_hosts_file(c)}\n" in capsys.readouterr().out

    assert teardown.destroy(c, yes=True)["changed"] == 1
    assert not hosts.known_hosts_file(c).exists() and hosts.known_hosts_file(other).is_file()
    assert teardown.destroy(c, yes=True)["changed"] == 0


def test_destroy_in_another_region_keeps_the_stacks_private_key(launched, ec2):
    """Nothing of the stack there: its key pair and private key, in their own region, stay."""
    c = launched()
    key = state.key_file(c)
    other = type(c)(config=c.config.clone())
    other.config.aws.region = "eu-west-1"
    assert teardown.destroy(other, yes=True)["changed"] <= 1  # at most the known_hosts file
    assert key.is_file() and ec2.describe_key_pairs(KeyNames=[state.key_name(c)])["KeyPairs"]
    assert stack_resources(ec2, c.config.aws.stack)["vpcs"]
