"""Issue 12 on moto: a first deploy on a real account, right the first time.

Each test here failed on the main before it: types a zone does not offer, account limits,
an image per architecture, the operator's address through a proxy or over IPv6, eventual
consistency after a create, a login that is not yet possible, advice that fits the error,
and `fab preflight`, which checks it all and creates nothing.
"""
import http.server
import threading

import pytest
from botocore.exceptions import ClientError

from tasks import cloud, deploy, errors, instances, network, preflight, state
from tasks.report import Tally
from tests.fixtures.moto import stack_resources

ARM_NOBLE = "ami-0d0d0d0d0d0d0d0d4"  # the fixtures' arm64 Ubuntu 24.04 image
NEWEST_NOBLE = "ami-0b0b0b0b0b0b0b0b2"


def nothing_of(ec2, c):
    """True when the stack has no resource at all in AWS."""
    return not any(stack_resources(ec2, c.config.aws.stack).values())


def types(worker="m5.xlarge", frontend="t2.micro", backend="t2.micro"):
    return {"instance_types": {"worker": worker, "frontend": frontend, "backend": backend}}


# --- 1. Instance types the zone does not offer ---------------------------------------------


def test_a_region_without_t2_is_refused_before_anything_exists_naming_the_alternatives(aws_context, ec2):
    c = aws_context(aws={"region": "eu-north-1"})  # no t2 in any of its zones
    with pytest.raises(errors.ConfigError) as refused:
        network.create_vpc(c)
    message = refused.value.message
    assert "aws.instance_types.frontend=t2.micro is not offered in eu-north-1" in message
    assert "offered here: t3.micro, t4g.micro" in message  # the region's own same-size types
    north = cloud.client(c)
    assert not [v for v in north.describe_vpcs()["Vpcs"] if not v["IsDefault"]]


@pytest.mark.parametrize("mode", ["proxied", "private"])
def test_subnets_go_to_a_zone_that_offers_every_type(aws_context, ec2, mode):
    """eu-west-3a, the region's first zone, has no c6id: both subnets go where the worker can run."""
    c = aws_context(aws=types(worker="c6id.xlarge"), backend={"mode": mode})
    network.create_vpc(c)
    subnets = stack_resources(ec2, c.config.aws.stack)["subnets"]
    assert len(subnets) == (2 if mode == "private" else 1)
    zones = {subnet["AvailabilityZone"] for subnet in subnets}
    [zone] = zones
    assert zone != "eu-west-3a"
    offered = ec2.describe_instance_type_offerings(
        LocationType="availability-zone", Filters=[{"Name": "location", "Values": [zone]},
                                                   {"Name": "instance-type", "Values": ["c6id.xlarge"]}])
    assert offered["InstanceTypeOfferings"]  # AWS's own data says the worker can run there


def test_launch_refuses_a_type_the_subnets_zone_lacks_before_any_instance(aws_context, ec2):
    c = aws_context()
    network.create_vpc(c)
    [subnet] = stack_resources(ec2, c.config.aws.stack)["subnets"]
    assert subnet["AvailabilityZone"] == "eu-west-3a"  # the first zone offering the default types
    c.config.aws.instance_types.worker = "c6id.xlarge"  # changed after the network was made
    with pytest.raises(errors.ConfigError, match=r"worker=c6id.xlarge is not offered in eu-west-3a.*offered there: "
                                                 r"t3.xlarge"):
        instances.launch(c, no_wait=True)
    found = stack_resources(ec2, c.config.aws.stack)
    assert found["instances"] == [] and found["addresses"] == [] and found["key_pairs"] == []


def test_an_unknown_instance_type_names_its_setting(aws_context):
    c = aws_context(aws=types(backend="t9.nano"))
    network.create_vpc(aws_context())  # (another stack's network: launch must stop at the type)
    with pytest.raises(errors.ConfigError, match=r"aws.instance_types.backend='t9.nano' is not an EC2 instance type"):
        preflight.type_info(c, cloud.client(c))


# --- 2. Account limits -----------------------------------------------------------------------


def test_elastic_ips_in_use_stop_launch_before_any_instance(aws_context, ec2):
    c = aws_context()
    network.create_vpc(c)
    for _ in range(3):
        ec2.allocate_address(Domain="vpc")  # someone else's, in the same account and region
    with pytest.raises(errors.QuotaExceeded) as refused:
        instances.launch(c, no_wait=True)
    message = refused.value.message
    assert refused.value.code == 3
    assert "EC2-VPC Elastic IPs: need 3, 3 in use, limit 5" in message
    assert "--service-code ec2 --quota-code L-0263D0A3 --desired-value 6" in message
    assert "re-run `fab" not in message  # re-running cannot help until the limit is raised
    found = stack_resources(ec2, c.config.aws.stack)
    assert found["instances"] == [] and found["key_pairs"] == []


def test_a_new_accounts_vcpu_limit_stops_launch_before_the_worker_runs(aws_context, ec2, account_quotas):
    """A new account often has fewer vCPUs than m5.xlarge + 2 x t2.micro (6): the billed worker
    must not be left running when the front-end's RunInstances is refused."""
    account_quotas.values["L-1216C47A"] = 5
    c = aws_context()
    with pytest.raises(errors.QuotaExceeded, match=r"vCPUs\): need 6, 0 in use, limit 5"):
        network.create_vpc(c)  # no VPC (nor NAT gateway) made for instances the account cannot run
    assert nothing_of(ec2, c)
    account_quotas.values["L-1216C47A"] = 6
    network.create_vpc(c)
    account_quotas.values["L-1216C47A"] = 5  # (another stack took some meanwhile, say)
    with pytest.raises(errors.QuotaExceeded, match=r"Running On-Demand Standard instances \(vCPUs\): need 6, 0 in use,"
                                                   r" limit 5 \(Service Quotas\).*--quota-code L-1216C47A"):
        instances.launch(c, no_wait=True)
    assert stack_resources(ec2, c.config.aws.stack)["instances"] == []

    account_quotas.values["L-1216C47A"] = 6  # raised: launch goes on, and counts what runs
    instances.launch(c, no_wait=True)
    assert preflight.standard_vcpus(ec2) == 6


def test_a_full_vpc_limit_stops_create_vpc_before_anything(aws_context, ec2):
    for n in range(4):  # with moto's default VPC: 5, the default limit
        ec2.create_vpc(CidrBlock=f"10.{n}.0.0/16")
    c = aws_context()
    with pytest.raises(errors.QuotaExceeded, match=r"VPCs per Region: need 1, 5 in use, limit 5 \(Service Quotas\)"):
        network.create_vpc(c)
    assert nothing_of(ec2, c)


# --- 6. Architecture ---------------------------------------------------------------------------


def test_a_graviton_backend_gets_an_arm64_image_and_the_others_amd64(aws_context, ec2):
    c = aws_context(aws=types(backend="t4g.micro"))
    network.create_vpc(c)
    instances.launch(c, no_wait=True)
    machines = {next(t["Value"] for t in i["Tags"] if t["Key"] == "Role"): i
                for i in stack_resources(ec2, c.config.aws.stack)["instances"]}
    assert machines["backend"]["ImageId"] == ARM_NOBLE and machines["backend"]["InstanceType"] == "t4g.micro"
    assert machines["worker"]["ImageId"] == machines["frontend"]["ImageId"] == NEWEST_NOBLE


def test_an_explicit_ami_of_the_wrong_architecture_is_refused_before_any_instance(aws_context, ec2):
    c = aws_context(aws={**types(backend="t4g.micro"), "ami": NEWEST_NOBLE})
    network.create_vpc(c)
    with pytest.raises(errors.ConfigError, match=r"aws.ami=ami-0b0b0b0b0b0b0b0b2 is an x86_64 image, but "
                                                 r"aws.instance_types.backend=t4g.micro runs arm64"):
        instances.launch(c, no_wait=True)
    assert stack_resources(ec2, c.config.aws.stack)["instances"] == []


def test_the_ssm_parameter_is_asked_per_architecture(aws_context, ec2):
    c = aws_context(aws={**types(backend="t4g.micro"), "ami_ssm_parameter": "/test/ubuntu/{release}/{arch}/ami-id"})
    network.create_vpc(c)
    ssm = cloud.client(c, "ssm")
    ssm.put_parameter(Name="/test/ubuntu/24.04/arm64/ami-id", Value=ARM_NOBLE, Type="String")
    ssm.put_parameter(Name="/test/ubuntu/24.04/amd64/ami-id", Value=NEWEST_NOBLE, Type="String")
    found = instances.images(c, cloud.client(c), preflight.type_info(c, cloud.client(c)), None)
    assert {arch: image["ImageId"] for arch, image in found.items()} == {"x86_64": NEWEST_NOBLE, "arm64": ARM_NOBLE}


# --- 4. The operator's address ------------------------------------------------------------------


class Answering:
    """A loopback HTTP server answering every request, plain or proxied, with `text`."""

    def __init__(self, text):
        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.server.hits += 1
                data = text.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.hits = 0
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def answering():
    made = []

    def make(text):
        made.append(Answering(text))
        return made[-1]

    yield make
    for server in made:
        server.close()


def test_the_address_check_never_goes_through_a_proxy(aws_context, ec2, answering, monkeypatch, aws_env):
    checker, proxy = answering("198.51.100.23\n"), answering("192.0.2.99\n")  # the proxy's own address
    moto = aws_env.split("//", 1)[1]  # AWS itself (moto) is reached directly; the checker is not excepted
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, moto)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, proxy.url)
    c = aws_context(aws={"ssh_cidr": None, "ip_check_url": checker.url})
    network.create_vpc(c)
    [group] = [g for g in stack_resources(ec2, c.config.aws.stack)["security_groups"]
               if {"Key": "Role", "Value": "frontend"} in g["Tags"]]
    sources = {r["CidrIp"] for p in group["IpPermissions"] if p["FromPort"] == 22 for r in p["IpRanges"]}
    assert sources == {"198.51.100.23/32"}
    assert (checker.server.hits, proxy.server.hits) == (1, 0)


@pytest.mark.parametrize("answer", ["2001:db8::7", "2001:db8::/64"])
def test_an_ipv6_address_is_refused_clearly(aws_context, ec2, answering, answer):
    if "/" in answer:  # given in config
        c = aws_context(aws={"ssh_cidr": answer})
    else:  # detected
        c = aws_context(aws={"ssh_cidr": None, "ip_check_url": answering(answer).url})
    with pytest.raises(errors.ConfigError, match=r"IPv6.*VPC has IPv4 only: set aws.ssh_cidr"):
        network.create_vpc(c)
    assert nothing_of(ec2, c)


# --- 5. Eventual consistency and the wait for SSH ------------------------------------------------


def test_resources_not_found_just_after_their_creation_are_waited_for(aws_context, ec2, scripted_aws, capsys):
    """AWS may not know for a moment what it has just created; moto always does, so the proxy answers
    as AWS would: NotFound for the VPC's waiter and attribute, the subnet's waiter, the key pair
    in RunInstances, the new address in AssociateAddress and the subnet in CreateNatGateway."""
    for kind, code, after in (
        ("ec2:DescribeVpcs", "InvalidVpcID.NotFound", "ec2:CreateVpc"),
        ("ec2:DescribeVpcAttribute", "InvalidVpcID.NotFound", "ec2:CreateVpc"),
        ("ec2:ModifyVpcAttribute", "InvalidVpcID.NotFound", "ec2:CreateVpc"),
        ("ec2:DescribeSubnets", "InvalidSubnetID.NotFound", "ec2:CreateSubnet"),
        ("ec2:DescribeInternetGateways", "InvalidInternetGatewayID.NotFound", "ec2:CreateInternetGateway"),
        ("ec2:AttachInternetGateway", "InvalidInternetGatewayID.NotFound", None),
        ("ec2:CreateNatGateway", "InvalidSubnetID.NotFound", None),
        ("ec2:RunInstances", "InvalidKeyPair.NotFound", "ec2:ImportKeyPair"),
        ("ec2:AssociateAddress", "InvalidAllocationID.NotFound", "ec2:AllocateAddress"),
    ):
        scripted_aws.script(kind, code, times=1, after=after)
    c = aws_context(backend={"mode": "private"})
    network.create_vpc(c)
    instances.launch(c, no_wait=True)
    assert all(times == 0 for times, _, _ in scripted_aws.scripted.values())  # each was answered NotFound once
    found = stack_resources(ec2, c.config.aws.stack)
    assert len(found["vpcs"]) == 1 and len(found["subnets"]) == 2 and len(found["nat_gateways"]) == 1
    assert len(found["instances"]) == 3  # a retried RunInstances starts one instance, not two
    assert sorted(bool(a.get("InstanceId")) for a in found["addresses"]) == [False, True, True]  # NAT's, 2 machines


def test_launch_waits_for_a_real_login_not_a_banner(aws_context, ssh_logins, capsys):
    """sshd answers before cloud-init has installed the key: a banner is not a way in."""
    c = aws_context(ssh={"timeout": 60})
    network.create_vpc(c)
    ssh_logins.refuse_for(4)
    instances.launch(c)
    assert ssh_logins.refused >= 1 and ssh_logins.logins >= 3
    out = capsys.readouterr().out
    assert "... worker not letting us in yet" in out
    assert out.count("  checked: ssh login on the ") == 3


def test_an_instance_without_its_address_is_not_ready(aws_context, ec2):
    c = aws_context(ssh={"timeout": 2})
    network.create_vpc(c)
    instances.launch(c, no_wait=True)
    worker = state.load(c)["instances"]["worker"]
    ec2.disassociate_address(PublicIp=worker["public_ip"])
    data = state.refresh(c)
    assert data["instances"]["worker"]["public_ip"] is None
    with Tally("launch", "aws") as tally, pytest.raises(errors.StepFailed, match=r"no address for the worker"):
        instances.wait_for_ssh(c, data, ["worker"], tally)


# --- 10. Advice that fits the error ----------------------------------------------------------------


def client_error(code, message="", operation="RunInstances"):
    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


@pytest.mark.parametrize("code, message, operation, expected", [
    ("UnauthorizedOperation", "You are not authorized to perform this operation. User: arn:aws:iam::1:user/x is not"
     " authorized to perform: ec2:CreateNatGateway on resource", "CreateNatGateway",
     "missing permission ec2:CreateNatGateway: attach the policy in iam/digits-operator.json"),
    ("AccessDeniedException", "", "GetServiceQuota", "missing permission servicequotas:GetServiceQuota"),
    ("VcpuLimitExceeded", "", "RunInstances", "--quota-code L-1216C47A"),
    ("AddressLimitExceeded", "", "AllocateAddress", "EC2-VPC Elastic IPs"),
    ("Unsupported", "Your requested instance type (t2.micro) is not supported in your requested Availability Zone",
     "RunInstances", "set aws.instance_types.<role> to one offered there"),
    ("InsufficientInstanceCapacity", "", "RunInstances", "no capacity for this type in this zone right now: re-run"
     " later"),
    ("PendingVerification", "", "RunInstances", "AWS is still verifying this account or region"),
    ("OptInRequired", "", "DescribeVpcs", "not enabled for EC2"),
    ("AuthFailure", "", "DescribeVpcs", "your AWS credentials were refused"),
    ("RequestLimitExceeded", "", "DescribeVpcs", "re-run `fab launch`: it finds"),
    ("InvalidParameterValue", "bad value", "RunInstances", "fix what AWS says above, then re-run"),
])
def test_each_error_gets_the_next_step_that_helps(code, message, operation, expected):
    failed = errors.StepFailed("instance worker", "launch", client_error(code, message, operation))
    assert expected in failed.message
    assert failed.message.startswith(f"step failed: instance worker: An error occurred ({code})")
    # Only a transient error is advised as "re-run" alone; the rest name something to do first.
    alone = failed.message.splitlines()[-1].startswith("re-run")
    assert alone == (code == "RequestLimitExceeded")


# --- fab preflight -------------------------------------------------------------------------------


def test_preflight_checks_everything_and_creates_nothing(aws_context, ec2, api_calls, capsys):
    c = aws_context(aws=types(backend="t4g.micro"))
    calls = api_calls(c)
    result = preflight.preflight(c)
    assert result["problems"] == 0
    out = capsys.readouterr().out
    for line in ("credentials", "region  ", "instance types", "zone", "images", "limit VPCs per Region",
                 "limit EC2-VPC Elastic IPs", "limit Running On-Demand Standard", "launch worker", "launch backend",
                 "your address", "key"):
        assert any(row.startswith("  ok") and line in row for row in out.splitlines()), (line, out)
    assert "arm64 ami-0d0d0d0d0d0d0d0d4" in out and "x86_64 ami-0b0b0b0b0b0b0b0b2" in out
    assert "backend t4g.micro (arm64, 2 vCPU)" in out
    assert "PREFLIGHT ok: nothing was created" in out
    assert not [call for call in calls if not call.startswith(("Describe", "Get"))
                and call != "RunInstances"], calls  # RunInstances only as DryRun
    assert nothing_of(ec2, c) and not state.key_file(c).exists()
    assert ec2.describe_instances()["Reservations"] == []  # the RunInstances were dry runs, tagged or not


def test_a_graviton_worker_is_refused_before_anything_exists(aws_context, ec2):
    """TensorFlow has no aarch64 wheel: an arm64 worker would launch, billed, and fail at pip."""
    c = aws_context(aws=types(worker="m6g.xlarge"))
    with pytest.raises(errors.ConfigError, match=r"worker=m6g.xlarge runs arm64, and the worker needs x86_64"):
        network.create_vpc(c)
    assert nothing_of(ec2, c)
    north = aws_context(aws={"region": "ap-southeast-5"})  # no m5.xlarge there: only x86_64 alternatives
    with pytest.raises(errors.ConfigError) as refused:
        network.create_vpc(north)
    worker = next(p for p in refused.value.message.split("; ") if "instance_types.worker" in p)
    assert "offered here:" in worker and not any(arm in worker for arm in ("m6g", "m7g", "t4g", "c7g"))


def test_preflight_lists_every_problem_and_exits_non_zero(aws_context, ec2, capsys):
    c = aws_context(aws={"region": "eu-north-1"})
    north = cloud.client(c)
    for _ in range(4):
        north.allocate_address(Domain="vpc")
    with pytest.raises(errors.PreflightFailed) as failed:
        preflight.preflight(c)
    assert failed.value.code == 2
    out = capsys.readouterr().out
    problems = [row for row in out.splitlines() if row.startswith("  PROBLEM")]
    assert len(problems) == 2, out
    assert "zone" in problems[0] and "t2.micro is not offered in eu-north-1" in problems[0]
    assert "limit EC2-VPC Elastic IPs" in problems[1] and "need 3, 4 in use, limit 5" in problems[1]
    assert "2 problem(s): zone, limit EC2-VPC Elastic IPs" in failed.value.message


def test_deploy_runs_preflight_first_and_stops_there(aws_context, ec2, capsys):
    c = aws_context(aws={"region": "eu-north-1"})
    with pytest.raises(deploy.Exit, match=r"deploy stopped at `preflight`"):
        deploy.deploy(c)
    assert "== create-vpc" not in capsys.readouterr().out
    assert not [v for v in cloud.client(c).describe_vpcs()["Vpcs"] if not v["IsDefault"]]
