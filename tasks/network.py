"""Guide, "Architecture" steps 1-4 and 7: VPC, subnets, internet gateway, routes, security groups.

Every step first looks for the stack's tagged resource and creates it only if
missing, so a second run changes nothing and an interrupted run resumes.
With backend.mode "private" (the guide's "ideally in a private subnet") it also
makes the back-end's private subnet and the NAT gateway that lets it install packages.
"""
import ipaddress
import urllib.request
import uuid

from invoke import task

from . import cloud, preflight, state
from .config import ROLES, backend_mode

# A resource just created can be unknown for a moment to the next call on real AWS
# (eventual consistency); botocore's retry modes don't retry that.
from .errors import NEW_GATEWAY_NOT_FOUND, NEW_SUBNET_NOT_FOUND, NEW_TABLE_NOT_FOUND, NEW_VPC_NOT_FOUND

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
    """Create (or check) the stack's VPC, subnets, gateways, route tables and security groups."""
    cidrs = _cidrs(c)
    mode = backend_mode(c)
    cloud.ubuntu_release(c)  # `launch`'s setting, checked before this creates anything for it
    ec2 = cloud.client(c)
    admin = admin_cidr(c, ssh_cidr)
    with cloud.AwsRun(c, TASK, dry_run, ec2=ec2) as aws:
        # Before the first change: a zone offering every configured type, and the limits.
        with aws.step("the zones' instance type offerings"):
            zone = preflight.choose_zone(c, ec2)
        # launch's share too: a VPC (and a NAT gateway, billed by the hour) made for instances the
        # account cannot run would be stranded.
        preflight.ensure_quotas(aws, ("vpc", "nat", "eip", "vcpu"))
        vpc_id = _vpc(aws, cidrs["vpc"])
        subnet_id = _subnet(aws, vpc_id, cidrs["public"], "public", zone=zone)
        igw_id = _internet_gateway(aws, vpc_id)
        _route_table(aws, vpc_id, subnet_id, "public", ("GatewayId", igw_id))
        if mode == "private":
            private_id = _subnet(aws, vpc_id, cidrs["private"], "private", beside=subnet_id)
            nat_id = _nat_gateway(aws, subnet_id)
            _route_table(aws, vpc_id, private_id, "private", ("NatGatewayId", nat_id))
        else:
            _left_over_nat(aws, mode)
        groups = {}
        for role in ROLES:  # the front-end's group first: the back-end's rules name it
            groups[role] = _security_group(aws, vpc_id, role, ingress(c, role, admin, groups))
        if not dry_run:
            state.refresh(c, ec2)
    return aws.result


def _cidrs(c):
    """{"vpc", "public", "private"}: the configured blocks, checked to fit together."""
    aws = c.config.aws
    vpc = cloud.network(aws.vpc_cidr, "aws.vpc_cidr")
    found = {"vpc": vpc}
    for name, setting in (("public", "subnet_cidr"), ("private", "private_subnet_cidr")):
        subnet = found[name] = cloud.network(aws[setting], f"aws.{setting}")
        if vpc.version != 4 or subnet.version != 4 or not subnet.subnet_of(vpc):
            raise cloud.ConfigError(f"aws.{setting} {subnet} must be an IPv4 block inside aws.vpc_cidr {vpc}")
    if found["public"].overlaps(found["private"]):
        raise cloud.ConfigError(f"aws.subnet_cidr {found['public']} and aws.private_subnet_cidr"
                                f" {found['private']} overlap")
    return {name: str(block) for name, block in found.items()}


def admin_cidr(c, option=None):
    """Where SSH may come from: the option, aws.ssh_cidr, else the detected public address.

    Never 0.0.0.0/0 unless asked for by name: the guide's open SSH is what bots scan for.
    IPv4 only: the VPC has no IPv6, so an IPv6 rule would let nobody in.
    """
    value = option or c.config.aws.ssh_cidr
    setting = "--ssh-cidr" if option else "aws.ssh_cidr"
    if not value:
        value, setting = detect_public_ip(c), f"the address from {c.config.aws.ip_check_url}"
    try:
        block = ipaddress.ip_network(str(value).strip(), strict=False)
    except ValueError as error:
        raise cloud.ConfigError(f"{setting}={value!r} is not an address or CIDR block") from error
    if block.version != 4:
        raise cloud.ConfigError(f"{setting}={value!r} is IPv6, and the stack's VPC has IPv4 only: set aws.ssh_cidr"
                                " (or --ssh-cidr) to your public IPv4 address, e.g. 198.51.100.7/32")
    if block.prefixlen == 0:
        cloud.warn(f"SSH (22) is open to the whole internet ({block}) as asked by {setting}")
    return str(block)


# Straight to the address checker, never through HTTP(S)_PROXY: through a proxy it answers the
# proxy's address, and the security group would let the proxy in instead of the operator.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def detect_public_ip(c):
    """The operator's public IPv4 address, as aws.ip_check_url sees it without any proxy."""
    url, timeout = c.config.aws.ip_check_url, c.config.aws.ip_check_timeout
    if not str(url).startswith(("https://", "http://")):  # never file: or a custom scheme
        raise cloud.ConfigError(f"aws.ip_check_url={url!r} is not an http(s) URL")
    try:
        with DIRECT.open(url, timeout=timeout) as answer:
            text = answer.read(100).decode().strip()
        found = ipaddress.ip_address(text)
    except (OSError, ValueError) as error:
        raise cloud.ConfigError(
            f"could not detect your public address from {url} ({error}); "
            "set aws.ssh_cidr or pass --ssh-cidr (0.0.0.0/0 opens SSH to everyone)"
        ) from error
    if found.version != 4:
        raise cloud.ConfigError(
            f"{url} answered {found}, an IPv6 address, and the stack's VPC has IPv4 only: set aws.ssh_cidr"
            " to your public IPv4 address /32, or aws.ip_check_url to a checker that answers IPv4"
            " (https://checkip.amazonaws.com does)")
    return str(found)


def ingress(c, role, admin, groups):
    """The guide's step 7 ports as (protocol, from, to, source), narrowed (README, "Modes").

    `groups` holds the ids of the groups made so far (the front-end's is named by
    the back-end's rules). No rule from the worker: `push-model --from-worker`
    relays the model over SFTP through the operator, so the guide's scp needs no port.
    """
    mode, web, api = backend_mode(c), c.config.frontend.port, c.config.backend.port
    front = groups.get("frontend") or f"{cloud.stack(c)}-frontend"  # (a dry run's group to be)
    if role == "frontend":  # 443 with frontend.domain (HTTPS); web stays open for ACME and the redirect
        https = {("tcp", 443, 443, WORLD)} if c.config.frontend.get("domain") else set()
        return {("tcp", 22, 22, admin), ("tcp", web, web, WORLD), *https}
    if role == "backend":
        ssh = front if mode == "private" else admin  # private: only through the front-end
        # public: the world meets apache on the back-end host there, gunicorn is on the loopback
        # (tasks/public_edge.py); no rule ever opens backend.app_port
        return {("tcp", 22, 22, ssh), ("tcp", api, api, WORLD if mode == "public" else front)}
    return {("tcp", 22, 22, admin)}  # the worker: Jupyter's 8888 is reached through an SSH tunnel


def _vpc(aws, cidr):
    vpc_id, _ = ensure_vpc(aws, cidr)
    if vpc_id:
        ensure_dns_hostnames(aws, vpc_id)
    return vpc_id


def ensure_vpc(aws, cidr):
    """(vpc id, changed): the stack's VPC, found by tag, else made (None in a dry run)."""
    found = aws.find_one("vpcs")
    if found:
        vpc_id = found["VpcId"]
        if found["CidrBlock"] != cidr:
            raise cloud.ConfigError(
                f"vpc {vpc_id} of stack {aws.stack} has CIDR {found['CidrBlock']}, "
                f"aws.vpc_cidr says {cidr}: destroy the stack or fix the setting"
            )
        aws.ok(f"vpc {vpc_id} exists")
        return vpc_id, False
    if aws.dry_run:
        aws.would(f"create vpc {cidr}")
        return None, True
    with aws.step(f"vpc {cidr}"):
        vpc_id = aws.ec2.create_vpc(CidrBlock=cidr, TagSpecifications=aws.tag_spec("vpc", "vpc"))["Vpc"]["VpcId"]
        cloud.wait(aws.ec2, "vpc_available", VpcIds=[vpc_id])
    aws.changed(f"vpc {vpc_id} created")
    return vpc_id, True


def ensure_dns_hostnames(aws, vpc_id):
    """DNS hostnames give instances the public DNS names the guide connects to; whether changed."""
    with aws.step(f"dns hostnames of vpc {vpc_id}"):
        answer = cloud.retry(aws.ec2.describe_vpc_attribute, NEW_VPC_NOT_FOUND, attempts=8, delay=2,
                             VpcId=vpc_id, Attribute="enableDnsHostnames")
        if answer["EnableDnsHostnames"]["Value"]:
            aws.ok(f"vpc {vpc_id} dns hostnames on")
            return False
        if aws.dry_run:
            aws.would(f"change vpc {vpc_id} dns hostnames on")
            return True
        cloud.retry(aws.ec2.modify_vpc_attribute, NEW_VPC_NOT_FOUND, attempts=8, delay=2,
                    VpcId=vpc_id, EnableDnsHostnames={"Value": True})
    aws.changed(f"vpc {vpc_id} dns hostnames on")
    return True


def _subnet(aws, vpc_id, cidr, name, beside=None, zone=None):
    """The "public" subnet (the guide's one) or the back-end's "private" one, found by Name tag;
    made in `zone` (one that offers every configured instance type), or in the availability zone
    of the subnet `beside` (the NAT gateway's), if given: no traffic between zones, billed, and
    no dependency on a second zone."""
    setting = "aws.subnet_cidr" if name == "public" else "aws.private_subnet_cidr"
    found = vpc_id and aws.find_one("subnets", vpc_id=vpc_id, name=name)
    if found:
        if found["CidrBlock"] != cidr:
            raise cloud.ConfigError(
                f"{name} subnet {found['SubnetId']} has CIDR {found['CidrBlock']}, {setting} says {cidr}"
            )
        aws.ok(f"subnet {found['SubnetId']} ({name}) exists")
        return found["SubnetId"]
    if aws.dry_run:
        aws.would(f"create subnet {cidr} ({name})")
        return None
    with aws.step(f"{name} subnet {cidr}"):
        if beside:
            [other] = cloud.retry(aws.ec2.describe_subnets, NEW_SUBNET_NOT_FOUND, attempts=8, delay=2,
                                  SubnetIds=[beside])["Subnets"]
            zone = other["AvailabilityZone"]
        spec = aws.tag_spec("subnet", name)
        made = cloud.retry(aws.ec2.create_subnet, NEW_VPC_NOT_FOUND, attempts=8, delay=2,
                           VpcId=vpc_id, CidrBlock=cidr, AvailabilityZone=zone, TagSpecifications=spec)
        subnet_id = made["Subnet"]["SubnetId"]
        cloud.wait(aws.ec2, "subnet_available", SubnetIds=[subnet_id])
    aws.changed(f"subnet {subnet_id} ({name}) created in {zone}")
    return subnet_id


def _internet_gateway(aws, vpc_id):
    """The stack's internet gateway, attached to its VPC: its id (None in a dry run that would make it)."""
    gateway, _ = ensure_internet_gateway(aws, vpc_id)
    if gateway is None:
        return None
    ensure_gateway_attached(aws, gateway, vpc_id)
    return gateway["InternetGatewayId"]


def ensure_internet_gateway(aws, vpc_id):
    """(gateway, changed): found by tag, else made, as AWS describes it (None in a dry run)."""
    found = aws.find_one("internet_gateways")
    if found:
        aws.ok(f"internet-gateway {found['InternetGatewayId']} exists")
        return found, False
    if aws.dry_run:
        aws.would("create internet-gateway")
        aws.would(f"attach internet-gateway to vpc {vpc_id or '(new)'}")
        return None, True
    with aws.step("internet gateway"):
        spec = aws.tag_spec("internet-gateway", "igw")
        made = aws.ec2.create_internet_gateway(TagSpecifications=spec)["InternetGateway"]
        # (botocore's waiter retries InvalidInternetGateway.NotFound; EC2 answers ...GatewayID.NotFound)
        cloud.wait(aws.ec2, "internet_gateway_exists", InternetGatewayIds=[made["InternetGatewayId"]])
    aws.changed(f"internet-gateway {made['InternetGatewayId']} created")
    return made, True


def ensure_gateway_attached(aws, gateway, vpc_id):
    """The gateway attached to the stack's VPC (an error if to another); whether changed."""
    igw_id = gateway["InternetGatewayId"]
    attached = [a["VpcId"] for a in gateway.get("Attachments", [])]
    if vpc_id in attached:
        aws.ok(f"internet-gateway {igw_id} attached to {vpc_id}")
        return False
    if attached:
        raise cloud.StepFailed(f"internet-gateway {igw_id}", aws.task, f"attached to another vpc {attached[0]}",
                               next_step=f"detach it from {attached[0]} (or delete it), then re-run `fab {aws.task}`")
    if aws.dry_run:
        aws.would(f"attach internet-gateway {igw_id} to vpc {vpc_id or '(new)'}")
        return True
    with aws.step(f"attach internet-gateway {igw_id}"):
        cloud.retry(aws.ec2.attach_internet_gateway, NEW_GATEWAY_NOT_FOUND + NEW_VPC_NOT_FOUND, attempts=8, delay=2,
                    InternetGatewayId=igw_id, VpcId=vpc_id)
    aws.changed(f"internet-gateway {igw_id} attached to {vpc_id}")
    return True


def _route_table(aws, vpc_id, subnet_id, name, target):
    """A route table (found by Name tag) sending 0.0.0.0/0 to `target`, e.g. ("GatewayId", igw),
    associated with the subnet: its id (None in a dry run that would make it)."""
    table, _ = ensure_route_table(aws, vpc_id, name, target)
    if table is None:
        return None
    ensure_default_route(aws, table, target)
    ensure_association(aws, table, subnet_id)
    return table["RouteTableId"]


def ensure_route_table(aws, vpc_id, name, target):
    """(table, changed): found by Name tag, else made, as AWS describes it (None in a dry run)."""
    found = vpc_id and aws.find_one("route_tables", vpc_id=vpc_id, name=name)
    if found:
        aws.ok(f"route-table {found['RouteTableId']} ({name}) exists")
        return found, False
    if aws.dry_run:
        key, gateway = target
        aws.would(f"create route-table ({name}) with 0.0.0.0/0 -> {gateway or key}, for the {name} subnet")
        return None, True
    with aws.step(f"{name} route table"):
        spec = aws.tag_spec("route-table", name)
        made = aws.ec2.create_route_table(VpcId=vpc_id, TagSpecifications=spec)["RouteTable"]
    aws.changed(f"route-table {made['RouteTableId']} ({name}) created")
    return made, True


def ensure_default_route(aws, table, target):
    """0.0.0.0/0 -> `target` in the table (the local route, the VPC's own CIDR, is implicit); whether changed."""
    key, gateway = target
    table_id = table["RouteTableId"]
    default = [r for r in table.get("Routes", []) if r.get("DestinationCidrBlock") == WORLD]
    if default and default[0].get(key) == gateway:
        aws.ok(f"route-table {table_id} 0.0.0.0/0 -> {gateway}")
        return False
    if aws.dry_run:
        aws.would(f"change route-table {table_id} 0.0.0.0/0 -> {gateway or key}")
        return True
    call = aws.ec2.replace_route if default else aws.ec2.create_route
    with aws.step(f"route 0.0.0.0/0 in {table_id}"):
        cloud.retry(call, NEW_TABLE_NOT_FOUND + NEW_GATEWAY_NOT_FOUND + ("InvalidNatGatewayID.NotFound",),
                    attempts=6, delay=1,
                    RouteTableId=table_id, DestinationCidrBlock=WORLD, **{key: gateway})
    aws.changed(f"route-table {table_id} 0.0.0.0/0 -> {gateway}")
    return True


def ensure_association(aws, table, subnet_id):
    """The table associated with the subnet; whether changed."""
    table_id = table["RouteTableId"]
    if subnet_id in [a.get("SubnetId") for a in table.get("Associations", [])]:
        aws.ok(f"route-table {table_id} associated to subnet {subnet_id}")
        return False
    if aws.dry_run:
        aws.would(f"change route-table {table_id} associated to subnet {subnet_id or '(new)'}")
        return True
    with aws.step(f"association of {table_id} to {subnet_id}"):
        cloud.retry(aws.ec2.associate_route_table, NEW_TABLE_NOT_FOUND, attempts=6, delay=1,
                    RouteTableId=table_id, SubnetId=subnet_id)
    aws.changed(f"route-table {table_id} associated to subnet {subnet_id}")
    return True


def _nat_gateway(aws, subnet_id):
    """The private subnet's way out (apt and pip on the back-end): a NAT gateway in the
    public subnet, with an Elastic IP of its own. It costs by the hour: README, "Modes"."""
    found = aws.find_one("nat_gateways", "nat", state=cloud.NAT_LIVE_STATES)
    if found:
        nat_id = found["NatGatewayId"]
        aws.ok(f"nat-gateway {nat_id} exists")
        if found["State"] == "pending" and not aws.dry_run:
            with aws.step(f"nat gateway {nat_id} becoming available"):
                aws.ec2.get_waiter("nat_gateway_available").wait(NatGatewayIds=[nat_id])
        return nat_id
    address, _ = ensure_nat_address(aws)
    if aws.dry_run:
        aws.would(f"create nat-gateway in subnet {subnet_id or '(new)'}")
        return None
    aws.note("waiting for the nat gateway to become available (a minute or two on AWS)")
    with aws.step("nat gateway"):
        nat_id = cloud.retry(
            aws.ec2.create_nat_gateway, NEW_SUBNET_NOT_FOUND + ("InvalidAllocationID.NotFound",), attempts=8, delay=3,
            SubnetId=subnet_id,
            AllocationId=address["AllocationId"],
            # botocore's retries of this call send the same token: one gateway, not two. (A new
            # token each run: AWS answers a reused one with the first gateway, even a deleted one.)
            ClientToken=str(uuid.uuid4()),
            TagSpecifications=aws.tag_spec("natgateway", "nat", "nat"),
        )["NatGateway"]["NatGatewayId"]
        cloud.wait(aws.ec2, "nat_gateway_available", NatGatewayIds=[nat_id])
    aws.changed(f"nat-gateway {nat_id} created ({address['PublicIp']})")
    return nat_id


def ensure_nat_address(aws):
    """(address, changed): the NAT gateway's Elastic IP, found by tag (a run stopped after
    allocating it), else allocated (None in a dry run)."""
    found = aws.find_one("addresses", "nat")
    if found:
        if not aws.dry_run:  # (a dry run names only what it would make)
            aws.ok(f"elastic-ip {found['PublicIp']} (nat) exists")
        return found, False
    if aws.dry_run:
        aws.would("create elastic-ip (nat)")
        return None, True
    with aws.step("elastic ip of the nat gateway"):
        made = aws.ec2.allocate_address(Domain="vpc", TagSpecifications=aws.tag_spec("elastic-ip", "nat", "nat"))
    aws.changed(f"elastic-ip {made['PublicIp']} (nat) created")
    return made, True


def _left_over_nat(aws, mode):
    """A NAT gateway from an earlier private mode costs money and serves nothing now."""
    found = aws.find_one("nat_gateways", "nat", state=cloud.NAT_LIVE_STATES)
    if found:
        cloud.warn(f"nat-gateway {found['NatGatewayId']} of stack {aws.stack} is billed by the hour"
                   f" and unused with backend.mode {mode}: `fab destroy` removes it with the stack")


def _security_group(aws, vpc_id, role, wanted):
    """The role's group with exactly the `wanted` ingress rules: its id (None in a dry run that would make it)."""
    found = vpc_id and aws.find_one("security_groups", role, vpc_id=vpc_id)
    group_id, _ = ensure_security_group(aws, found, vpc_id, role, wanted)
    if group_id is None:
        return None
    have = state.rules(found["IpPermissions"]) if found else set()  # a new group has no ingress rule
    ensure_ingress(aws, group_id, role, have, wanted)
    return group_id


def ensure_security_group(aws, found, vpc_id, role, wanted):
    """(group id, changed): the group `found`, else a new one (None in a dry run)."""
    name = f"{aws.stack}-{role}"
    if found:
        aws.ok(f"security-group {found['GroupId']} ({name}) exists")
        return found["GroupId"], False
    if aws.dry_run:
        aws.would(f"create security-group {name} {_describe(sorted(wanted, key=str))}")
        return None, True
    with aws.step(f"security group {name}"):
        group_id = aws.ec2.create_security_group(
            GroupName=name,
            Description=f"{role} of stack {aws.stack}",
            VpcId=vpc_id,
            TagSpecifications=aws.tag_spec("security-group", role, role),
        )["GroupId"]
        aws.ec2.get_waiter("security_group_exists").wait(GroupIds=[group_id])
    aws.changed(f"security-group {group_id} ({name}) created")
    return group_id, True


def ensure_ingress(aws, group_id, role, have, wanted):
    """Reconcile both ways: a changed ssh_cidr must also close the old address, and a rule this
    suite no longer wants (the old worker -> back-end SSH) goes. Whether changed."""
    name = f"{aws.stack}-{role}"
    extra, missing = sorted(have - wanted, key=str), sorted(wanted - have, key=str)
    if not extra and not missing:
        aws.ok(f"security-group {group_id} rules {_describe(sorted(wanted, key=str))}")
        return False
    for verb, rules, call in (
        ("revoke", extra, aws.ec2.revoke_security_group_ingress),
        ("allow", missing, aws.ec2.authorize_security_group_ingress),
    ):
        if not rules:
            continue
        if aws.dry_run:
            aws.would(f"change security-group {group_id} {verb} {_describe(rules)}")
            continue
        with aws.step(f"{verb} {_describe(rules)} on security group {name}"):
            call(GroupId=group_id, IpPermissions=[_permission(rule) for rule in rules])
        aws.changed(f"security-group {group_id} {verb} {_describe(rules)}")
    return True


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
