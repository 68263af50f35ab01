"""Guide, "Architecture" steps 5-6: three Ubuntu instances, Elastic IPs; and their life
(the key pair: tasks/keypair.py).

`launch` is idempotent like `create-vpc`: each instance and address is found by
its stack and role tags first. `destroy` (tasks/teardown.py) removes it all.
"""
import json as jsonlib
import time
import uuid

from botocore.exceptions import ClientError
from invoke import task
from invoke.exceptions import Exit

from . import cloud, cost, errors, hosts, keypair, preflight, state, tier
from .config import ROLES, backend_mode, proxied

CANONICAL = "099720109477"  # the AWS account Ubuntu's official images come from
# IMDSv2 only: a token (a PUT first) for every metadata read, so a server-side
# request forgery on the back-end cannot read the instance's credentials.
IMDS_V2 = {"HttpTokens": "required", "HttpEndpoint": "enabled"}
LAUNCH = "launch"


@task(
    help={
        "no-wait": "don't wait for SSH to answer on each instance",
        "dry-run": "print what would be created, change nothing",
    }
)
@cloud.resumable(LAUNCH)
def launch(c, no_wait=False, dry_run=False):
    """Launch the worker, front-end and back-end with a key pair and Elastic IPs; wait for SSH."""
    cloud.ubuntu_release(c)
    with cloud.AwsRun(c, LAUNCH, dry_run) as aws:
        net = _network(aws)
        # Everything that can refuse is asked before the first instance exists (a worker left
        # running, billed, by a refused front-end is what a first deploy must never meet).
        with aws.step("reading the instance types"):
            types = preflight.type_info(c, aws.ec2)
            if net:
                preflight.check_zone(c, aws.ec2, net["zone"])
        found = images(c, aws.ec2, types, aws)
        preflight.ensure_quotas(aws, ("eip", "vcpu"), types)
        key_name = keypair.ensure_key_pair(aws)
        ids = {role: _instance(aws, role, net, found[role_arch(c, types, role)], key_name) for role in ROLES}
        if not dry_run:
            with aws.step("instances reaching `running`"):
                aws.ec2.get_waiter("instance_running").wait(InstanceIds=list(ids.values()))
        for role in ROLES:
            if has_public_address(c, role):
                _address(aws, role, ids[role])
            elif aws.find_one("addresses", role):  # left by an earlier mode
                cloud.warn(f"the {role}'s elastic-ip is billed and unused with backend.mode {backend_mode(c)}:"
                           " `fab destroy` removes it with the stack")
        if not dry_run:
            data = state.refresh(c, aws.ec2)
            if not no_wait:
                wait_for_ssh(c, data, ROLES, aws)
    return aws.result


@task(help={"json": "print machine-readable JSON instead"})
@cloud.resumable("status")
def status(c, json=False):
    """Show the stack as AWS has it now: ids, states, addresses and the app's URLs."""
    data = state.refresh(c)
    data["urls"] = urls(c, data)
    data["cost"] = cost.figures(c)  # tasks/cost.py: hourly and monthly, from tasks/prices.json
    data["tier"] = tier.describe(c)  # tasks/tier.py: the balanced back-ends, if any
    if data["instances"]["backend"]["state"] == "running" and not data["tier"]:
        from .corrections import status_line  # (corrections -> backend -> instances: imported late)

        data["backend_metrics"] = status_line(c)
    if json:
        print(jsonlib.dumps(data, indent=2, sort_keys=True))
        return
    print(f"stack   {data['stack']} ({data['region']})")
    print(f"mode    backend.mode {backend_mode(c)}")
    for label, name in (("vpc", "vpc_id"), ("subnet", "subnet_id"), ("igw", "igw_id"), ("routes", "route_table_id"),
                        ("private", "private_subnet_id"), ("nat", "nat_gateway_id")):
        if data[name] or name in ("vpc_id", "subnet_id", "igw_id", "route_table_id"):
            print(f"{label:<7} {data[name] or '-'}")
    for role in ROLES:
        i = data["instances"][role]
        group = data["security_groups"].get(role) or "-"
        print(f"{role:<8} {i['id'] or '-'} {i['state'] or 'absent'} "
              f"public {i['public_ip'] or '-'} private {i['private_ip'] or '-'} sg {group}")
    print("\n".join(tier.lines(data["tier"])))
    if data.get("backend_metrics"):
        print(f"metrics {data['backend_metrics']}")
    print(f"key     {data['key_name']} ({data['key_path'] or 'no local private key'})")
    for name, url in data["urls"].items():
        print(f"{name:<8} {url}")
    print("\n".join(cost.lines(data["cost"])))


@task(help={"dry-run": "print what would be stopped, change nothing"})
@cloud.resumable("stop-worker")
def stop_worker(c, dry_run=False):
    """Stop the working machine (the guide: it "can be stopped afterward"); its Elastic IP stays."""
    ec2 = cloud.client(c)
    worker = _worker(c, ec2)
    instance_id, current = worker["InstanceId"], worker["State"]["Name"]
    with cloud.AwsRun(c, "stop-worker", dry_run, "worker", f"{instance_id}, {cloud.where(c)}", ec2) as aws:
        if current == "stopped":
            aws.ok(f"instance {instance_id} (worker) already stopped")
        elif dry_run:
            aws.would(f"stop instance {instance_id} (worker)")
        else:
            with aws.step(f"stopping worker {instance_id}"):
                if current == "pending":  # still starting: AWS refuses to stop it yet
                    ec2.get_waiter("instance_running").wait(InstanceIds=[instance_id])
                if current != "stopping":
                    ec2.stop_instances(InstanceIds=[instance_id])
                ec2.get_waiter("instance_stopped").wait(InstanceIds=[instance_id])
            if current == "stopping":
                aws.ok(f"instance {instance_id} (worker) was stopping, now stopped")
            else:
                aws.changed(f"instance {instance_id} (worker) stopped")
        aws.note(cost.stop_saving(c, worker["InstanceType"], dry_run))
        if not dry_run:
            state.refresh(c, ec2)
    return aws.result


@task(
    help={
        "no-wait": "don't wait for SSH to answer",
        "dry-run": "print what would be started, change nothing",
    }
)
@cloud.resumable("start-worker")
def start_worker(c, no_wait=False, dry_run=False):
    """Start the working machine again, at the same Elastic IP; wait for SSH."""
    ec2 = cloud.client(c)
    worker = _worker(c, ec2)
    instance_id, current = worker["InstanceId"], worker["State"]["Name"]
    with cloud.AwsRun(c, "start-worker", dry_run, "worker", f"{instance_id}, {cloud.where(c)}", ec2) as aws:
        if current in ("running", "pending"):
            if current == "pending" and not dry_run:
                with aws.step(f"worker {instance_id} reaching `running`"):
                    ec2.get_waiter("instance_running").wait(InstanceIds=[instance_id])
            aws.ok(f"instance {instance_id} (worker) already {current}")
        elif dry_run:
            aws.would(f"start instance {instance_id} (worker)")
        else:
            with aws.step(f"starting worker {instance_id}"):
                if current == "stopping":
                    # AWS answers IncorrectInstanceState to a start before the stop is complete.
                    ec2.get_waiter("instance_stopped").wait(InstanceIds=[instance_id])
                ec2.start_instances(InstanceIds=[instance_id])
                ec2.get_waiter("instance_running").wait(InstanceIds=[instance_id])
            aws.changed(f"instance {instance_id} (worker) started")
        if not dry_run:
            data = state.refresh(c, ec2)
            if not no_wait:
                wait_for_ssh(c, data, ["worker"], aws)
    return aws.result


def has_public_address(c, role):
    """Every machine has an Elastic IP but the back-end in backend.mode private."""
    return not (role == "backend" and backend_mode(c) == "private")


def _network(aws):
    """Each role's subnet and group, as `create-vpc` made them; `launch` doesn't make them itself."""
    c = aws.c
    subnets = {name: aws.find_one("subnets", name=name) for name in ("public", "private")}
    groups = {role: aws.find_one("security_groups", role) for role in ROLES}
    wanted = {role: "public" if has_public_address(c, role) else "private" for role in ROLES}
    if all(subnets[name] for name in wanted.values()) and all(groups.values()):
        return {"subnets": {role: subnets[name]["SubnetId"] for role, name in wanted.items()},
                "groups": {r: g["GroupId"] for r, g in groups.items()},
                "zone": subnets["public"]["AvailabilityZone"]}
    if aws.dry_run:
        return None
    raise cloud.StepFailed(f"network of stack {aws.stack}", aws.task, f"none for backend.mode {backend_mode(c)}",
                           next_step="run `fab create-vpc` first")


def role_arch(c, types, role):
    """The architecture (x86_64, arm64) of the role's configured instance type."""
    return preflight.architecture(types[preflight.configured_types(c)[role]])


def images(c, ec2, types, tally):
    """{role's architecture: image}: one image per architecture the configured types need (a
    Graviton t4g back-end gets an arm64 image, an m5 worker an amd64 one)."""
    archs = {}
    for role in ROLES:
        archs.setdefault(role_arch(c, types, role), []).append(role)
    return {arch: resolve_ami(c, ec2, tally, arch, roles) for arch, roles in archs.items()}


def resolve_ami(c, ec2, tally, arch="x86_64", roles=ROLES):
    """The image to launch for `arch`, as describe_images has it: aws.ami if set (checked against
    the roles' architecture); else Canonical's SSM parameter; else Canonical's newest matching image."""
    aws = c.config.aws
    note = tally.note if tally else (lambda message: None)
    if aws.ami:
        try:
            found = ec2.describe_images(ImageIds=[aws.ami])["Images"]
        except ClientError as error:
            if not errors.code(error).startswith("InvalidAMIID"):
                raise cloud.StepFailed(f"image {aws.ami}", LAUNCH, error) from error  # denied, throttled...
            found = []
        if len(found) != 1 or found[0].get("State", "available") != "available":
            raise cloud.ConfigError(f"aws.ami={aws.ami!r}: no such image available in {cloud.session(c).region_name}")
        [image] = found
        if image.get("Architecture", arch) != arch:
            types = preflight.configured_types(c)
            raise cloud.ConfigError(
                f"aws.ami={aws.ami} is an {image['Architecture']} image, but "
                + ", ".join(f"aws.instance_types.{role}={types[role]}" for role in roles)
                + f" run{'s' if len(roles) == 1 else ''} {arch}: unset aws.ami (an image is then looked up for"
                " each architecture) or choose types of the image's architecture")
        note(f"ami {aws.ami} (aws.ami, {arch})")
        return image
    release = cloud.ubuntu_release(c)
    name = aws.ami_ssm_parameter.format(release=release, arch=preflight.ARCH_NAMES.get(arch, arch))
    try:
        image_id = cloud.client(c, "ssm").get_parameter(Name=name)["Parameter"]["Value"]
    except ClientError as error:
        # Not published in this region or partition, or not allowed: search instead.
        note(f"ami: {name} unavailable ({error.response['Error']['Code']}), searching Canonical's images")
    else:
        with cloud.step(f"image {image_id} from {name}", LAUNCH):
            [image] = ec2.describe_images(ImageIds=[image_id])["Images"]
        note(f"ami {image_id} (ubuntu {release} {arch}, from {name})")
        return image
    pattern = f"ubuntu/images/hvm-ssd*/ubuntu-*-{release}-{preflight.ARCH_NAMES.get(arch, arch)}-server-*"
    with cloud.step(f"looking up the Ubuntu {release} {arch} image", LAUNCH):
        found = ec2.describe_images(
            Owners=[CANONICAL],
            Filters=[
                {"Name": "name", "Values": [pattern]},
                {"Name": "architecture", "Values": [arch]},
                {"Name": "state", "Values": ["available"]},
            ],
        )["Images"]
    if not found:
        raise cloud.ConfigError(f"no Ubuntu {release} {arch} image from Canonical here: set aws.ami")
    newest = max(found, key=lambda image: image["CreationDate"])
    note(f"ami {newest['ImageId']} ({newest['Name']})")
    return newest


def root_volume(image):
    """The image's root device as an encrypted gp3 volume (the account's default EBS key),
    deleted with its instance; its size stays the image's."""
    device = image["RootDeviceName"]
    ebs = next((m.get("Ebs", {}) for m in image.get("BlockDeviceMappings", []) if m.get("DeviceName") == device), {})
    wanted = {"VolumeType": "gp3", "Encrypted": True, "DeleteOnTermination": True}
    if ebs.get("VolumeSize"):
        wanted["VolumeSize"] = ebs["VolumeSize"]
    return [{"DeviceName": device, "Ebs": wanted}]


def _instance(aws, role, net, image, key_name):
    wanted = aws.c.config.aws.instance_types[role]
    found = net and aws.find_one("instances", role)
    if found:
        instance_id, current = found["InstanceId"], found["State"]["Name"]
        aws.ok(f"instance {instance_id} ({role}, {found['InstanceType']}, {current}) exists")
        if found["InstanceType"] != wanted:
            cloud.warn(f"{role} is {found['InstanceType']}, config says {wanted}: not resized")
        if found.get("SubnetId") != net["subnets"][role]:
            raise cloud.ConfigError(
                f"the {role} {instance_id} is in subnet {found.get('SubnetId')}, but backend.mode"
                f" {backend_mode(aws.c)} puts it in {net['subnets'][role]}: an instance cannot change"
                f" subnet; terminate it (or `fab destroy`), then re-run"
            )
        _metadata_v2(aws, role, found)
        if current in ("stopped", "stopping"):
            if aws.dry_run:
                aws.would(f"start instance {instance_id} ({role})")
            else:
                with aws.step(f"starting {role} {instance_id}"):
                    aws.ec2.get_waiter("instance_stopped").wait(InstanceIds=[instance_id])
                    aws.ec2.start_instances(InstanceIds=[instance_id])
                aws.changed(f"instance {instance_id} ({role}) started")
        return instance_id
    if aws.dry_run:
        aws.would(f"create instance {role} ({wanted}, {image['ImageId']}, IMDSv2, encrypted gp3 root)")
        return None
    with aws.step(f"instance {role}"):
        # Just imported or created, the key pair, group or subnet can be unknown to RunInstances
        # for a moment (eventual consistency): retried, with one token so that botocore's own
        # retries of a call AWS did take start one instance, not two.
        instance_id = cloud.retry(
            aws.ec2.run_instances, errors.NEW_RESOURCE_NOT_FOUND, attempts=8, delay=3,
            ClientToken=str(uuid.uuid4()),
            ImageId=image["ImageId"],
            InstanceType=wanted,
            KeyName=key_name,
            MinCount=1,
            MaxCount=1,
            SubnetId=net["subnets"][role],
            SecurityGroupIds=[net["groups"][role]],
            MetadataOptions=IMDS_V2,
            BlockDeviceMappings=root_volume(image),
            TagSpecifications=aws.tag_spec("instance", role, role)
            + aws.tag_spec("volume", role, role),
        )["Instances"][0]["InstanceId"]
    aws.changed(f"instance {instance_id} ({role}, {wanted}) created")
    return instance_id


def _metadata_v2(aws, role, found):
    """IMDSv2 on an instance launched before it was the default here (changeable in place,
    unlike the root volume's encryption)."""
    instance_id, options = found["InstanceId"], found.get("MetadataOptions", {})
    if all(options.get(key) == value for key, value in IMDS_V2.items()):
        return
    if aws.dry_run:
        aws.would(f"change instance {instance_id} ({role}) metadata to IMDSv2 only")
        return
    with aws.step(f"IMDSv2 on {role} {instance_id}"):
        aws.ec2.modify_instance_metadata_options(InstanceId=instance_id, **IMDS_V2)
    aws.changed(f"instance {instance_id} ({role}) metadata IMDSv2 only")


def _address(aws, role, instance_id):
    """The guide's step 6: an Elastic IP per machine, stable across stop/start."""
    address, _ = ensure_address(aws, role)
    if address:
        ensure_address_associated(aws, address, role, instance_id)


def ensure_address(aws, role):
    """(address, changed): the role's Elastic IP, found by tag, else allocated (None in a dry run)."""
    found = aws.find_one("addresses", role)
    if found:
        aws.ok(f"elastic-ip {found['PublicIp']} ({role}) exists")
        return found, False
    if aws.dry_run:
        aws.would(f"create elastic-ip ({role})")
        return None, True
    with aws.step(f"elastic ip of {role}"):
        made = aws.ec2.allocate_address(Domain="vpc", TagSpecifications=aws.tag_spec("elastic-ip", role, role))
    aws.changed(f"elastic-ip {made['PublicIp']} ({role}) created")
    return made, True


def ensure_address_associated(aws, address, role, instance_id):
    """The address on the role's instance; whether changed."""
    if address.get("InstanceId") == instance_id:
        aws.ok(f"elastic-ip {address['PublicIp']} associated to {instance_id} ({role})")
        return False
    if aws.dry_run:
        aws.would(f"change elastic-ip {address['PublicIp']} associated to {instance_id or role}")
        return True
    with aws.step(f"association of elastic ip {address['PublicIp']} to {role}"):
        # A just allocated address (or just started instance) can be unknown for a moment.
        cloud.retry(aws.ec2.associate_address, errors.NEW_ADDRESS_NOT_FOUND, attempts=8, delay=3,
                    AllocationId=address["AllocationId"], InstanceId=instance_id, AllowReassociation=True)
    aws.changed(f"elastic-ip {address['PublicIp']} associated to {instance_id} ({role})")
    return True


def _worker(c, ec2):
    worker = cloud.find_one(c, ec2, "instances", "worker")
    if not worker:
        raise cloud.StepFailed(f"worker of stack {cloud.stack(c)}", None, "no such instance",
                               next_step="run `fab launch` first")
    return worker


def wait_for_ssh(c, data, roles, tally):
    """Log in to each role over SSH for real (key, host key, a session), up to ssh.timeout seconds
    in all: a port that answers is not yet a machine that lets you in (cloud-init installs the key
    after sshd starts), and an instance without its address yet is not ready. The private
    back-end is logged into through the front-end."""
    timeout = c.config.ssh.timeout
    started = time.monotonic()
    for role in roles:
        via = " through the front-end" if hosts.gateway_role(c, role) else ""
        tally.note(f"waiting for an SSH login on the {role}{via} (up to {timeout}s)")
        while True:
            try:
                cxn = hosts.connect(c, role)
            except errors.HostKeyChanged:
                raise  # no wait cures that
            except Exit as error:
                waited = time.monotonic() - started
                if waited > timeout:
                    hint = hosts.ssh_hint(c, role)  # said once, last, as the next step
                    raise cloud.StepFailed(f"ssh login on the {role}{via}", tally.task,
                                           f"none within {timeout}s (ssh.timeout): "
                                           + error.message.replace(f"\n  {hint}", ""), next_step=hint) from None
                tally.note(f"... {role} not letting us in yet ({int(waited)}s)")
                time.sleep(2)
                continue
            where = hosts.label(cxn)
            cxn.close()
            break
        tally.checked(f"ssh login on the {where}")


def urls(c, data):
    """Where the app, the back-end and Jupyter are reached (Jupyter only through SSH)."""
    ip = {role: data["instances"][role]["public_ip"] for role in ROLES}
    found = {}
    if ip["frontend"]:
        found["app"] = hosts.http_url(ip["frontend"], c.config.frontend.port, "/")
    if proxied(c) and ip["frontend"]:  # the back-end's port is closed to the world
        found["backend"] = hosts.http_url(ip["frontend"], c.config.frontend.port, "/health")
    elif ip["backend"] and not proxied(c):
        found["backend"] = hosts.http_url(ip["backend"], c.config.backend.port, "/")
    if ip["worker"]:
        key, port = data["key_path"] or "<key.pem>", c.config.worker.jupyter_port
        found["jupyter"] = (
            f"http://localhost:{port}/ after "
            f"ssh -i {key} -N -L {port}:localhost:{port} {c.config.ssh.user}@{ip['worker']}"
        )
    return found
