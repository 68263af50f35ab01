"""Guide, "Architecture" steps 1-4 and 7: VPC, public subnet, internet gateway, routes, security groups.

Every step first looks for the stack's tagged resource and creates it only if
missing, so a second run changes nothing and an interrupted run resumes.
"""
import ipaddress
import urllib.request

from invoke import task

from . import cloud, state
from .cloud import say
from .config import ROLES

TASK = "create-vpc"
WORLD = "0.0.0.0/0"


@task(
    help={
        "ssh-cidr": "who may SSH in (default: aws.ssh_cidr, else your detected public address /32)",
        "dry-run": "print what would be created or changed, change nothing",
    }
)
@cloud.resumable(TASK)
def create_vpc(c, ssh_cidr=None, dry_run=False):
    """Create (or check) the stack's VPC, subnet, internet gateway, route table and security groups."""
    vpc_cidr, subnet_cidr = _cidrs(c)
    ec2 = cloud.client(c)
    admin = admin_cidr(c, ssh_cidr)
    vpc_id = _vpc(c, ec2, vpc_cidr, dry_run)
    subnet_id = _subnet(c, ec2, vpc_id, subnet_cidr, dry_run)
    igw_id = _internet_gateway(c, ec2, vpc_id, dry_run)
    _route_table(c, ec2, vpc_id, subnet_id, igw_id, dry_run)
    groups = {}
    for role in ROLES:  # worker first: the back-end's rules refer to its group
        groups[role] = _security_group(c, ec2, vpc_id, role, ingress(c, role, admin, groups), dry_run)
    if not dry_run:
        state.refresh(c, ec2)


def _cidrs(c):
    vpc = cloud.network(c.config.aws.vpc_cidr, "aws.vpc_cidr")
    subnet = cloud.network(c.config.aws.subnet_cidr, "aws.subnet_cidr")
    if vpc.version != 4 or subnet.version != 4 or not subnet.subnet_of(vpc):
        raise cloud.ConfigError(f"aws.subnet_cidr {subnet} must be an IPv4 block inside aws.vpc_cidr {vpc}")
    return str(vpc), str(subnet)


def admin_cidr(c, option=None):
    """Where SSH may come from: the option, aws.ssh_cidr, else the detected public address.

    Never 0.0.0.0/0 unless asked for by name: the guide's open SSH is what bots scan for.
    """
    value = option or c.config.aws.ssh_cidr
    setting = "--ssh-cidr" if option else "aws.ssh_cidr"
    if not value:
        value, setting = detect_public_ip(c), f"the address from {c.config.aws.ip_check_url}"
    try:
        block = ipaddress.ip_network(str(value).strip(), strict=False)
    except ValueError as error:
        raise cloud.ConfigError(f"{setting}={value!r} is not an address or CIDR block") from error
    if block.prefixlen == 0:
        cloud.warn(f"SSH (22) is open to the whole internet ({block}) as asked by {setting}")
    return str(block)


def detect_public_ip(c):
    url, timeout = c.config.aws.ip_check_url, c.config.aws.ip_check_timeout
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return str(ipaddress.ip_address(answer.read(100).decode().strip()))
    except (OSError, ValueError) as error:
        raise cloud.ConfigError(
            f"could not detect your public address from {url} ({error}); "
            "set aws.ssh_cidr or pass --ssh-cidr (0.0.0.0/0 opens SSH to everyone)"
        ) from error


def ingress(c, role, admin, groups):
    """The guide's step 7 ports as (protocol, from, to, source), narrowed (see README.aws.md)."""
    rules = {("tcp", 22, 22, admin)}
    if role == "frontend":
        rules.add(("tcp", c.config.frontend.port, c.config.frontend.port, WORLD))
    if role == "backend":
        rules.add(("tcp", c.config.backend.port, c.config.backend.port, WORLD))
        # The guide copies the model from the worker to the back-end's private IP by scp.
        if groups.get("worker"):
            rules.add(("tcp", 22, 22, groups["worker"]))
    # Jupyter's 8888 stays closed: it is reached through an SSH tunnel.
    return rules


def _vpc(c, ec2, cidr, dry_run):
    found = cloud.find_one(c, ec2, "vpcs")
    if found:
        vpc_id = found["VpcId"]
        if found["CidrBlock"] != cidr:
            raise cloud.ConfigError(
                f"vpc {vpc_id} of stack {cloud.stack(c)} has CIDR {found['CidrBlock']}, "
                f"aws.vpc_cidr says {cidr}: destroy the stack or fix the setting"
            )
        say("exists", f"vpc {vpc_id}")
    elif dry_run:
        say("would create", f"vpc {cidr}")
        return None
    else:
        with cloud.step(f"vpc {cidr}", TASK):
            vpc_id = ec2.create_vpc(CidrBlock=cidr, TagSpecifications=cloud.tag_spec(c, "vpc", "vpc"))["Vpc"]["VpcId"]
            ec2.get_waiter("vpc_available").wait(VpcIds=[vpc_id])
        say("created", f"vpc {vpc_id}")
    # DNS hostnames give instances the public DNS names the guide connects to.
    with cloud.step(f"dns hostnames of vpc {vpc_id}", TASK):
        answer = ec2.describe_vpc_attribute(VpcId=vpc_id, Attribute="enableDnsHostnames")
        if not answer["EnableDnsHostnames"]["Value"]:
            if dry_run:
                say("would change", f"vpc {vpc_id} dns hostnames on")
            else:
                ec2.modify_vpc_attribute(VpcId=vpc_id, EnableDnsHostnames={"Value": True})
                say("changed", f"vpc {vpc_id} dns hostnames on")
    return vpc_id


def _subnet(c, ec2, vpc_id, cidr, dry_run):
    found = vpc_id and cloud.find_one(c, ec2, "subnets", vpc_id=vpc_id)
    if found:
        if found["CidrBlock"] != cidr:
            raise cloud.ConfigError(
                f"subnet {found['SubnetId']} has CIDR {found['CidrBlock']}, aws.subnet_cidr says {cidr}"
            )
        say("exists", f"subnet {found['SubnetId']}")
        return found["SubnetId"]
    if dry_run:
        say("would create", f"subnet {cidr}")
        return None
    with cloud.step(f"subnet {cidr}", TASK):
        spec = cloud.tag_spec(c, "subnet", "public")
        subnet_id = ec2.create_subnet(VpcId=vpc_id, CidrBlock=cidr, TagSpecifications=spec)["Subnet"]["SubnetId"]
        ec2.get_waiter("subnet_available").wait(SubnetIds=[subnet_id])
    say("created", f"subnet {subnet_id}")
    return subnet_id


def _internet_gateway(c, ec2, vpc_id, dry_run):
    found = cloud.find_one(c, ec2, "internet_gateways")
    if found:
        igw_id = found["InternetGatewayId"]
        say("exists", f"internet-gateway {igw_id}")
    elif dry_run:
        say("would create", "internet-gateway")
        say("would attach", f"internet-gateway to vpc {vpc_id or '(new)'}")
        return None
    else:
        with cloud.step("internet gateway", TASK):
            spec = cloud.tag_spec(c, "internet-gateway", "igw")
            igw_id = ec2.create_internet_gateway(TagSpecifications=spec)["InternetGateway"]["InternetGatewayId"]
            ec2.get_waiter("internet_gateway_exists").wait(InternetGatewayIds=[igw_id])
        say("created", f"internet-gateway {igw_id}")
        found = {"Attachments": []}
    attached = [a["VpcId"] for a in found.get("Attachments", [])]
    if vpc_id in attached:
        return igw_id
    if attached:
        raise cloud.StepFailed(f"internet-gateway {igw_id}", TASK, f"attached to another vpc {attached[0]}")
    if dry_run:
        say("would attach", f"internet-gateway {igw_id} to vpc {vpc_id or '(new)'}")
        return igw_id
    with cloud.step(f"attach internet-gateway {igw_id}", TASK):
        ec2.attach_internet_gateway(InternetGatewayId=igw_id, VpcId=vpc_id)
    say("changed", f"internet-gateway {igw_id} attached to {vpc_id}")
    return igw_id


def _route_table(c, ec2, vpc_id, subnet_id, igw_id, dry_run):
    found = vpc_id and cloud.find_one(c, ec2, "route_tables", vpc_id=vpc_id)
    if found:
        table_id = found["RouteTableId"]
        say("exists", f"route-table {table_id}")
    elif dry_run:
        say("would create", "route-table with 0.0.0.0/0 -> internet-gateway, for the subnet")
        return None
    else:
        with cloud.step("route table", TASK):
            spec = cloud.tag_spec(c, "route-table", "public")
            table_id = ec2.create_route_table(VpcId=vpc_id, TagSpecifications=spec)["RouteTable"]["RouteTableId"]
        say("created", f"route-table {table_id}")
        found = {"Routes": [], "Associations": []}
    # The local route (the VPC's own CIDR) is implicit; only the default route is ours.
    default = [r for r in found["Routes"] if r.get("DestinationCidrBlock") == WORLD]
    if not default or default[0].get("GatewayId") != igw_id:
        if dry_run:
            say("would change", f"route-table {table_id} 0.0.0.0/0 -> {igw_id}")
        else:
            call = ec2.replace_route if default else ec2.create_route
            with cloud.step(f"route 0.0.0.0/0 in {table_id}", TASK):
                call(RouteTableId=table_id, DestinationCidrBlock=WORLD, GatewayId=igw_id)
            say("changed", f"route-table {table_id} 0.0.0.0/0 -> {igw_id}")
    if subnet_id not in [a.get("SubnetId") for a in found["Associations"]]:
        if dry_run:
            say("would change", f"route-table {table_id} associated to subnet {subnet_id}")
        else:
            with cloud.step(f"association of {table_id} to {subnet_id}", TASK):
                ec2.associate_route_table(RouteTableId=table_id, SubnetId=subnet_id)
            say("changed", f"route-table {table_id} associated to subnet {subnet_id}")
    return table_id


def _security_group(c, ec2, vpc_id, role, wanted, dry_run):
    found = vpc_id and cloud.find_one(c, ec2, "security_groups", role, vpc_id=vpc_id)
    name = f"{cloud.stack(c)}-{role}"
    if found:
        group_id = found["GroupId"]
        say("exists", f"security-group {group_id} ({name})")
        have = _rules(found["IpPermissions"])
    elif dry_run:
        say("would create", f"security-group {name} {_describe(sorted(wanted, key=str))}")
        return None
    else:
        with cloud.step(f"security group {name}", TASK):
            group_id = ec2.create_security_group(
                GroupName=name,
                Description=f"{role} of stack {cloud.stack(c)}",
                VpcId=vpc_id,
                TagSpecifications=cloud.tag_spec(c, "security-group", role, role),
            )["GroupId"]
            ec2.get_waiter("security_group_exists").wait(GroupIds=[group_id])
        say("created", f"security-group {group_id} ({name})")
        have = set()
    # Reconcile both ways: a changed ssh_cidr must also close the old address.
    extra, missing = sorted(have - wanted, key=str), sorted(wanted - have, key=str)
    for verb, rules, call in (
        ("revoke", extra, ec2.revoke_security_group_ingress),
        ("allow", missing, ec2.authorize_security_group_ingress),
    ):
        if not rules:
            continue
        if dry_run:
            say("would change", f"security-group {group_id} {verb} {_describe(rules)}")
            continue
        with cloud.step(f"{verb} {_describe(rules)} on security group {name}", TASK):
            call(GroupId=group_id, IpPermissions=[_permission(rule) for rule in rules])
        say("changed", f"security-group {group_id} {verb} {_describe(rules)}")
    return group_id


def _rules(permissions):
    """AWS's nested IpPermissions, flattened to (protocol, from, to, source) tuples."""
    rules = set()
    for p in permissions:
        ports = (p["IpProtocol"], p.get("FromPort"), p.get("ToPort"))
        rules.update((*ports, r["CidrIp"]) for r in p.get("IpRanges", []))
        rules.update((*ports, r["CidrIpv6"]) for r in p.get("Ipv6Ranges", []))
        rules.update((*ports, g["GroupId"]) for g in p.get("UserIdGroupPairs", []))
    return rules


def _permission(rule):
    protocol, low, high, source = rule
    permission = {"IpProtocol": protocol, "FromPort": low, "ToPort": high}
    if source.startswith("sg-"):
        permission["UserIdGroupPairs"] = [{"GroupId": source}]
    elif ":" in source:
        permission["Ipv6Ranges"] = [{"CidrIpv6": source}]
    else:
        permission["IpRanges"] = [{"CidrIp": source}]
    return permission


def _describe(rules):
    return ", ".join(f"{p}/{low} from {source}" for p, low, _, source in rules)
