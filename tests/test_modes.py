"""backend.mode on AWS (moto server): who may reach the back-end, and the private subnet.

proxied (default): port 5000 open to the front-end's group only; the page calls its own origin.
private: that, plus the back-end in a private subnet with no public address, SSH only
through the front-end, and a NAT gateway for its package installs; `destroy` removes it all.
public: the guide's, port 5000 open to the world (apache there, gunicorn on the loopback: test_public_edge.py).
"""
import paramiko
import pytest
from invoke.exceptions import Exit

from tasks import cloud, hosts, instances, network, state, teardown
from tests.fixtures import context, free_port
from tests.fixtures.moto import stack_resources
from tests.test_destroy import leftovers_by_cli
from tests.test_network import by_role, ingress

ADMIN, WORLD = "203.0.113.7/32", "0.0.0.0/0"


def named(resources, stack, name):
    [found] = [r for r in resources if {"Key": "Name", "Value": f"{stack}-{name}"} in r["Tags"]]
    return found


def test_public_mode_is_the_guides(aws_context, ec2):
    c = aws_context(backend={"mode": "public"})
    network.create_vpc(c)
    found = stack_resources(ec2, c.config.aws.stack)
    groups = by_role(found["security_groups"])
    assert ingress(groups["backend"]) == {(22, ADMIN), (5000, WORLD)}  # apache's; gunicorn's 5001 is not open
    assert len(found["subnets"]) == 1 and found["nat_gateways"] == []


def test_private_mode_builds_a_private_subnet_behind_a_nat_gateway(aws_context, ec2, moto_endpoint, capsys):
    c = aws_context(backend={"mode": "private"})
    stack = c.config.aws.stack
    result = network.create_vpc(c)
    found = stack_resources(ec2, stack)
    public, private = named(found["subnets"], stack, "public"), named(found["subnets"], stack, "private")
    assert (public["CidrBlock"], private["CidrBlock"]) == ("192.168.0.0/24", "192.168.1.0/24")
    [nat] = found["nat_gateways"]
    assert nat["State"] == "available" and nat["SubnetId"] == public["SubnetId"]  # the way out is public
    [nat_address] = found["addresses"]
    assert {"Key": "Role", "Value": "nat"} in nat_address["Tags"]
    assert nat["NatGatewayAddresses"][0]["AllocationId"] == nat_address["AllocationId"]
    tables = {name: named(found["route_tables"], stack, name) for name in ("public", "private")}
    [igw] = found["internet_gateways"]
    default = {name: next(r for r in t["Routes"] if r["DestinationCidrBlock"] == WORLD) for name, t in tables.items()}
    assert default["public"].get("GatewayId") == igw["InternetGatewayId"]
    assert default["private"].get("NatGatewayId") == nat["NatGatewayId"]  # not the internet gateway
    assert [a["SubnetId"] for a in tables["private"]["Associations"]] == [private["SubnetId"]]
    assert [a["SubnetId"] for a in tables["public"]["Associations"]] == [public["SubnetId"]]
    groups = by_role(found["security_groups"])
    front = groups["frontend"]["GroupId"]
    assert ingress(groups["backend"]) == {(22, front), (5000, front)}  # nothing from the internet
    assert ingress(groups["frontend"]) == {(22, ADMIN), (80, WORLD)}
    # the proxied stack's 14 changes, then the private subnet, the nat's ip and gateway, its table,
    # route and association
    assert result["changed"] == 20, capsys.readouterr().out
    saved = state.load(c)
    assert (saved["private_subnet_id"], saved["nat_gateway_id"]) == (private["SubnetId"], nat["NatGatewayId"])
    assert saved["nat_public_ip"] == nat_address["PublicIp"]

    again = network.create_vpc(c)
    assert again["changed"] == 0 and stack_resources(ec2, stack) == found

    instances.launch(c, no_wait=True)
    found = stack_resources(ec2, stack)
    placed = {next(t["Value"] for t in i["Tags"] if t["Key"] == "Role"): i for i in found["instances"]}
    assert placed["backend"]["SubnetId"] == private["SubnetId"]
    assert not placed["backend"].get("PublicIpAddress")  # no public address, no Elastic IP
    assert placed["backend"]["PrivateIpAddress"].startswith("192.168.1.")
    roles = sorted(next(t["Value"] for t in a["Tags"] if t["Key"] == "Role") for a in found["addresses"])
    assert roles == ["frontend", "nat", "worker"]
    assert all(placed[role]["SubnetId"] == public["SubnetId"] for role in ("worker", "frontend"))
    assert instances.launch(c, no_wait=True)["changed"] == 0

    capsys.readouterr()
    instances.status(c)
    shown = capsys.readouterr().out
    assert f"nat     {nat['NatGatewayId']}\n" in shown and f"private {private['SubnetId']}\n" in shown
    frontend_ip = state.load(c)["instances"]["frontend"]["public_ip"]
    assert f"backend  http://{frontend_ip}/health\n" in shown  # reached through the front-end only

    result = teardown.destroy(c, yes=True)
    out = capsys.readouterr().out
    assert f"  changed: nat-gateway {nat['NatGatewayId']} deleted\n" in out
    assert out.index("nat-gateway") < out.index(f"elastic-ip {nat_address['PublicIp']} deleted")
    assert leftovers_by_cli(moto_endpoint, stack) == {}
    assert all(not resources for resources in stack_resources(ec2, stack).values())
    assert result["changed"] > 0 and teardown.destroy(c, yes=True)["changed"] == 0


def test_a_back_end_in_the_wrong_subnet_for_the_mode_is_named(aws_context, ec2):
    c = aws_context()
    network.create_vpc(c)
    instances.launch(c, no_wait=True)
    private = aws_context(stack=c.config.aws.stack, backend={"mode": "private"})
    network.create_vpc(private)
    with pytest.raises(cloud.ConfigError, match=r"the backend i-\w+ is in subnet subnet-\w+, but backend.mode"
                                                r" private puts it in subnet-\w+: .* terminate it"):
        instances.launch(private, no_wait=True)


def test_a_nat_gateway_left_by_private_mode_is_pointed_out(aws_context, ec2, capsys):
    c = aws_context(backend={"mode": "private"})
    network.create_vpc(c)
    proxied = aws_context(stack=c.config.aws.stack)
    capsys.readouterr()
    network.create_vpc(proxied)
    groups = by_role(stack_resources(ec2, c.config.aws.stack)["security_groups"])
    assert ingress(groups["backend"]) == {(22, ADMIN), (5000, groups["frontend"]["GroupId"])}  # reconciled
    assert "is billed by the hour and unused with backend.mode proxied: `fab destroy`" in capsys.readouterr().err


def test_an_unknown_mode_is_refused_before_anything_is_made(aws_context, ec2):
    c = aws_context(backend={"mode": "hidden"})
    with pytest.raises(Exit, match="backend.mode='hidden': one of proxied, private, public"):
        network.create_vpc(c)
    assert stack_resources(ec2, c.config.aws.stack)["vpcs"] == []


def test_private_backend_is_reached_through_the_frontend(ssh_hosts):
    """Fabric's gateway: the back-end's SSH session runs inside a channel of the front-end's."""
    c = context(**ssh_hosts.config(backend={"mode": "private"}))
    before = ssh_hosts.log.read_text()
    cxn = hosts.connect(c, "backend")
    try:
        assert cxn.run("whoami", hide=True).stdout.strip() == "backend"
        assert cxn.gateway.role == "frontend" and cxn.gateway.is_connected
        assert isinstance(cxn.transport.sock, paramiko.Channel)  # tunnelled, not a socket of ours
        assert hosts.label(cxn) == f"backend (backend@127.0.0.4:{ssh_hosts.port} via frontend)"
    finally:
        cxn.close()
    assert not cxn.gateway.is_connected  # closing the back-end's connection closes the jump too
    logins = ssh_hosts.log.read_text()[len(before):]
    assert "Accepted publickey for frontend" in logins and "Accepted publickey for backend" in logins
    # A public back-end is reached directly.
    direct = hosts.connect(context(**ssh_hosts.config()), "backend")
    try:
        assert direct.gateway is None and not isinstance(direct.transport.sock, paramiko.Channel)
    finally:
        direct.close()


def test_private_backend_unreachable_through_the_frontend_is_named(ssh_hosts):
    closed = free_port("0.0.0.0")
    hosts_ = {**ssh_hosts.hosts, "backend": f"backend@127.0.0.4:{closed}"}
    c = context(**ssh_hosts.config(backend={"mode": "private"}, ssh={"hosts": hosts_}))
    with pytest.raises(Exit) as error:
        hosts.connect(c, "backend")
    message = error.value.message
    assert f"cannot reach the backend (backend@127.0.0.4:{closed} via frontend) over SSH" in message, message
    assert f"that port {closed} is open to the frontend" in message
