"""`create-vpc` against a moto server: the guide's network, idempotent, resumable, safe by default."""
import http.server
import threading

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from tasks import cloud, network, state
from tests.fixtures.moto import stack_resources


def ingress(group):
    """{(port, source)} of a security group, sources being CIDRs or group ids."""
    return {
        (p["FromPort"], source)
        for p in group["IpPermissions"]
        for source in [r["CidrIp"] for r in p.get("IpRanges", [])]
        + [g["GroupId"] for g in p.get("UserIdGroupPairs", [])]
    }


def by_role(groups):
    return {next(t["Value"] for t in g["Tags"] if t["Key"] == "Role"): g for g in groups}


def test_creates_the_guides_network(aws_context, ec2, capsys):
    c = aws_context()
    result = network.create_vpc(c)
    found = stack_resources(ec2, c.config.aws.stack)

    [vpc], [subnet], [igw], [table] = (found[k] for k in ("vpcs", "subnets", "internet_gateways", "route_tables"))
    assert vpc["CidrBlock"] == "192.168.0.0/16"
    assert ec2.describe_vpc_attribute(VpcId=vpc["VpcId"], Attribute="enableDnsHostnames")["EnableDnsHostnames"]["Value"]
    assert (subnet["CidrBlock"], subnet["VpcId"]) == ("192.168.0.0/24", vpc["VpcId"])
    assert igw["Attachments"] == [{"State": "available", "VpcId": vpc["VpcId"]}]
    routes = {(r["DestinationCidrBlock"], r["GatewayId"]) for r in table["Routes"]}
    assert routes == {("192.168.0.0/16", "local"), ("0.0.0.0/0", igw["InternetGatewayId"])}
    assert [a["SubnetId"] for a in table["Associations"]] == [subnet["SubnetId"]]

    groups = by_role(found["security_groups"])
    admin, world = "203.0.113.7/32", "0.0.0.0/0"
    assert ingress(groups["worker"]) == {(22, admin)}  # no 8888: Jupyter goes through SSH
    assert ingress(groups["frontend"]) == {(22, admin), (80, world)}
    # backend.mode proxied (the default): port 5000 only from the front-end, which forwards
    # the page's calls. No worker -> back-end SSH: `push-model --from-worker` relays through the operator.
    assert ingress(groups["backend"]) == {(22, admin), (5000, groups["frontend"]["GroupId"])}
    for group in groups.values():
        assert group["VpcId"] == vpc["VpcId"]
        assert [(p["IpProtocol"], p["IpRanges"]) for p in group["IpPermissionsEgress"]] == [
            ("-1", [{"CidrIp": world}])
        ]

    out = capsys.readouterr().out
    assert out.startswith(f"TASK [create-vpc] aws (stack {c.config.aws.stack} in eu-west-3)\n")
    assert f"  changed: vpc {vpc['VpcId']} created\n" in out
    assert f"  changed: subnet {subnet['SubnetId']} (public) created in {subnet['AvailabilityZone']}\n" in out
    assert f"  changed: route-table {table['RouteTableId']} associated to subnet {subnet['SubnetId']}\n" in out
    # The account's VPC limit, read before the first change (moto's default VPC is the one in use).
    assert "  checked: limit VPCs per Region: need 1, 1 in use, limit 5 (Service Quotas)\n" in out
    # vpc, dns, subnet, igw, attachment, table, route, association, 3 groups and their rules
    # and launch's share (its Elastic IPs), so that no network is made for machines it cannot have.
    assert "  checked: limit EC2-VPC Elastic IPs: need 3, 0 in use, limit 5" in out
    assert result == {"ok": 0, "changed": 14, "checked": 2, "task": "create-vpc", "role": "aws"}
    assert out.endswith("RECAP [create-vpc] aws: ok=0 changed=14 checked=2\n")
    saved = state.load(c)
    assert (saved["vpc_id"], saved["subnet_id"], saved["igw_id"], saved["route_table_id"]) == (
        vpc["VpcId"], subnet["SubnetId"], igw["InternetGatewayId"], table["RouteTableId"]
    )
    assert saved["security_groups"] == {role: g["GroupId"] for role, g in groups.items()}


def test_second_run_creates_nothing(aws_context, ec2, api_calls, capsys):
    c = aws_context()
    network.create_vpc(c)
    before = stack_resources(ec2, c.config.aws.stack)
    capsys.readouterr()
    calls = api_calls(c)

    result = network.create_vpc(c)

    assert stack_resources(ec2, c.config.aws.stack) == before
    out = capsys.readouterr().out
    assert f"  ok: vpc {before['vpcs'][0]['VpcId']} exists\n" in out
    assert "changed:" not in out and "would" not in out
    assert result["changed"] == 0 and result["ok"] == 14
    assert "RECAP [create-vpc] aws: ok=14 changed=0 checked=1" in out  # (launch's addresses, still to come)
    assert not [call for call in calls if not call.startswith("Describe")]


def test_interrupted_run_resumes_without_duplicates(aws_context, ec2, capsys):
    c = aws_context()

    def network_down(**_):
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")

    cloud.session(c).events.register("before-call.ec2.CreateRouteTable", network_down, unique_id="down")
    with pytest.raises(cloud.StepFailed, match=r"route table.*\n.*re-run `fab create-vpc`"):
        network.create_vpc(c)
    assert "STOPPED [create-vpc] aws: ok=0 changed=5 checked=2" in capsys.readouterr().out
    half = stack_resources(ec2, c.config.aws.stack)
    assert [len(half[k]) for k in ("vpcs", "subnets", "internet_gateways", "route_tables")] == [1, 1, 1, 0]
    cloud.session(c).events.unregister("before-call.ec2.CreateRouteTable", unique_id="down")
    capsys.readouterr()

    network.create_vpc(c)

    done = stack_resources(ec2, c.config.aws.stack)
    assert [len(done[k]) for k in ("vpcs", "subnets", "internet_gateways", "route_tables", "security_groups")] == [
        1, 1, 1, 1, 3,
    ]
    for kind in ("vpcs", "subnets", "internet_gateways"):
        assert done[kind] == half[kind]
    out = capsys.readouterr().out
    assert "  ok: internet-gateway igw-" in out and "  changed: route-table rtb-" in out


def test_dry_run_changes_nothing(aws_context, ec2, api_calls, capsys):
    c = aws_context()
    calls = api_calls(c)
    network.create_vpc(c, dry_run=True)
    assert stack_resources(ec2, c.config.aws.stack)["vpcs"] == []
    assert all(call.startswith("Describe") for call in calls)
    out = capsys.readouterr().out
    assert "  would create vpc 192.168.0.0/16\n" in out
    assert "  would create security-group" in out
    assert "changed:" not in out
    assert "RECAP [create-vpc] aws: ok=0 changed=0 checked=2 (dry run: " in out

    network.create_vpc(c)
    before = stack_resources(ec2, c.config.aws.stack)
    capsys.readouterr()
    result = network.create_vpc(c, ssh_cidr="198.51.100.0/24", dry_run=True)
    assert stack_resources(ec2, c.config.aws.stack) == before
    assert "  would change security-group" in capsys.readouterr().out
    assert result["changed"] == 0


def test_the_old_worker_to_backend_ssh_rule_is_revoked(aws_context, ec2, capsys):
    """Stacks made before it was dropped: the next create-vpc closes it (least privilege)."""
    c = aws_context()
    network.create_vpc(c)
    groups = by_role(stack_resources(ec2, c.config.aws.stack)["security_groups"])
    worker, backend = groups["worker"]["GroupId"], groups["backend"]["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=backend, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "UserIdGroupPairs": [{"GroupId": worker}]}
    ])
    capsys.readouterr()

    result = network.create_vpc(c)

    groups = by_role(stack_resources(ec2, c.config.aws.stack)["security_groups"])
    assert ingress(groups["backend"]) == {(22, "203.0.113.7/32"), (5000, groups["frontend"]["GroupId"])}
    assert f"  changed: security-group {backend} revoke tcp/22 from {worker}\n" in capsys.readouterr().out
    assert result["changed"] == 1


def test_a_new_route_table_not_found_yet_is_retried(aws_context, ec2, api_calls, capsys):
    """Real AWS may not know a just created route table for a moment, and botocore's
    standard retry mode doesn't retry `InvalidRouteTableID.NotFound`: the task does."""
    c = aws_context()
    calls = api_calls(c)
    refused = []

    def not_yet(params, **_):
        if not refused:
            refused.append(params["body"]["RouteTableId"])
            raise ClientError({"Error": {"Code": "InvalidRouteTableID.NotFound",
                                         "Message": "The routeTable ID does not exist"}},
                              "AssociateRouteTable")

    cloud.session(c).events.register("before-call.ec2.AssociateRouteTable", not_yet)
    network.create_vpc(c)

    found = stack_resources(ec2, c.config.aws.stack)
    [table], [subnet] = found["route_tables"], found["subnets"]
    assert refused == [table["RouteTableId"]]
    assert [a["SubnetId"] for a in table["Associations"]] == [subnet["SubnetId"]]
    assert calls.count("AssociateRouteTable") == 2
    assert f"  changed: route-table {table['RouteTableId']} associated to subnet" in capsys.readouterr().out


def test_other_errors_of_the_association_are_not_retried(aws_context, api_calls):
    c = aws_context()
    calls = api_calls(c)

    def refuse(**_):
        raise ClientError({"Error": {"Code": "UnauthorizedOperation", "Message": "no"}}, "AssociateRouteTable")

    cloud.session(c).events.register("before-call.ec2.AssociateRouteTable", refuse)
    with pytest.raises(cloud.StepFailed, match=r"association of rtb-.*UnauthorizedOperation"):
        network.create_vpc(c)
    assert calls.count("AssociateRouteTable") == 1


@pytest.fixture
def address_echo():
    """Factory: a loopback HTTP server answering like checkip.amazonaws.com."""
    servers = []

    def serve(answer):
        class Echo(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.end_headers()
                self.wfile.write(answer.encode())

            def log_message(self, *_):
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Echo)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_ssh_cidr_detected_and_followed_when_the_address_changes(aws_context, ec2, address_echo, capsys):
    c = aws_context(aws={"ssh_cidr": None, "ip_check_url": address_echo("198.51.100.23\n")})
    network.create_vpc(c)
    groups = by_role(stack_resources(ec2, c.config.aws.stack)["security_groups"])
    assert ingress(groups["worker"]) == {(22, "198.51.100.23/32")}

    c.config.aws.ip_check_url = address_echo("198.51.100.99")
    network.create_vpc(c)
    groups = by_role(stack_resources(ec2, c.config.aws.stack)["security_groups"])
    assert ingress(groups["worker"]) == {(22, "198.51.100.99/32")}
    assert ingress(groups["frontend"]) == {(22, "198.51.100.99/32"), (80, "0.0.0.0/0")}
    assert "revoke tcp/22 from 198.51.100.23/32" in capsys.readouterr().out


def test_ssh_cidr_option_wins(aws_context, ec2):
    c = aws_context()
    network.create_vpc(c, ssh_cidr="198.51.100.0/24")
    groups = by_role(stack_resources(ec2, c.config.aws.stack)["security_groups"])
    assert ingress(groups["worker"]) == {(22, "198.51.100.0/24")}



def test_https_opens_443_to_the_world_only_with_a_domain(aws_context, ec2, capsys):
    """frontend.domain (HTTPS, docs/https.md): 443 open to the world besides 80 (the ACME
    challenge and the redirect); the domain unset again, 443 is closed."""
    c = aws_context(frontend={"domain": "digits.example.org"})
    network.create_vpc(c)
    groups = by_role(stack_resources(ec2, c.config.aws.stack)["security_groups"])
    assert ingress(groups["frontend"]) == {(22, "203.0.113.7/32"), (80, "0.0.0.0/0"), (443, "0.0.0.0/0")}
    assert ingress(groups["backend"]) == {(22, "203.0.113.7/32"), (5000, groups["frontend"]["GroupId"])}
    network.create_vpc(aws_context(stack=c.config.aws.stack))
    groups = by_role(stack_resources(ec2, c.config.aws.stack)["security_groups"])
    assert ingress(groups["frontend"]) == {(22, "203.0.113.7/32"), (80, "0.0.0.0/0")}
    assert "revoke tcp/443 from 0.0.0.0/0" in capsys.readouterr().out

def test_failed_detection_stops_before_anything_exists(aws_context, ec2):
    c = aws_context(aws={"ssh_cidr": None})  # ip_check_url: a closed loopback port
    with pytest.raises(cloud.ConfigError, match=r"could not detect.*aws\.ssh_cidr.*--ssh-cidr"):
        network.create_vpc(c)
    assert ec2.describe_vpcs(Filters=[{"Name": "tag:Project", "Values": [c.config.aws.stack]}])["Vpcs"] == []


def test_garbage_from_detection_is_refused(aws_context, address_echo):
    c = aws_context(aws={"ssh_cidr": None, "ip_check_url": address_echo("<html>captive portal</html>")})
    with pytest.raises(cloud.ConfigError, match="could not detect"):
        network.create_vpc(c)


def test_world_ssh_only_when_asked_and_loudly(aws_context, ec2, capsys):
    c = aws_context(aws={"ssh_cidr": "0.0.0.0/0"})
    network.create_vpc(c)
    groups = by_role(stack_resources(ec2, c.config.aws.stack)["security_groups"])
    assert (22, "0.0.0.0/0") in ingress(groups["worker"])
    assert "WARNING: SSH (22) is open to the whole internet" in capsys.readouterr().err


@pytest.mark.parametrize(
    "aws, message",
    [
        ({"region": "mars-north-1"}, "unknown AWS region 'mars-north-1'"),
        ({"vpc_cidr": "192.168.0.0/33"}, "aws.vpc_cidr='192.168.0.0/33' is not a CIDR"),
        ({"vpc_cidr": "192.168.1.0/16"}, "aws.vpc_cidr='192.168.1.0/16' is not a CIDR"),
        ({"subnet_cidr": "10.0.0.0/24"}, "must be an IPv4 block inside aws.vpc_cidr"),
        ({"ssh_cidr": "my laptop"}, "aws.ssh_cidr='my laptop' is not an address"),
        # `launch`'s setting, but checked before create-vpc makes a network nothing could use.
        ({"ubuntu_release": "22.04"}, r"Ubuntu 22.04 ships Python 3.10.*need Python 3.11 or later: use 24.04"),
    ],
)
def test_bad_config_fails_before_any_call(aws_context, ec2, aws, message):
    c = aws_context(aws=aws)
    calls = []
    # Record on every session this config could make (a bad region never gets one).
    try:
        cloud.session(c).events.register("before-call", lambda event_name, **_: calls.append(event_name))
    except cloud.ConfigError:
        pass
    with pytest.raises(cloud.ConfigError, match=message):
        network.create_vpc(c)
    assert calls == []
    assert ec2.describe_vpcs(Filters=[{"Name": "tag:Project", "Values": [c.config.aws.stack]}])["Vpcs"] == []


def test_state_file_is_a_cache_rebuilt_from_tags(aws_context):
    c = aws_context()
    network.create_vpc(c)
    saved = state.load(c)
    state.path(c).write_text("{not json")
    assert state.load(c)["vpc_id"] is None  # unreadable: empty, never an exception
    state.path(c).unlink()
    assert state.refresh(c) == saved  # lost
    state.save(c, {**saved, "vpc_id": "vpc-0stale", "subnet_id": None})
    assert state.refresh(c) == saved  # stale
    assert state.load(c) == saved
    assert not list(state.path(c).parent.glob("*.tmp"))
    other = aws_context(aws={"state_file": c.config.aws.state_file.replace("{stack}", c.config.aws.stack)})
    assert state.load(other)["vpc_id"] is None  # another stack's file is not ours


def test_region_and_profile_come_from_boto3s_usual_places(aws_context, monkeypatch, tmp_path):
    # eu-north-1 has no t2 at all: its front-end and back-end get a t3.micro (see test_placement.py).
    c = aws_context(aws={"region": None, "instance_types": {"worker": "m5.xlarge", "frontend": "t3.micro",
                                                             "backend": "t3.micro"}})
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-north-1")
    network.create_vpc(c)
    assert state.load(c)["region"] == "eu-north-1"

    # An explicit profile brings its own (fake) credentials: boto3 then ignores the environment's.
    (tmp_path / "no-aws-config").write_text(
        "[profile lab]\nregion = ap-south-1\naws_access_key_id = testing\naws_secret_access_key = testing\n"
    )
    monkeypatch.delenv("AWS_DEFAULT_REGION")  # it would win over the profile's region
    c = aws_context(aws={"region": None, "profile": "lab"})
    network.create_vpc(c)
    assert state.load(c)["region"] == "ap-south-1"
    assert state.load(c)["vpc_id"] in [v["VpcId"] for v in cloud.client(c).describe_vpcs()["Vpcs"]]

    with pytest.raises(cloud.ConfigError, match=r"profile \(nope\) could not be found \(aws.profile"):
        network.create_vpc(aws_context(aws={"profile": "nope"}))


def test_aws_errors_name_the_task_to_rerun(aws_context, monkeypatch):
    c = aws_context()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    cloud.forget_sessions()
    with pytest.raises(cloud.StepFailed, match=r"Unable to locate credentials\n.*`fab create-vpc`"):
        network.create_vpc(c)
