"""What is checked before anything is created, and `fab preflight`, which shows it all.

Who the credentials are, the region, which availability zone offers every configured
instance type, the image for each role's architecture, the account's limits against what
is in use, the operator's address and the key. `create-vpc` and `launch` run the parts they
need before their first change (`placement`, `ensure_quotas`, `images`), so a first deploy on a
new account stops with the limit, the zone or the permission named, never halfway.
"""
import re

from botocore.exceptions import BotoCoreError, ClientError
from invoke import task

from . import cloud, errors, keypair, state
from .config import ROLES, backend_mode

# Families counted by the "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances" quota.
STANDARD = set("acdhimrtz")
OWN_QUOTA = ("inf", "dl", "trn", "mac", "hpc", "vt")  # families starting so, counted elsewhere
# Same-size types tried, in this order, as the alternatives an error names.
PREFERRED_FAMILIES = ("t3", "t3a", "t4g", "t2", "m5", "m6i", "m7i", "m6a", "m6g", "m7g", "c5", "c6i", "c7g")
ARM_FAMILIES = {"t4g", "m6g", "m7g", "c7g"}  # Graviton: arm64
ARCH_NAMES = {"x86_64": "amd64", "arm64": "arm64"}  # AWS's name -> Ubuntu's, in image names and SSM paths


# --- Instance types and zones (issue: t2.micro is not offered everywhere) -------------------


def configured_types(c):
    """{role: instance type} from aws.instance_types."""
    return {role: str(c.config.aws.instance_types[role]) for role in ROLES}


def type_info(c, ec2):
    """{instance type: describe_instance_types' entry} for the configured types; an unknown
    type is a config error naming its setting."""
    types = configured_types(c)
    try:
        found = ec2.describe_instance_types(InstanceTypes=sorted(set(types.values())))["InstanceTypes"]
    except ClientError as error:
        if errors.code(error) not in ("InvalidInstanceType", "InvalidParameterValue"):
            raise
        found = []
        for name in sorted(set(types.values())):
            try:
                found += ec2.describe_instance_types(InstanceTypes=[name])["InstanceTypes"]
            except ClientError:
                role = next(r for r, t in types.items() if t == name)
                raise errors.ConfigError(
                    f"aws.instance_types.{role}={name!r} is not an EC2 instance type in"
                    f" {cloud.session(c).region_name}") from None
    found = {item["InstanceType"]: item for item in found}
    check_architectures(c, found)
    return found


def required_architecture(c, role):
    """The architecture a role must run, or None: TensorFlow (the worker, and the back-end's Keras
    fallback) has no aarch64 wheel, so those run x86_64; the LiteRT back-end runs either."""
    if role == "worker" or (role == "backend" and c.config.backend.get("keras_fallback")):
        return "x86_64"
    return None


def check_architectures(c, types):
    """Refuse, before anything is created, a type whose architecture its role's software lacks."""
    for role, name in configured_types(c).items():
        needed, runs = required_architecture(c, role), architecture(types[name])
        if needed and runs != needed:
            why = "TensorFlow has no aarch64 wheel" if needed == "x86_64" else f"it needs {needed}"
            raise errors.ConfigError(f"aws.instance_types.{role}={name} runs {runs}, and the {role} needs {needed}"
                                     f" ({why}): choose an {needed} type, e.g. m5.xlarge or t3.micro")


def architecture(info):
    """x86_64 or arm64: what an instance of this type runs (its image must match)."""
    supported = info.get("ProcessorInfo", {}).get("SupportedArchitectures", [])
    for arch in ("x86_64", "arm64"):
        if arch in supported:
            return arch
    return supported[0] if supported else "x86_64"


def available_zones(ec2):
    """The region's zones that can take instances now (not Local Zones, not unopted ones)."""
    zones = ec2.describe_availability_zones(Filters=[{"Name": "state", "Values": ["available"]}])
    return sorted(z["ZoneName"] for z in zones["AvailabilityZones"]
                  if z.get("ZoneType", "availability-zone") == "availability-zone"
                  and z.get("OptInStatus", "opt-in-not-required") != "not-opted-in")


def offerings(ec2, types, location="availability-zone"):
    """{location: {types offered there}} among `types` ("region" or "availability-zone")."""
    found = {}
    pages = ec2.get_paginator("describe_instance_type_offerings").paginate(
        LocationType=location, Filters=[{"Name": "instance-type", "Values": sorted(set(types))}])
    for page in pages:
        for offer in page["InstanceTypeOfferings"]:
            found.setdefault(offer["Location"], set()).add(offer["InstanceType"])
    return found


def alternatives(ec2, wanted, where=None, arch=None):
    """Types of the same size as `wanted` offered in the zone `where` (else in the region),
    cheap general-purpose families first, of architecture `arch` if given: what an error suggests."""
    size = wanted.split(".", 1)[-1]
    names = [f"{family}.{size}" for family in PREFERRED_FAMILIES if f"{family}.{size}" != wanted
             and (arch is None or (family in ARM_FAMILIES) == (arch == "arm64"))]
    found = offerings(ec2, names, "availability-zone" if where else "region")
    offered = set().union(*found.values()) if not where else found.get(where, set())
    return [name for name in names if name in offered][:4]


def choose_zone(c, ec2):
    """The first available zone that offers every configured instance type (the public subnet's,
    and the private one's beside it); an error naming what is offered where if none does."""
    types = configured_types(c)
    zones = available_zones(ec2)
    found = offerings(ec2, types.values())
    fitting = [zone for zone in zones if set(types.values()) <= found.get(zone, set())]
    if fitting:
        return fitting[0]
    region = cloud.session(c).region_name
    problems = []
    for role, name in types.items():
        where = [zone for zone in zones if name in found.get(zone, set())]
        if where:
            problems.append(f"aws.instance_types.{role}={name} is offered only in {', '.join(where)}")
        else:
            instead = alternatives(ec2, name, arch=required_architecture(c, role))
            problems.append(f"aws.instance_types.{role}={name} is not offered in {region}"
                            + (f" (offered here: {', '.join(instead)})" if instead else ""))
    every = ", ".join(sorted(set(types.values())))
    raise errors.ConfigError(f"no availability zone of {region} offers all of {every}: " + "; ".join(problems))


def check_zone(c, ec2, zone, roles=ROLES):
    """Refuse, before any instance exists, a type that the subnet's zone does not offer."""
    types = {role: configured_types(c)[role] for role in roles}
    offered = offerings(ec2, types.values()).get(zone, set())
    for role, name in types.items():
        if name not in offered:
            instead = alternatives(ec2, name, zone, required_architecture(c, role))
            raise errors.ConfigError(
                f"aws.instance_types.{role}={name} is not offered in {zone}, the zone of stack"
                f" {cloud.stack(c)}'s subnets" + (f": offered there: {', '.join(instead)}" if instead else "")
                + "; or `fab destroy` and re-create the stack (create-vpc picks a zone that offers every type)")


# --- Account limits ----------------------------------------------------------------------


class Limit:
    """One quota: its name, how much this stack still needs, how much is in use, the limit."""

    def __init__(self, name, need, used, limit, source, raise_with=None):
        self.name, self.need, self.used, self.limit, self.source = name, need, used, limit, source
        self.raise_with = raise_with  # (service code, quota code) for Service Quotas

    @property
    def ok(self):
        return self.limit is None or self.need == 0 or self.used + self.need <= self.limit

    def describe(self):
        limit = "unknown" if self.limit is None else f"{self.limit:g}"
        text = f"need {self.need:g}, {self.used:g} in use, limit {limit} ({self.source})"
        if not self.ok and self.raise_with:
            text += ": free some, or raise it: " + errors.raise_quota(*self.raise_with, f"{self.used + self.need:g}")
        return text


def service_quota(c, service, quota):
    """(value, "service quotas") or (None, why) when Service Quotas does not answer."""
    try:
        answer = cloud.client(c, "service-quotas").get_service_quota(ServiceCode=service, QuotaCode=quota)
        return float(answer["Quota"]["Value"]), "Service Quotas"
    except (ClientError, BotoCoreError) as error:
        return None, errors.code(error) or type(error).__name__


def standard_vcpus(ec2, types=None):
    """vCPUs of running and pending standard-family instances in the region (the quota's use)."""
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}])
    running = [i["InstanceType"] for page in pages for r in page["Reservations"] for i in r["Instances"]]
    running = [name for name in running if is_standard(name)]
    if not running:
        return 0
    known = types or {}
    missing = sorted(set(running) - set(known))
    if missing:
        known = {**known, **{t["InstanceType"]: t for t in ec2.describe_instance_types(
            InstanceTypes=missing)["InstanceTypes"]}}
    return sum(vcpus(known[name]) for name in running)


def is_standard(name):
    """In the standard vCPU quota: A, C, D, H, I, M, R, T, Z families (im4gn and is4gen too), not
    the accelerated, Mac or HPC ones, which have quotas of their own."""
    family = re.match(r"[a-z]+", name)
    return bool(family) and family[0][0] in STANDARD and not family[0].startswith(OWN_QUOTA)


def vcpus(info):
    return info.get("VCpuInfo", {}).get("DefaultVCpus", 0)


def limits(c, ec2, scope=("vpc", "nat", "eip", "vcpu"), types=None):
    """The quotas this stack's next steps need, with what is in use (account-wide, this region)."""
    mode = backend_mode(c)
    stack_live = {role: cloud.find_one(c, ec2, "instances", role) for role in ROLES} if "vcpu" in scope else {}
    found = []
    if "vpc" in scope:
        value, source = service_quota(c, "vpc", "L-F678F1CE")
        need = 0 if cloud.find_one(c, ec2, "vpcs") else 1
        used = len(ec2.describe_vpcs()["Vpcs"])
        found.append(Limit(errors.QUOTAS["VpcLimitExceeded"][0], need, used, value if value is not None else 5,
                           source if value is not None else f"AWS's default; Service Quotas: {source}",
                           ("vpc", "L-F678F1CE")))
    if "nat" in scope and mode == "private":
        value, source = service_quota(c, "vpc", "L-FE5A380F")
        ours = cloud.find_one(c, ec2, "nat_gateways", "nat", state=cloud.NAT_LIVE_STATES)
        used = nat_gateways_in(ec2, stack_zone(c, ec2))
        found.append(Limit(errors.QUOTAS["NatGatewayLimitExceeded"][0], 0 if ours else 1, used,
                           value if value is not None else 5,
                           source if value is not None else f"AWS's default; Service Quotas: {source}",
                           ("vpc", "L-FE5A380F")))
    if "eip" in scope:
        value, source = service_quota(c, "ec2", "L-0263D0A3")
        if value is None:
            attributes = ec2.describe_account_attributes(AttributeNames=["vpc-max-elastic-ips"])
            values = [v["AttributeValue"] for a in attributes["AccountAttributes"] for v in a["AttributeValues"]]
            value, source = (float(values[0]), "account attribute vpc-max-elastic-ips") if values else (None, source)
        # launch's addresses (with the vCPUs), the NAT gateway's (create-vpc's, private mode), or both.
        wanted = [role for role in ROLES if role != "backend" or mode != "private"] if "vcpu" in scope else []
        wanted += ["nat"] if "nat" in scope and mode == "private" else []
        need = sum(1 for name in wanted if not cloud.find_one(c, ec2, "addresses", name))
        used = len(ec2.describe_addresses()["Addresses"])
        found.append(Limit(errors.QUOTAS["AddressLimitExceeded"][0], need, used, value, source, ("ec2", "L-0263D0A3")))
    if "vcpu" in scope:
        types = types or type_info(c, ec2)
        wanted = configured_types(c)
        need = sum(vcpus(types[wanted[role]]) for role in ROLES
                   if not (stack_live.get(role) and stack_live[role]["State"]["Name"] in ("pending", "running"))
                   and is_standard(wanted[role]))
        value, source = service_quota(c, "ec2", "L-1216C47A")
        found.append(Limit(errors.QUOTAS["VcpuLimitExceeded"][0], need, standard_vcpus(ec2, types),
                           value, source if value is not None else f"Service Quotas: {source}",
                           ("ec2", "L-1216C47A")))
    return found


def stack_zone(c, ec2):
    """The stack's zone: its public subnet's, else the one create-vpc will choose."""
    subnet = cloud.find_one(c, ec2, "subnets", name="public")
    return subnet["AvailabilityZone"] if subnet else choose_zone(c, ec2)


def nat_gateways_in(ec2, zone):
    """Live NAT gateways in one zone (their quota is per zone), account-wide."""
    found = ec2.describe_nat_gateways(Filters=[{"Name": "state", "Values": cloud.NAT_LIVE_STATES}])["NatGateways"]
    subnets = sorted({nat["SubnetId"] for nat in found})
    zones = {s["SubnetId"]: s["AvailabilityZone"] for s in ec2.describe_subnets(SubnetIds=subnets)["Subnets"]} \
        if subnets else {}
    return sum(1 for nat in found if zones.get(nat["SubnetId"]) == zone)


def ensure_quotas(aws, scope, types=None):
    """Stop before creating anything when a limit would be exceeded; note the figures either way
    (in `aws`, the task's `cloud.AwsRun`)."""
    with aws.step("reading the account's limits"):
        found = limits(aws.c, aws.ec2, scope, types)
    short = [limit for limit in found if not limit.ok]
    for limit in found:
        if limit.ok and limit.need:
            # A limit nobody could read is noted, not counted as checked.
            (aws.checked if limit.limit is not None else aws.note)(f"limit {limit.name}: {limit.describe()}")
    if short:
        raise errors.QuotaExceeded("; ".join(f"{limit.name}: {limit.describe()}" for limit in short))
    return found


def dry_run_launch(c, ec2, role, image, subnet_id=None, zone=None):
    """A DryRun of the role's RunInstances as `launch` makes it (tags, encrypted root volume: the
    permissions those need too), in its subnet or, before create-vpc, its zone: (ok, why)."""
    from .instances import root_volume  # (instances imports this module)

    params = {"ImageId": image["ImageId"], "InstanceType": configured_types(c)[role], "MinCount": 1, "MaxCount": 1,
              "DryRun": True, "BlockDeviceMappings": root_volume(image),
              "TagSpecifications": cloud.tag_spec(c, "instance", role, role) + cloud.tag_spec(c, "volume", role, role)}
    if subnet_id:
        params["SubnetId"] = subnet_id
    elif zone:
        params["Placement"] = {"AvailabilityZone": zone}
    try:
        ec2.run_instances(**params)
    except ClientError as error:
        found = errors.code(error)
        if found == "DryRunOperation":
            return True, "RunInstances dry run allowed"
        if found in errors.NEEDS_A_SUBNET and not subnet_id:  # an account without a default VPC, before create-vpc
            return True, f"RunInstances dry run not possible before create-vpc ({found})"
        why = f"RunInstances dry run: {found}: {error.response['Error'].get('Message', '')}"
        return False, f"{why}; {errors.advice(error, 'preflight')}" if errors.is_denied(error) else why
    except BotoCoreError as error:
        return False, f"RunInstances dry run: {error}"
    return False, "RunInstances dry run was not refused as a dry run"


# --- The task ------------------------------------------------------------------------------


@task(help={"ssh-cidr": "who may SSH in (default: aws.ssh_cidr, else your detected public address /32)"})
def preflight(c, ssh_cidr=None):
    """Check credentials, region, zone offerings, images, limits, your address and the key; create nothing."""
    from . import instances, network  # they import this module

    rows = []

    def row(name, ok, detail):
        rows.append((name, ok, detail))

    ec2 = cloud.client(c)
    region = cloud.session(c).region_name
    try:
        who = cloud.client(c, "sts").get_caller_identity()
        row("credentials", True, f"{who['Arn']} (account {who['Account']})")
    except (ClientError, BotoCoreError) as error:
        row("credentials", False, f"{error}\n    {errors.advice(error, 'preflight')}")
        return _print(rows, region)  # nothing else can be read without them
    row("region", True, region)
    types, chosen_zone = {}, None
    try:
        types = type_info(c, ec2)
        wanted = configured_types(c)
        archs = {role: architecture(types[wanted[role]]) for role in ROLES}
        row("instance types", True, ", ".join(f"{role} {wanted[role]} ({archs[role]}, "
                                                f"{vcpus(types[wanted[role]])} vCPU)" for role in ROLES))
        subnet = cloud.find_one(c, ec2, "subnets", name="public")
        if subnet:
            check_zone(c, ec2, subnet["AvailabilityZone"])
            row("zone", True, f"{subnet['AvailabilityZone']} (the stack's subnet) offers every type")
        else:
            chosen_zone = choose_zone(c, ec2)
            row("zone", True, f"{chosen_zone} offers every type (create-vpc will use it)")
    except errors.ConfigError as error:
        row("instance types" if not types else "zone", False, error.message)
    except (ClientError, BotoCoreError) as error:
        row("instance types", False, f"{error}: {errors.advice(error, 'preflight')}")
    images = {}
    if types:
        try:
            images = instances.images(c, ec2, types, None)
            row("images", True, ", ".join(f"{arch} {image['ImageId']} ({image.get('Name', '')})"
                                          for arch, image in images.items()))
        except errors.ConfigError as error:
            row("images", False, error.message)
        except (ClientError, BotoCoreError) as error:
            row("images", False, f"{error}: {errors.advice(error, 'preflight')}")
    try:
        for limit in limits(c, ec2, types=types or None):
            row(f"limit {limit.name}", limit.ok, limit.describe())
    except errors.ConfigError as error:
        row("limits", False, error.message)
    except (ClientError, BotoCoreError) as error:
        row("limits", False, f"{error}: {errors.advice(error, 'preflight')}")
    if images:
        wanted = configured_types(c)
        subnets = {name: cloud.find_one(c, ec2, "subnets", name=name) for name in ("public", "private")}
        zone = None if subnets["public"] else chosen_zone
        for role in ROLES:
            image = images[architecture(types[wanted[role]])]
            subnet = subnets["private" if role == "backend" and backend_mode(c) == "private" else "public"]
            allowed, why = dry_run_launch(c, ec2, role, image, subnet and subnet["SubnetId"], zone)
            row(f"launch {role}", allowed, why)
    try:
        row("your address", True, f"SSH allowed from {network.admin_cidr(c, ssh_cidr)}")
    except errors.ConfigError as error:
        row("your address", False, error.message)
    path = state.key_file(c)
    try:
        pairs = keypair.named(ec2, state.key_name(c))
    except (ClientError, BotoCoreError) as error:
        row("key", False, f"{error}: {errors.advice(error, 'preflight')}")
        return _print(rows, region)
    if pairs and not path.is_file():
        row("key", False, f"key pair {state.key_name(c)!r} exists in AWS but its private key is not at {path}:"
                          " set ssh.key to the .pem file, or another aws.key_name")
    else:
        row("key", True, f"{state.key_name(c)} " + (f"({path})" if pairs else f"(launch creates it, saved to {path})"))
    return _print(rows, region)


def _print(rows, region):
    width = max(len(name) for name, _, _ in rows)
    print(f"PREFLIGHT ({region})", flush=True)
    for name, ok, detail in rows:
        print(f"  {'ok     ' if ok else 'PROBLEM'}  {name:<{width}}  {detail}", flush=True)
    problems = [name for name, ok, _ in rows if not ok]
    if problems:
        raise errors.PreflightFailed(problems)
    print("PREFLIGHT ok: nothing was created", flush=True)
    return {"ok": len(rows), "changed": 0, "checked": 0, "problems": 0}  # deploy adds up ok/changed/checked
