"""More than one back-end (issue 13): an Auto Scaling group behind an Application Load Balancer.

`backend.count: 1` (the default) is the guide's single back-end, no balancer. With N > 1,
`fab scale --backends N` makes, each only if missing and each found by name and tags:

  bucket      <stack>-models-<account>-<region>, versioned, private, encrypted: models/<sha256>.tflite
              and `current` (the sha256 to serve), which a new back-end pulls at boot
  role        <stack>-backend-role + its instance profile: s3:GetObject on that bucket only
  subnet      a second one in another zone (an ALB needs two), routed like the back-end's
  group       the balancer's security group; the back-ends' port opened to it
  targets     target group, health check on /health, deregistration delay (drain before removal)
  balancer    the ALB (internal unless backend.mode public) and its listener on port 80
  template    launch template: the back-end's AMI and type, IMDSv2, encrypted gp3, user-data
  group       the Auto Scaling group (min = desired = max = N; backend.max > N adds CPU target tracking)

`destroy` (tasks/teardown.py) calls `remove` first: nothing of the stack's network goes while
the balancer or the group hold it.
"""
import base64
import concurrent.futures
import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path

from botocore.exceptions import ClientError
from invoke import task
from invoke.exceptions import Exit

from . import cloud, cost, errors, preflight
from .config import APP_FILES, FILES, backend_mode
from .remote import q, valid_name
from .report import Tally

TASK = "scale"
TEMPLATES = Path(__file__).resolve().parent / "templates"
USER_DATA = TEMPLATES / "backend-user-data.sh"
# Service Quotas: Application Load Balancers per Region, Auto Scaling groups per Region.
ALB_QUOTA = ("elasticloadbalancing", "L-53DA6B97", 50)
ASG_QUOTA = ("autoscaling", "L-CDE20ADC", 500)
TRUST = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}


# --- Names and settings --------------------------------------------------------------------------


def count(c, value=None):
    """The number of back-ends (backend.count, or --backends), checked: a whole number, 1 or more."""
    setting = "--backends" if value is not None else "backend.count"
    raw = c.config.backend.get("count", 1) if value is None else value
    try:
        found = int(str(raw).strip())
    except ValueError:
        found = None
    if found is None or found < 1 or str(found) != str(raw).strip():
        raise errors.ConfigError(f"{setting}={raw!r}: the number of back-ends is a whole number, 1 or more")
    return found


def most(c, wanted):
    """backend.max (growth allowed by target tracking), checked against the count; None: no growth."""
    raw = c.config.backend.get("max")
    if raw in (None, "", 0):
        return wanted
    if not str(raw).strip().isdigit() or int(raw) < wanted:
        raise errors.ConfigError(f"backend.max={raw!r}: a whole number no smaller than the back-ends' count {wanted}")
    return int(raw)


def names(c):
    """Each resource's name; ELB names are 32 characters at most."""
    stack = cloud.stack(c)
    return {
        "balancer": f"{stack}-backends"[:32],
        "targets": f"{stack}-backends"[:32],
        "template": f"{stack}-backend",
        "group": f"{stack}-backends",
        "role": f"{stack}-backend-role",
        "policy": "read-models",
        "scaling": f"{stack}-cpu-target",
    }


def bucket_name(c):
    """backend.bucket, else <stack>-models-<account>-<region> (bucket names are global)."""
    if c.config.backend.get("bucket"):
        return str(c.config.backend.bucket)
    account = cloud.client(c, "sts").get_caller_identity()["Account"]
    return f"{cloud.stack(c)}-models-{account}-{cloud.session(c).region_name}".lower()[:63]


def kv_tags(c, name, role="backend-tier"):
    """cloud.tags as ELB/IAM/S3 want them (Key/Value)."""
    return cloud.tags(c, name, role)


def _clients(c):
    return {"ec2": cloud.client(c), "elb": cloud.client(c, "elbv2"), "asg": cloud.client(c, "autoscaling"),
            "iam": cloud.client(c, "iam"), "s3": cloud.client(c, "s3")}


# --- What exists -------------------------------------------------------------------------------


def find_group(asg, name):
    found = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
    return found[0] if found else None


def find_balancer(elb, name):
    try:
        return elb.describe_load_balancers(Names=[name])["LoadBalancers"][0]
    except ClientError as error:
        if errors.code(error) == "LoadBalancerNotFound":
            return None
        raise


def find_targets(elb, name):
    try:
        return elb.describe_target_groups(Names=[name])["TargetGroups"][0]
    except ClientError as error:
        if errors.code(error) == "TargetGroupNotFound":
            return None
        raise


def find_template(ec2, name):
    try:
        return ec2.describe_launch_templates(LaunchTemplateNames=[name])["LaunchTemplates"][0]
    except ClientError as error:
        if errors.code(error) in ("InvalidLaunchTemplateName.NotFoundException", "InvalidLaunchTemplateId.NotFound"):
            return None
        raise


def bucket_exists(s3, bucket):
    """True if the bucket is ours, False if there is none; someone else's is a config error.
    (GetBucketVersioning, not HeadBucket: one IAM action of its own name, allowed in the policy.)"""
    try:
        s3.get_bucket_versioning(Bucket=bucket)
        return True
    except ClientError as error:
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if errors.code(error) in ("404", "NoSuchBucket") or status == 404:
            return False
        if status == 403:
            raise errors.ConfigError(
                f"bucket {bucket} is refused to this account (another account's, or a missing"
                f" s3:GetBucketVersioning in {errors.POLICY}): set backend.bucket to another name, or add"
                " the permission") from error
        raise


def model_count(s3, bucket):
    """How many model versions the bucket holds (every version of every models/ object)."""
    pages = s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix="models/")
    return sum(len(page.get("Versions", [])) for page in pages)


def exists(c):
    """True when the stack has a back-end tier (its Auto Scaling group)."""
    with cloud.step("reading the back-end tier", "status"):
        return find_group(cloud.client(c, "autoscaling"), names(c)["group"]) is not None


# --- The task --------------------------------------------------------------------------------


@task(help={"backends": "how many back-ends (default: backend.count)",
            "no-wait": "don't wait for the back-ends to pass the balancer's health check",
            "dry-run": "print what would be created or changed, change nothing"})
@cloud.resumable(TASK)
def scale(c, backends=None, no_wait=False, dry_run=False):
    """Run N back-ends behind a load balancer (Auto Scaling group, ALB, S3 models); a second run changes nothing."""
    wanted = count(c, backends)
    ceiling = most(c, wanted)
    aws = _clients(c)
    with Tally(TASK, "backend-tier", where=cloud.where(c), dry_run=dry_run) as tally:
        if wanted == 1 and not find_group(aws["asg"], names(c)["group"]):
            tally.ok("1 back-end (backend.count 1): the single back-end of `fab launch`, no balancer")
            return tally.result
        bucket = ensure(c, aws, wanted, ceiling, tally)
        if dry_run or no_wait:
            pass
        elif current_model(aws["s3"], bucket) is None:
            tally.note("no model in the bucket yet: the back-ends wait for one; `fab push-model` sends it")
        else:
            wait_healthy(c, aws, wanted, tally)
    return tally.result


def ensure(c, aws, wanted, ceiling, tally):
    """Every piece of the tier, each checked before the next; the billed ones after the checks."""
    net = network(c, aws["ec2"])
    second_cidr(c)  # a bad setting is refused before the first change, not halfway
    with cloud.step("reading the account's limits", TASK):
        check_limits(c, aws, wanted, ceiling, tally)
    bucket = ensure_bucket(c, aws["s3"], tally)
    ensure_app(c, aws["s3"], bucket, tally)
    profile = ensure_role(c, aws["iam"], bucket, tally)
    subnets = ensure_second_subnet(c, aws["ec2"], net, tally)
    balancer_group = ensure_balancer_group(c, aws["ec2"], net, tally)
    targets = ensure_targets(c, aws["elb"], net, tally)
    ensure_balancer(c, aws["elb"], subnets, balancer_group, targets, tally)
    template = ensure_template(c, aws["ec2"], net, profile, bucket, tally)
    # Before the first model no back-end can pass /health: the balancer's check would have the group
    # replace them all, over and over. EC2's own check until then; push-model switches to ELB.
    health_type = "ELB" if current_model(aws["s3"], bucket) else "EC2"
    ensure_group(c, aws["asg"], subnets, targets, template, wanted, ceiling, tally, health_type)
    ensure_scaling_policy(c, aws["asg"], wanted, ceiling, tally)
    return bucket


def current_model(s3, bucket):
    """The sha256 the bucket's `current` names, or None (no model pushed yet, or no bucket)."""
    try:
        return s3.get_object(Bucket=bucket, Key="current")["Body"].read().decode().strip()
    except ClientError as error:
        if errors.code(error) in ("NoSuchKey", "NoSuchBucket", "404"):
            return None
        raise


def network(c, ec2):
    """What `create-vpc` made that the tier stands on: VPC, the back-end's subnet and both groups."""
    vpc = cloud.find_one(c, ec2, "vpcs")
    name = "private" if backend_mode(c) == "private" else "public"
    subnet = cloud.find_one(c, ec2, "subnets", name=name)
    table = cloud.find_one(c, ec2, "route_tables", name=name)
    groups = {role: cloud.find_one(c, ec2, "security_groups", role) for role in ("frontend", "backend")}
    if not (vpc and subnet and table and all(groups.values())):
        raise Exit(f"no network for stack {cloud.stack(c)} (backend.mode {backend_mode(c)}):"
                   " run `fab create-vpc` first")
    return {"vpc": vpc["VpcId"], "subnet": subnet, "table": table["RouteTableId"],
            "groups": {role: group["GroupId"] for role, group in groups.items()}}


def check_limits(c, aws, wanted, ceiling, tally):
    """Before anything billed: the vCPUs of `ceiling` back-ends, one more ALB, one more group."""
    types = preflight.type_info(c, aws["ec2"])
    kind = preflight.configured_types(c)["backend"]
    group = find_group(aws["asg"], names(c)["group"])
    running = len(group["Instances"]) if group else 0
    per = preflight.vcpus(types[kind])
    limits = [preflight.Limit(errors.QUOTAS["VcpuLimitExceeded"][0], max(0, ceiling - running) * per,
                              preflight.standard_vcpus(aws["ec2"], types),
                              *preflight.service_quota(c, "ec2", "L-1216C47A"), ("ec2", "L-1216C47A"))]
    for label, (service, code, default), have in (
            ("Application Load Balancers per Region", ALB_QUOTA, find_balancer(aws["elb"], names(c)["balancer"])),
            ("Auto Scaling groups per Region", ASG_QUOTA, group)):
        value, source = preflight.service_quota(c, service, code)
        used = (len(aws["elb"].describe_load_balancers()["LoadBalancers"]) if service == "elasticloadbalancing"
                else len(aws["asg"].describe_auto_scaling_groups()["AutoScalingGroups"]))
        limits.append(preflight.Limit(label, 0 if have else 1, used, value if value is not None else default,
                                      source if value is not None else f"AWS's default; Service Quotas: {source}",
                                      (service, code)))
    short = [limit for limit in limits if not limit.ok]
    for limit in limits:
        if limit.ok and limit.need:
            tally.checked(f"limit {limit.name}: {limit.describe()}")
    if short:
        raise errors.QuotaExceeded(f"{wanted} back-ends (up to {ceiling}) of {kind}: "
                                   + "; ".join(f"{limit.name}: {limit.describe()}" for limit in short))


def second_cidr(c):
    """aws.second_subnet_cidr, checked: inside the VPC, clear of the other subnets."""
    aws = c.config.aws
    block = cloud.network(aws.second_subnet_cidr, "aws.second_subnet_cidr")
    vpc = cloud.network(aws.vpc_cidr, "aws.vpc_cidr")
    if block.version != 4 or not block.subnet_of(vpc):
        raise errors.ConfigError(f"aws.second_subnet_cidr {block} must be an IPv4 block inside aws.vpc_cidr {vpc}")
    for setting in ("subnet_cidr", "private_subnet_cidr"):
        if block.overlaps(cloud.network(aws[setting], f"aws.{setting}")):
            raise errors.ConfigError(f"aws.second_subnet_cidr {block} overlaps aws.{setting} {aws[setting]}")
    return str(block)


def foreign(c, s3, bucket):
    """A bucket named by backend.bucket that this stack did not make (no Project=<stack> tag): the
    user's own, never changed or deleted here. (The default name is the stack's by construction.)"""
    if not c.config.backend.get("bucket"):
        return False
    try:
        tags = s3.get_bucket_tagging(Bucket=bucket)["TagSet"]
    except ClientError as error:
        if errors.code(error) != "NoSuchTagSet":
            raise
        tags = []
    return {"Key": "Project", "Value": cloud.stack(c)} not in tags


def ensure_bucket(c, s3, tally):
    """The models' bucket: versioned (the previous models stay, for a rollback), private, encrypted."""
    bucket = bucket_name(c)
    with cloud.step(f"bucket {bucket}", TASK):
        if bucket_exists(s3, bucket):
            if foreign(c, s3, bucket):
                tally.ok(f"bucket {bucket} exists, not this stack's (no Project={cloud.stack(c)} tag): used as it"
                         " is, and `destroy` leaves it")
                return bucket
            tally.ok(f"bucket {bucket} exists")
        elif tally.dry_run:
            tally.would(f"create bucket {bucket} (versioned, private, encrypted)")
            return bucket
        else:
            region = cloud.session(c).region_name
            where = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
            try:
                s3.create_bucket(Bucket=bucket, **where)
            except ClientError as error:
                if errors.code(error) != "BucketAlreadyOwnedByYou":  # a killed run's, or a retried create's
                    raise
            tally.changed(f"bucket {bucket} created")
        if s3.get_bucket_versioning(Bucket=bucket).get("Status") != "Enabled":
            if tally.dry_run:
                tally.would(f"turn on versioning of bucket {bucket}")
            else:
                s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
                tally.changed(f"bucket {bucket} versioned (previous models kept)")
        if not tally.dry_run:
            # Cheap and idempotent: set every time, so a bucket someone loosened is closed again.
            s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration=dict.fromkeys(
                ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets"), True))
            s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={
                "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
            s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": kv_tags(c, "models")})
    return bucket


def read_policy(bucket):
    """The back-ends may read the bucket's objects, and nothing else in the account. s3:ListBucket on
    the bucket itself: without it S3 answers a missing key (no model yet) 403, not 404 NoSuchKey."""
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "ReadTheModels", "Effect": "Allow", "Action": ["s3:GetObject"],
         "Resource": [f"arn:aws:s3:::{bucket}/*"]},
        {"Sid": "TellMissingFromDenied", "Effect": "Allow", "Action": ["s3:ListBucket"],
         "Resource": [f"arn:aws:s3:::{bucket}"]}]}


def ensure_role(c, iam, bucket, tally):
    """The back-ends' role (read the bucket only) and its instance profile; returns the profile's name."""
    name, policy = names(c)["role"], names(c)["policy"]
    document = read_policy(bucket)
    with cloud.step(f"role {name}", TASK):
        try:
            iam.get_role(RoleName=name)
            tally.ok(f"role {name} exists")
        except ClientError as error:
            if errors.code(error) != "NoSuchEntity":
                raise
            if tally.dry_run:
                tally.would(f"create role {name} and instance profile (s3:GetObject on {bucket} only)")
                return name
            iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(TRUST), Tags=kv_tags(c, "backend-role"),
                            Description=f"back-ends of stack {cloud.stack(c)}: read their models")
            tally.changed(f"role {name} created")
        try:
            current = iam.get_role_policy(RoleName=name, PolicyName=policy)["PolicyDocument"]
            current = json.loads(current) if isinstance(current, str) else current
        except ClientError as error:
            if errors.code(error) != "NoSuchEntity":
                raise
            current = None
        if current != document:
            if tally.dry_run:
                tally.would(f"set role {name}'s policy to s3:GetObject on {bucket}")
            else:
                iam.put_role_policy(RoleName=name, PolicyName=policy, PolicyDocument=json.dumps(document))
                tally.changed(f"role {name} may read s3://{bucket}/* only")
        try:
            profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        except ClientError as error:
            if errors.code(error) != "NoSuchEntity":
                raise
            if tally.dry_run:
                tally.would(f"create instance profile {name}")
                return name
            profile = iam.create_instance_profile(InstanceProfileName=name, Tags=kv_tags(c, "backend-role"))[
                "InstanceProfile"]
            tally.changed(f"instance profile {name} created")
        if name not in [role["RoleName"] for role in profile.get("Roles", [])]:
            if tally.dry_run:
                tally.would(f"add role {name} to instance profile {name}")
            else:
                iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
                tally.changed(f"role {name} in instance profile {name}")
    return name


def ensure_second_subnet(c, ec2, net, tally):
    """[the back-end's subnet, one in another zone]: an ALB needs two zones, and the group spreads
    over both; the new one takes the back-end's route table (its way out: gateway or NAT)."""
    first = net["subnet"]
    found = cloud.find_one(c, ec2, "subnets", name="backend-b")
    if found:
        tally.ok(f"subnet {found['SubnetId']} ({found['AvailabilityZone']}, back-ends' second zone) exists")
    else:
        zones = [z["ZoneName"] for z in ec2.describe_availability_zones(
            Filters=[{"Name": "state", "Values": ["available"]}, {"Name": "zone-type", "Values": ["availability-zone"]}]
        )["AvailabilityZones"] if z["ZoneName"] != first["AvailabilityZone"]]
        if not zones:
            raise errors.ConfigError(f"{cloud.session(c).region_name} has one zone: an ALB needs two")
        cidr = second_cidr(c)
        if tally.dry_run:
            tally.would(f"create subnet {cidr} in {zones[0]} (back-ends' second zone)")
            return [first["SubnetId"]]
        with cloud.step(f"subnet {cidr}", TASK):
            found = ec2.create_subnet(VpcId=net["vpc"], CidrBlock=cidr, AvailabilityZone=zones[0],
                                      TagSpecifications=cloud.tag_spec(c, "subnet", "backend-b"))["Subnet"]
        tally.changed(f"subnet {found['SubnetId']} ({cidr}, {zones[0]}) created")
    subnet_id = found["SubnetId"]
    table = ec2.describe_route_tables(RouteTableIds=[net["table"]])["RouteTables"][0]
    if subnet_id not in [a.get("SubnetId") for a in table["Associations"]]:
        if tally.dry_run:
            tally.would(f"associate subnet {subnet_id} to route table {net['table']}")
        else:
            with cloud.step(f"routes of subnet {subnet_id}", TASK):
                cloud.retry(ec2.associate_route_table, errors.NEW_SUBNET_NOT_FOUND, attempts=8, delay=3,
                            RouteTableId=net["table"], SubnetId=subnet_id)
            tally.changed(f"subnet {subnet_id} routed like the back-end's ({net['table']})")
    return [first["SubnetId"], subnet_id]


def ensure_balancer_group(c, ec2, net, tally):
    """The ALB's group: port 80 from the front-end (proxied, private) or the world (public); the
    back-ends' group then lets the balancer in on backend.port."""
    port = int(c.config.backend.port)
    source = "0.0.0.0/0" if backend_mode(c) == "public" else net["groups"]["frontend"]
    group = cloud.find_one(c, ec2, "security_groups", "balancer")
    with cloud.step("the balancer's security group", TASK):
        if group:
            group_id = group["GroupId"]
            tally.ok(f"security-group {group_id} (balancer) exists")
            rules = group["IpPermissions"]
        elif tally.dry_run:
            tally.would(f"create security-group balancer (80 from {source})")
            return None
        else:
            group_id = ec2.create_security_group(
                GroupName=f"{cloud.stack(c)}-balancer", Description="ALB of the back-ends", VpcId=net["vpc"],
                TagSpecifications=cloud.tag_spec(c, "security-group", "balancer", "balancer"))["GroupId"]
            tally.changed(f"security-group {group_id} (balancer) created")
            rules = []
        _allow(ec2, group_id, rules, 80, source, "balancer", tally)
        backend = ec2.describe_security_groups(GroupIds=[net["groups"]["backend"]])["SecurityGroups"][0]
        _allow(ec2, backend["GroupId"], backend["IpPermissions"], port, group_id, "backend", tally)
    return group_id


def _allow(ec2, group_id, rules, port, source, role, tally):
    found = {(p.get("FromPort"), p.get("ToPort"), r.get("CidrIp") or r.get("GroupId"))
             for p in rules for r in p.get("IpRanges", []) + p.get("UserIdGroupPairs", [])}
    if (port, port, source) in found:
        tally.ok(f"{role} group: {port} from {source}")
        return
    if tally.dry_run:
        tally.would(f"allow {port} from {source} into the {role} group")
        return
    peer = {"UserIdGroupPairs": [{"GroupId": source}]} if source.startswith("sg-") else {
        "IpRanges": [{"CidrIp": source}]}
    ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": port, "ToPort": port, **peer}])
    tally.changed(f"{role} group: {port} from {source} allowed")


def target_settings(c):
    """The target group's health check and drain: what `scale` keeps them at."""
    # Every 5 s (AWS's shortest), out after 2 failures: a dead back-end gets requests for ~10 s at most.
    return {"HealthCheckProtocol": "HTTP", "HealthCheckPath": "/health", "HealthCheckIntervalSeconds": 5,
            "HealthCheckTimeoutSeconds": 4, "HealthyThresholdCount": 2, "UnhealthyThresholdCount": 2,
            "Matcher": {"HttpCode": "200"}}


def drain_seconds(c):
    return int(c.config.backend.get("deregistration_delay", 30))


def ensure_targets(c, elb, net, tally):
    """The target group (instances on backend.port), health-checked on /health; its ARN."""
    name, wanted = names(c)["targets"], target_settings(c)
    with cloud.step(f"target group {name}", TASK):
        group = find_targets(elb, name)
        if group is None:
            if tally.dry_run:
                tally.would(f"create target group {name} (port {c.config.backend.port}, health /health)")
                return None
            group = elb.create_target_group(Name=name, Protocol="HTTP", Port=int(c.config.backend.port),
                                            VpcId=net["vpc"], TargetType="instance", Tags=kv_tags(c, "targets"),
                                            **wanted)["TargetGroups"][0]
            tally.changed(f"target group {name} created (health check /health)")
        else:
            tally.ok(f"target group {name} exists")
            drift = {key: value for key, value in wanted.items() if group.get(key) != value}
            if drift and not tally.dry_run:
                elb.modify_target_group(TargetGroupArn=group["TargetGroupArn"], **drift)
                tally.changed(f"target group {name}: {', '.join(sorted(drift))} set again")
        arn = group["TargetGroupArn"]
        attributes = {a["Key"]: a["Value"] for a in elb.describe_target_group_attributes(TargetGroupArn=arn)[
            "Attributes"]}
        delay = str(drain_seconds(c))
        if attributes.get("deregistration_delay.timeout_seconds") != delay:
            if tally.dry_run:
                tally.would(f"set target group {name}'s deregistration delay to {delay}s")
            else:
                elb.modify_target_group_attributes(TargetGroupArn=arn, Attributes=[
                    {"Key": "deregistration_delay.timeout_seconds", "Value": delay}])
                tally.changed(f"target group {name}: deregistration delay {delay}s (drain before removal)")
        else:
            tally.ok(f"target group {name}: deregistration delay {delay}s")
    return arn


def ensure_balancer(c, elb, subnets, group_id, targets, tally):
    """The ALB: internal unless backend.mode public; a listener on 80 forwarding to the targets."""
    name = names(c)["balancer"]
    scheme = "internet-facing" if backend_mode(c) == "public" else "internal"
    with cloud.step(f"load balancer {name}", TASK):
        found = find_balancer(elb, name)
        if found and found["Scheme"] != scheme:
            raise errors.ConfigError(
                f"load balancer {name} is {found['Scheme']}, but backend.mode {backend_mode(c)} wants it {scheme}:"
                " a balancer cannot change scheme; `fab destroy` (or delete it), then re-run")
        if found:
            tally.ok(f"load balancer {name} ({scheme}) exists")
        elif tally.dry_run:
            tally.would(f"create load balancer {name} ({scheme}, listener 80)")
            return None
        else:
            found = elb.create_load_balancer(Name=name, Subnets=subnets, SecurityGroups=[group_id], Scheme=scheme,
                                             Type="application", IpAddressType="ipv4",
                                             Tags=kv_tags(c, "balancer"))["LoadBalancers"][0]
            tally.changed(f"load balancer {name} ({scheme}) created: {found['DNSName']}")
        arn = found["LoadBalancerArn"]
        listeners = elb.describe_listeners(LoadBalancerArn=arn)["Listeners"]
        forward = [{"Type": "forward", "TargetGroupArn": targets}]
        on_80 = [item for item in listeners if item["Port"] == 80]
        if not on_80:
            if tally.dry_run:
                tally.would("create listener 80")
            else:
                elb.create_listener(LoadBalancerArn=arn, Protocol="HTTP", Port=80, DefaultActions=forward,
                                    Tags=kv_tags(c, "listener"))
                tally.changed(f"listener 80 -> target group {names(c)['targets']}")
        elif [(a["Type"], a.get("TargetGroupArn")) for a in on_80[0]["DefaultActions"]] != [("forward", targets)]:
            if not tally.dry_run:
                elb.modify_listener(ListenerArn=on_80[0]["ListenerArn"], DefaultActions=forward)
                tally.changed(f"listener 80 forwards to target group {names(c)['targets']} again")
        else:
            tally.ok(f"listener 80 -> target group {names(c)['targets']}")
    return arn


BASE = "/opt/digits-backend"  # on an ASG back-end: app/, venv/, models/ (as backend.dir on the single one)
# What a back-end pulls from the bucket's app/ at boot: bucket key -> the file here (the same
# modules setup-backend uploads to the single back-end).
APP_OBJECTS = {**{f"app/{name}": FILES / name for name in APP_FILES},
               "app/requirements.txt": FILES / "backend_requirements.txt"}


def unit(c):
    """The single back-end's hardened unit (tasks/templates/digits-backend.service), for user `digits`."""
    text = (TEMPLATES / "digits-backend.service").read_text()
    for key, value in {"NAME": c.config.backend.service, "USER": "digits", "DIR": BASE,
                       "EXEC": f"{BASE}/venv/bin/gunicorn -c gunicorn.conf.py"}.items():
        text = text.replace(f"@{key}@", value)
    return text.rstrip("\n")


def user_data(c, bucket):
    """The back-end's user-data: cloud-init installs the service and pulls `current` from the bucket.
    backend.s3_endpoint (unset: AWS's own S3) is written only when set: the tests' moto server, as
    the machines reach it."""
    from .backend import environment  # (backend imports this module)

    endpoint = c.config.backend.get("s3_endpoint")
    base = Path(BASE)
    env = environment(c, {"current": base / "models" / "current", "home": base, "state": base / "state"})
    text = USER_DATA.read_text()
    for key, value in {"@BUCKET@": bucket, "@REGION@": cloud.session(c).region_name,
                       "@ENDPOINT@": f"AWS_ENDPOINT_URL={endpoint}" if endpoint else "",
                       "@APP_FILES@": " ".join(key.split("/", 1)[1] for key in APP_OBJECTS),
                       "@ENV@": env.decode().rstrip("\n"),
                       "@SERVICE@": valid_name(c.config.backend.service, "backend.service"),
                       "@UNIT@": unit(c)}.items():
        text = text.replace(key, value)
    return text


def ensure_app(c, s3, bucket, tally):
    """The app a new back-end installs (app/ in the bucket), uploaded when it differs from Files/."""
    for key, path in APP_OBJECTS.items():
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        try:
            have = s3.head_object(Bucket=bucket, Key=key).get("Metadata", {}).get("sha256")
        except ClientError as error:
            if errors.code(error) not in ("404", "NoSuchKey", "NoSuchBucket"):
                raise
            have = None
        if have == digest:
            tally.ok(f"s3://{bucket}/{key} is {path.name}")
        elif tally.dry_run:
            tally.would(f"upload {path.name} to s3://{bucket}/{key}")
        else:
            with cloud.step(f"s3://{bucket}/{key}", TASK):
                s3.put_object(Bucket=bucket, Key=key, Body=data, Metadata={"sha256": digest})
            tally.changed(f"s3://{bucket}/{key} uploaded ({path.name}, sha256 {digest[:12]})")


def template_data(c, ec2, net, profile, bucket):
    """The launch template's content: what every back-end the group starts is made of."""
    from .instances import IMDS_V2, resolve_ami, role_arch, root_volume  # (instances imports preflight too)

    types = preflight.type_info(c, ec2)
    image = resolve_ami(c, ec2, None, role_arch(c, types, "backend"), ("backend",))
    public = backend_mode(c) != "private"  # its way out to apt and S3: a public address, or the NAT
    data = {
        "ImageId": image["ImageId"],
        "InstanceType": preflight.configured_types(c)["backend"],
        "IamInstanceProfile": {"Name": profile},
        "MetadataOptions": IMDS_V2,
        "BlockDeviceMappings": root_volume(image),
        "NetworkInterfaces": [{"DeviceIndex": 0, "AssociatePublicIpAddress": public,
                               "Groups": [net["groups"]["backend"]], "DeleteOnTermination": True}],
        "UserData": base64.b64encode(user_data(c, bucket).encode()).decode(),
        "TagSpecifications": [{"ResourceType": kind, "Tags": kv_tags(c, "backend")}
                              for kind in ("instance", "volume")],
    }
    key = c.config.aws.key_name or f"{cloud.stack(c)}-key"
    if ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [key]}])["KeyPairs"]:
        data["KeyName"] = key  # for `ssh` through the front-end when something goes wrong
    return data


def _fingerprint(data):
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def ensure_template(c, ec2, net, profile, bucket, tally):
    """The launch template; a new default version when its content changes (tagged with a
    fingerprint of it, so that the comparison does not hang on how EC2 echoes fields back)."""
    name = names(c)["template"]
    with cloud.step(f"launch template {name}", TASK):
        data = template_data(c, ec2, net, profile, bucket)
        mark = _fingerprint(data)
        found = find_template(ec2, name)
        if found is None:
            if tally.dry_run:
                tally.would(f"create launch template {name} ({data['InstanceType']}, {data['ImageId']}, IMDSv2)")
                return name
            ec2.create_launch_template(LaunchTemplateName=name, LaunchTemplateData=data, VersionDescription=mark,
                                       TagSpecifications=cloud.tag_spec(c, "launch-template", "backend",
                                                                        "backend-tier"))
            tally.changed(f"launch template {name} created ({data['InstanceType']}, {data['ImageId']}, IMDSv2,"
                          " encrypted gp3, user-data)")
            return name
        default = ec2.describe_launch_template_versions(LaunchTemplateName=name, Versions=["$Default"])[
            "LaunchTemplateVersions"][0]
        if default.get("VersionDescription") == mark:
            tally.ok(f"launch template {name} v{default['VersionNumber']} is current")
        elif tally.dry_run:
            tally.would(f"create launch template {name} version (changed content)")
        else:
            version = ec2.create_launch_template_version(LaunchTemplateName=name, LaunchTemplateData=data,
                                                         VersionDescription=mark)["LaunchTemplateVersion"]
            ec2.modify_launch_template(LaunchTemplateName=name, DefaultVersion=str(version["VersionNumber"]))
            tally.changed(f"launch template {name} v{version['VersionNumber']} is the default"
                          " (new back-ends get it; running ones keep theirs)")
    return name


def ensure_group(c, asg, subnets, targets, template, wanted, ceiling, tally, health_type="ELB"):
    """The Auto Scaling group: N back-ends (min = desired = N, max = backend.max or N), replaced
    when the balancer's health check fails (`health_type` ELB; EC2 before the first model)."""
    name = names(c)["group"]
    sizes = {"MinSize": wanted, "MaxSize": ceiling, "DesiredCapacity": wanted}
    with cloud.step(f"auto scaling group {name}", TASK):
        found = find_group(asg, name)
        if found is None:
            if tally.dry_run:
                tally.would(f"create auto scaling group {name} ({wanted} back-ends, max {ceiling})")
                return
            tags = [{**tag, "PropagateAtLaunch": True, "ResourceId": name, "ResourceType": "auto-scaling-group"}
                    for tag in kv_tags(c, "backend")]
            asg.create_auto_scaling_group(
                AutoScalingGroupName=name, LaunchTemplate={"LaunchTemplateName": template, "Version": "$Default"},
                VPCZoneIdentifier=",".join(subnets), TargetGroupARNs=[targets], HealthCheckType=health_type,
                HealthCheckGracePeriod=int(c.config.backend.get("health_grace", 600)), Tags=tags, **sizes)
            tally.changed(f"auto scaling group {name} created: {wanted} back-ends (max {ceiling})")
            return
        if found.get("HealthCheckType") != health_type and not tally.dry_run:
            asg.update_auto_scaling_group(AutoScalingGroupName=name, HealthCheckType=health_type)
            tally.changed(f"auto scaling group {name}: health check {health_type}")
        have = {key: found[key] for key in sizes}
        if have == sizes:
            tally.ok(f"auto scaling group {name}: {wanted} back-ends (max {ceiling})")
        elif tally.dry_run:
            tally.would(f"change auto scaling group {name} from {have['DesiredCapacity']} to {wanted} back-ends")
        else:
            # Scaling in: the group deregisters each one first; it is terminated after the drain.
            asg.update_auto_scaling_group(AutoScalingGroupName=name, **sizes)
            tally.changed(f"auto scaling group {name}: {have['DesiredCapacity']} -> {wanted} back-ends"
                          f" (max {ceiling})")
        if targets and targets not in found.get("TargetGroupARNs", []) and not tally.dry_run:
            asg.attach_load_balancer_target_groups(AutoScalingGroupName=name, TargetGroupARNs=[targets])
            tally.changed(f"auto scaling group {name} registers into target group {names(c)['targets']} again")


def ensure_scaling_policy(c, asg, wanted, ceiling, tally):
    """backend.max > count: track average CPU at backend.cpu_target %; else no policy."""
    name, group = names(c)["scaling"], names(c)["group"]
    with cloud.step(f"scaling policy {name}", TASK):
        found = asg.describe_policies(AutoScalingGroupName=group, PolicyNames=[name])["ScalingPolicies"] \
            if not tally.dry_run or find_group(asg, group) else []
        target = float(c.config.backend.get("cpu_target", 60))
        if ceiling == wanted:
            if found:
                if tally.dry_run:
                    tally.would(f"delete scaling policy {name} (backend.max unset)")
                else:
                    asg.delete_policy(AutoScalingGroupName=group, PolicyName=name)
                    tally.changed(f"scaling policy {name} deleted (backend.max unset: a fixed count)")
            return
        current = found and found[0].get("TargetTrackingConfiguration", {}).get("TargetValue")
        if current == target:
            tally.ok(f"scaling policy {name}: average CPU {target:g}%, {wanted} to {ceiling} back-ends")
        elif tally.dry_run:
            tally.would(f"set scaling policy {name} (average CPU {target:g}%)")
        else:
            asg.put_scaling_policy(AutoScalingGroupName=group, PolicyName=name, PolicyType="TargetTrackingScaling",
                                   TargetTrackingConfiguration={"PredefinedMetricSpecification": {
                                       "PredefinedMetricType": "ASGAverageCPUUtilization"}, "TargetValue": target})
            tally.changed(f"scaling policy {name}: average CPU {target:g}%, {wanted} to {ceiling} back-ends")


def target_health(c, elb=None):
    """{instance id: health state} of the target group's registered targets ({} without one)."""
    elb = elb or cloud.client(c, "elbv2")
    group = find_targets(elb, names(c)["targets"])
    if not group:
        return {}
    found = elb.describe_target_health(TargetGroupArn=group["TargetGroupArn"])["TargetHealthDescriptions"]
    return {item["Target"]["Id"]: item["TargetHealth"]["State"] for item in found}


def wait_healthy(c, aws, wanted, tally, timeout=None):
    """Until `wanted` targets are healthy (a new back-end boots, installs and pulls its model first)."""
    timeout = timeout or int(c.config.backend.get("tier_timeout", 900))
    started = time.monotonic()
    while True:
        with cloud.step("the back-ends' target health", TASK):
            health = target_health(c, aws["elb"])
        healthy = sum(1 for state in health.values() if state == "healthy")
        if healthy >= wanted:
            tally.checked(f"{healthy} back-end(s) healthy behind the balancer")
            return
        if time.monotonic() - started > timeout:
            raise cloud.StepFailed("the back-ends' health", TASK, f"{healthy} of {wanted} healthy after {timeout}s",
                                   next_step="`fab status` lists each back-end's health; a back-end's"
                                   " /var/log/cloud-init-output.log says why it does not serve")
        time.sleep(5)


# --- Status ------------------------------------------------------------------------------------


def backends(c):
    """Each back-end of the tier: instance, zone, lifecycle, target health ([] without a tier)."""
    asg, elb = cloud.client(c, "autoscaling"), cloud.client(c, "elbv2")
    group = find_group(asg, names(c)["group"])
    if not group:
        return []
    health = target_health(c, elb)
    found = [{"id": i["InstanceId"], "zone": i["AvailabilityZone"], "lifecycle": i["LifecycleState"],
              "health": health.get(i["InstanceId"], "unregistered")} for i in group["Instances"]]
    return sorted(found, key=lambda item: item["id"])


def balancer_address(c):
    """The tier's balancer DNS name, where the front-end forwards /predict/ and /health; None
    without a tier (or an AWS that does not answer: the single back-end's path then says so)."""
    try:
        with cloud.step("reading the back-end tier", "setup-frontend"):
            if not find_group(cloud.client(c, "autoscaling"), names(c)["group"]):
                return None
            found = find_balancer(cloud.client(c, "elbv2"), names(c)["balancer"])
    except Exit:
        return None
    return found and found["DNSName"]


def describe(c):
    """The tier for `fab status`: balancer DNS, sizes, each back-end (None without a tier)."""
    with cloud.step("reading the back-end tier", "status"):
        group = find_group(cloud.client(c, "autoscaling"), names(c)["group"])
        if not group:
            return None
        balancer = find_balancer(cloud.client(c, "elbv2"), names(c)["balancer"])
        found = backends(c)
        aws = {"elb": cloud.client(c, "elbv2"), "ec2": cloud.client(c)}
        addresses = {instance["id"]: instance for instance in registered(c, aws)}
    # Each one's model, as push-model reads it (its /health over SSH), side by side: a back-end
    # that does not answer costs one connect timeout, not one each. The contexts are made here, one
    # thread (they may read AWS: boto3's session is not for threads); a host key recorded on first
    # contact is said on stderr, never into `status --json`.
    contexts = {b["id"]: backend_context(c, addresses[b["id"]]) for b in found if b["id"] in addresses}
    with contextlib.redirect_stdout(sys.stderr), concurrent.futures.ThreadPoolExecutor(max(1, len(found))) as pool:
        models = pool.map(lambda b: served_model(c, contexts[b["id"]]) if b["id"] in contexts else "-", found)
        for backend, model in zip(found, list(models), strict=True):
            backend["model"] = model
    return {"balancer": balancer and balancer["DNSName"], "scheme": balancer and balancer["Scheme"],
            "desired": group["DesiredCapacity"], "max": group["MaxSize"], "backends": found}


def served_model(c, context):
    """The first 12 hex digits of the model a back-end's /health reports (`context`: its
    backend_context), or "?" and why not."""
    from . import hosts

    try:
        cxn = hosts.connect(context, "backend")
    except Exception as error:
        return f"? (no SSH: {str(error).splitlines()[0][:60]})"
    try:
        served = reported_model(cxn, int(c.config.backend.port))
        return served[:12] if served else "? (/health reports no model)"
    except Exception as error:
        return f"? ({error.__class__.__name__})"
    finally:
        cxn.close()


def reported_model(cxn, port):
    """The sha256 a back-end's /health reports, asked on its host; None when it reports none."""
    answer = cxn.run(f"curl -fsS --max-time 5 http://127.0.0.1:{port}/health", hide=True, warn=True, timeout=20)
    try:
        return json.loads(answer.stdout)["model"]["sha256"] if answer.ok else None
    except (ValueError, KeyError, TypeError):
        return None


def lines(found):
    """`fab status`'s lines for the tier."""
    if not found:
        return []
    out = [f"tier    {found['desired']} back-ends (max {found['max']}) behind {found['scheme']} ALB"
           f" {found['balancer'] or '-'}"]
    out += [f"  {b['id']} {b['zone']} {b['lifecycle']} target {b['health']} model {b.get('model', '-')}"
            for b in found["backends"]]
    hourly, hours = cost.PRICES["alb_hourly"], cost.PRICES["hours_per_month"]
    out.append(f"  the ALB adds about ${hourly:.4f}/h (${hourly * hours:.2f}/month at {cost.PRICES['region']}"
               " prices) plus its LCUs;"
               " its back-ends are in the instances below")
    return out


# --- destroy ------------------------------------------------------------------------------------


def confirmation(c):
    """What `destroy` adds to its question: the bucket and its model count, if there is one."""
    s3 = cloud.client(c, "s3")
    bucket = bucket_name(c)
    if not bucket_exists(s3, bucket) or foreign(c, s3, bucket):
        return ""
    return f" This deletes bucket {bucket} and its {model_count(s3, bucket)} model version(s)."


def remove(c, delete):
    """Everything of the tier, each kind once nothing depends on it: the group (its instances
    with it), the balancer (its listener with it), targets, template, profile, role, bucket."""
    aws = _clients(c)
    n = names(c)
    group = find_group(aws["asg"], n["group"])
    if group:
        delete(f"auto scaling group {n['group']} and its {len(group['Instances'])} back-end(s)",
               (aws["asg"].delete_auto_scaling_group, {"AutoScalingGroupName": n["group"], "ForceDelete": True}),
               (_group_gone, {"asg": aws["asg"], "name": n["group"]}))
    balancer = find_balancer(aws["elb"], n["balancer"])
    if balancer:
        arn = balancer["LoadBalancerArn"]
        delete(f"load balancer {n['balancer']}", (aws["elb"].delete_load_balancer, {"LoadBalancerArn": arn}),
               (aws["elb"].get_waiter("load_balancers_deleted").wait,
                {"LoadBalancerArns": [arn], "WaiterConfig": {"Delay": 3, "MaxAttempts": 100}}))
    targets = find_targets(aws["elb"], n["targets"])
    if targets:
        # In use a moment longer than its balancer exists: ResourceInUse is retried.
        delete(f"target group {n['targets']}", (_retry_in_use, {"operation": aws["elb"].delete_target_group,
                                                                "TargetGroupArn": targets["TargetGroupArn"]}))
    if find_template(aws["ec2"], n["template"]):
        delete(f"launch template {n['template']}",
               (aws["ec2"].delete_launch_template, {"LaunchTemplateName": n["template"]}))
    _remove_role(aws["iam"], n["role"], n["policy"], delete)
    bucket = bucket_name(c)
    if bucket_exists(aws["s3"], bucket) and foreign(c, aws["s3"], bucket):
        cloud.warn(f"bucket {bucket} is not this stack's (no Project={cloud.stack(c)} tag): left as it is")
    elif bucket_exists(aws["s3"], bucket):
        delete(f"bucket {bucket} ({model_count(aws['s3'], bucket)} model version(s))",
               (_empty_bucket, {"s3": aws["s3"], "bucket": bucket}), (aws["s3"].delete_bucket, {"Bucket": bucket}))


def _group_gone(asg, name, timeout=900):
    """ForceDelete terminates the instances first; the group is gone after them."""
    started = time.monotonic()
    while find_group(asg, name) and time.monotonic() - started < timeout:
        time.sleep(5)


def _retry_in_use(operation, **params):
    return cloud.retry(operation, ("ResourceInUse",), **params)


def _remove_role(iam, name, policy, delete):
    try:
        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    except ClientError as error:
        if errors.code(error) != "NoSuchEntity":
            raise
        profile = None
    if profile:
        calls = [(iam.remove_role_from_instance_profile, {"InstanceProfileName": name, "RoleName": role["RoleName"]})
                 for role in profile.get("Roles", [])]
        delete(f"instance profile {name}", *calls, (iam.delete_instance_profile, {"InstanceProfileName": name}))
    try:
        iam.get_role(RoleName=name)
    except ClientError as error:
        if errors.code(error) != "NoSuchEntity":
            raise
        return
    calls = [(iam.delete_role_policy, {"RoleName": name, "PolicyName": p})
             for p in iam.list_role_policies(RoleName=name)["PolicyNames"]]
    delete(f"role {name}", *calls, (iam.delete_role, {"RoleName": name}))


def _empty_bucket(s3, bucket):
    """Every version and delete marker (a versioned bucket is deleted only empty of both)."""
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        doomed = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                  for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
        if doomed:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": doomed, "Quiet": True})


# --- push-model across the tier -----------------------------------------------------------------

PULL = "/usr/local/sbin/digits-pull"  # written by the user-data
HEALTH_TIMEOUT = 90  # seconds for a back-end's /health to report the new model


def upload_model(c, s3, bucket, source, digest, tally):
    """models/<sha256>.tflite in the bucket (kept: the bucket is versioned, `current` names one)."""
    key = f"models/{digest}.tflite"
    try:
        s3.head_object(Bucket=bucket, Key=key)
        tally.ok(f"s3://{bucket}/{key} exists")
        return
    except ClientError as error:
        if errors.code(error) not in ("404", "NoSuchKey"):
            raise
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    s3.put_object(Bucket=bucket, Key=key, Body=data, Metadata={"sha256": digest})
    tally.changed(f"s3://{bucket}/{key} uploaded ({len(data)} bytes)")


def gate(c, s3, bucket, previous, metrics, force, tally):
    """push-model's accuracy gate on the tier: the serving model's metrics are in the bucket beside it."""
    from . import registry

    old = None
    if previous:
        try:
            old = json.loads(s3.get_object(Bucket=bucket, Key=f"models/{previous}.metrics.json")["Body"].read())
        except ClientError as error:
            if errors.code(error) not in ("NoSuchKey", "404"):
                raise
    new, old = registry.mnist_accuracy(metrics), registry.mnist_accuracy(old)
    if new is None or old is None:
        tally.ok("accuracy gate: " + ("the new" if new is None else "the serving") + " model's MNIST test"
                 " accuracy is not known: not compared")
        return
    passes, text = registry.gate_verdict(new, old, float(c.config.model.max_regression))
    if passes:
        tally.checked(f"accuracy gate: {text}")
    elif force:
        tally.ok(f"accuracy gate overridden by --force: {text}")
    else:
        raise errors.StepFailed(f"s3://{bucket}", "push-model", f"accuracy gate: {text}: refused, the back-ends"
                                " keep serving their model", next_step="train longer (fab train), or push it"
                                " anyway with `fab push-model --force`")


def push_model(c, source, digest, on_backend=None, metrics=None, force=False):
    """Upload the model, then roll it across the registered back-ends one at a time: deregister
    (the balancer drains it), swap, health check, register again. On the first back-end that does
    not serve it, that one goes back to the previous model and the roll stops: the rest never saw
    the new one, and `current` in the bucket still names the previous one. `on_backend(instance,
    digest)` swaps and checks one back-end (default: over SSH, `swap_over_ssh`)."""
    on_backend = on_backend or swap_over_ssh
    aws = _clients(c)
    with Tally("push-model", "backend-tier", where=cloud.where(c)) as tally:
        bucket = bucket_name(c)
        with cloud.step(f"s3://{bucket}", "push-model"):
            if not bucket_exists(aws["s3"], bucket):
                raise Exit(f"no bucket {bucket} for the back-end tier: run `fab scale` first")
            previous = current_model(aws["s3"], bucket)
            gate(c, aws["s3"], bucket, previous, metrics, force, tally)
            upload_model(c, aws["s3"], bucket, source, digest, tally)
            if metrics is not None:  # beside the model: the next push's gate reads it
                aws["s3"].put_object(Bucket=bucket, Key=f"models/{digest}.metrics.json",
                                     Body=json.dumps(metrics).encode())
        done = set()
        while True:  # again for back-ends the group started during the roll (they pulled the old `current`)
            todo = [i for i in registered(c, aws) if i["id"] not in done]
            if not todo:
                break
            for instance in todo:
                roll_one(c, aws, instance, digest, previous, on_backend, tally)
                done.add(instance["id"])
            if previous != digest:
                aws["s3"].put_object(Bucket=bucket, Key="current", Body=digest.encode())
                tally.changed(f"s3://{bucket}/current -> {digest[:12]} (was {(previous or 'none')[:12]}):"
                              " new back-ends start with it")
                previous = digest
                serve_checked(c, aws, tally)
        if not done:
            tally.note("no back-end registered: new ones start with the bucket's `current`")
            if previous != digest:
                aws["s3"].put_object(Bucket=bucket, Key="current", Body=digest.encode())
                tally.changed(f"s3://{bucket}/current -> {digest[:12]}")
                serve_checked(c, aws, tally)
    return tally.result


def serve_checked(c, aws, tally):
    """Once a model is there, a back-end failing the balancer's health check is replaced."""
    group = find_group(aws["asg"], names(c)["group"])
    if group and group.get("HealthCheckType") != "ELB":
        aws["asg"].update_auto_scaling_group(AutoScalingGroupName=group["AutoScalingGroupName"],
                                             HealthCheckType="ELB")
        tally.changed(f"auto scaling group {group['AutoScalingGroupName']}: health check ELB (a model is served)")


def registered(c, aws):
    """The target group's targets with their addresses, in a stable order."""
    health = target_health(c, aws["elb"])
    if not health:
        return []
    pages = aws["ec2"].get_paginator("describe_instances").paginate(InstanceIds=sorted(health))
    found = [i for page in pages for r in page["Reservations"] for i in r["Instances"]]
    return [{"id": i["InstanceId"], "private_ip": i.get("PrivateIpAddress"), "public_ip": i.get("PublicIpAddress"),
             "health": health[i["InstanceId"]]} for i in sorted(found, key=lambda i: i["InstanceId"])]


def roll_one(c, aws, instance, digest, previous, on_backend, tally):
    """One back-end: out of the balancer (drained), the new model, checked, back in."""
    arn = find_targets(aws["elb"], names(c)["targets"])["TargetGroupArn"]
    target = [{"Id": instance["id"], "Port": int(c.config.backend.port)}]
    wait = {"TargetGroupArn": arn, "Targets": target,
            "WaiterConfig": {"Delay": 5, "MaxAttempts": max(12, drain_seconds(c) // 5 + 6)}}
    with cloud.step(f"back-end {instance['id']} out of the balancer", "push-model"):
        aws["elb"].deregister_targets(TargetGroupArn=arn, Targets=target)
        aws["elb"].get_waiter("target_deregistered").wait(**wait)
    tally.changed(f"{instance['id']} deregistered and drained")
    try:
        if on_backend(c, instance, digest):
            tally.checked(f"{instance['id']} serves model {digest[:12]}")
            ok = True
        else:
            ok = False
            if previous:
                back = on_backend(c, instance, previous)
                tally.changed(f"{instance['id']} back to model {previous[:12]}" + ("" if back else " (not answering)"))
    finally:
        # Back in, whatever happened on it (an SSH failure too): out of the target group, no roll would
        # find it again and no health check would replace it; in it, the balancer's check decides.
        with cloud.step(f"back-end {instance['id']} into the balancer", "push-model"):
            aws["elb"].register_targets(TargetGroupArn=arn, Targets=target)
            aws["elb"].get_waiter("target_in_service").wait(**wait)
        tally.changed(f"{instance['id']} registered again")
    if not ok:
        raise cloud.StepFailed(
            f"back-end {instance['id']}", "push-model",
            f"it did not serve model {digest[:12]} within {HEALTH_TIMEOUT}s: it serves"
            f" {(previous or 'no model')[:12]} again, and the roll stopped there (no other back-end has it)",
            next_step="its journal says why (`journalctl -u digits-backend` on it); fix the model, then"
                      " `fab push-model` again")


def backend_context(c, instance):
    """A Context whose ssh.hosts.backend is this back-end (through the front-end in private mode)."""
    from invoke import Context

    from . import state

    data = state.load(c)
    if not data.get("key_path") or not data["instances"]["frontend"]["public_ip"]:
        data = state.refresh(c)
    config = c.config.clone()
    ssh = config.ssh
    private = backend_mode(c) == "private"
    # Its public address where it has one (proxied, public); else the private one (an operator inside the VPC).
    address = instance["private_ip"] if private else instance.get("public_ip") or instance["private_ip"]
    spec = {"backend": f"{ssh.user}@{address}:{ssh.port}"}
    if private:
        spec["frontend"] = f"{ssh.user}@{data['instances']['frontend']['public_ip']}:{ssh.port}"
    ssh.hosts = spec
    if not ssh.get("key") and data.get("key_path"):
        ssh.key = data["key_path"]
    return Context(config=config)


def swap_over_ssh(c, instance, digest):
    """On the back-end: pull that model from the bucket, reload gracefully, and wait until /health
    reports it three times in a row. True if it does within HEALTH_TIMEOUT."""
    from . import hosts

    cxn = hosts.connect(backend_context(c, instance), "backend")
    service = valid_name(c.config.backend.service, "backend.service")
    port = int(c.config.backend.port)
    try:
        swap = f"{PULL} model {digest} && systemctl reload-or-restart {service}"
        if not cxn.sudo(f"sh -c {q(swap)}", hide=True, warn=True).ok:  # both as root, not just the first
            return False
        deadline, streak = time.monotonic() + HEALTH_TIMEOUT, 0
        while time.monotonic() < deadline and streak < 3:
            streak = streak + 1 if reported_model(cxn, port) == digest else 0
            time.sleep(0.5)
        return streak >= 3
    finally:
        cxn.close()
