"""The local state file: ids, addresses and key path of one stack.

It is a cache only. AWS, through the resources' tags, is the source of truth:
`refresh` rebuilds the file from AWS (the AWS tasks call it after each change,
`fab status` on demand), `load` only reads it and never talks to AWS.
"""
import json
import os
import tempfile
from pathlib import Path

from . import cloud
from .config import ROLES


def path(c):
    # "{stack}" in the setting gives each stack its own file.
    return Path(c.config.aws.state_file.format(stack=cloud.stack(c))).expanduser()


def key_name(c):
    return c.config.aws.key_name or f"{cloud.stack(c)}-key"


def key_file(c):
    """Where the private key is (or will be saved): ssh.key if set, else in aws.key_dir."""
    if c.config.ssh.key:
        return Path(c.config.ssh.key).expanduser()
    return Path(c.config.aws.key_dir).expanduser() / f"{key_name(c)}.pem"


def empty(c, region=None):
    return {
        "stack": cloud.stack(c),
        "region": region or c.config.aws.region,
        "vpc_id": None,
        "subnet_id": None,
        "igw_id": None,
        "route_table_id": None,
        "private_subnet_id": None,  # backend.mode private: the back-end's subnet,
        "private_route_table_id": None,  # its routes,
        "nat_gateway_id": None,  # and its way out
        "nat_public_ip": None,
        "security_groups": {},
        "ssh_sources": {},  # role -> who its security group lets SSH in (what a timeout names)
        "key_name": key_name(c),
        "key_path": None,
        "key_created": False,
        "instances": {
            role: {
                "id": None,
                "state": None,
                "public_ip": None,
                "private_ip": None,
                "eip_allocation_id": None,
            }
            for role in ROLES
        },
    }


def load(c):
    """The cached state of the configured stack; an empty one if missing, unreadable or another stack's."""
    try:
        data = json.loads(path(c).read_text())
    except (OSError, ValueError):
        return empty(c)
    region = c.config.aws.region
    if not isinstance(data, dict) or data.get("stack") != cloud.stack(c):
        return empty(c)
    if region and data.get("region") != region:
        return empty(c)
    return {**empty(c, data.get("region")), **data}


def save(c, data):
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    target = path(c)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=2, sort_keys=True)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, target)
    except BaseException:
        os.unlink(temp)
        raise


def refresh(c, ec2=None):
    """Rebuild the state from AWS tags, save it and return it."""
    ec2 = ec2 or cloud.client(c)
    data = empty(c, cloud.session(c).region_name)
    with cloud.step("reading the stack from AWS", "status"):
        _fill(c, ec2, data)
    save(c, data)
    return data


def _fill(c, ec2, data):
    vpc = cloud.find_one(c, ec2, "vpcs")
    data["vpc_id"] = vpc and vpc["VpcId"]
    for prefix, name in (("", "public"), ("private_", "private")):
        subnet = cloud.find_one(c, ec2, "subnets", name=name)
        data[f"{prefix}subnet_id"] = subnet and subnet["SubnetId"]
        table = cloud.find_one(c, ec2, "route_tables", name=name)
        data[f"{prefix}route_table_id"] = table and table["RouteTableId"]
    igw = cloud.find_one(c, ec2, "internet_gateways")
    data["igw_id"] = igw and igw["InternetGatewayId"]
    nat = cloud.find_one(c, ec2, "nat_gateways", "nat", state=cloud.NAT_LIVE_STATES)
    data["nat_gateway_id"] = nat and nat["NatGatewayId"]
    data["nat_public_ip"] = nat and next((a.get("PublicIp") for a in nat.get("NatGatewayAddresses", [])), None)
    for role in ROLES:
        group = cloud.find_one(c, ec2, "security_groups", role)
        if group:
            data["security_groups"][role] = group["GroupId"]
            data["ssh_sources"][role] = sorted(
                source for _, low, high, source in rules(group["IpPermissions"]) if low is None or low <= 22 <= high)
        instance = cloud.find_one(c, ec2, "instances", role)
        address = cloud.find_one(c, ec2, "addresses", role)
        data["instances"][role] = {
            "id": instance and instance["InstanceId"],
            "state": instance and instance["State"]["Name"],
            "public_ip": instance and instance.get("PublicIpAddress"),
            "private_ip": instance and instance.get("PrivateIpAddress"),
            "eip_allocation_id": address and address["AllocationId"],
        }
    # One lookup by name: the pair's tags tell whether `launch` created it for this stack.
    pairs = ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [data["key_name"]]}])["KeyPairs"]
    ours = {"Key": "Project", "Value": cloud.stack(c)}
    data["key_created"] = any(ours in pair.get("Tags", []) for pair in pairs)
    if pairs and key_file(c).is_file():
        data["key_path"] = str(key_file(c))


def rules(permissions):
    """AWS's nested IpPermissions, flattened to a set of (protocol, from, to, source) tuples
    (from and to are None for "all protocols")."""
    found = set()
    for p in permissions:
        ports = (p["IpProtocol"], p.get("FromPort"), p.get("ToPort"))
        found.update((*ports, r["CidrIp"]) for r in p.get("IpRanges", []))
        found.update((*ports, r["CidrIpv6"]) for r in p.get("Ipv6Ranges", []))
        found.update((*ports, g["GroupId"]) for g in p.get("UserIdGroupPairs", []))
    return found
