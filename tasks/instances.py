"""Guide, "Architecture" steps 5-6: key pair, three Ubuntu instances, Elastic IPs; and their life.

`launch` is idempotent like `create-vpc`: each instance and address is found by
its stack and role tags first. `destroy` removes everything, in dependency order.
"""
import json as jsonlib
import os
import socket
import time

from botocore.exceptions import ClientError
from invoke import task
from invoke.exceptions import Exit

from . import cloud, state
from .cloud import say
from .config import ROLES

CANONICAL = "099720109477"  # the AWS account Ubuntu's official images come from


@task(
    help={
        "no-wait": "don't wait for SSH to answer on each instance",
        "dry-run": "print what would be created, change nothing",
    }
)
@cloud.resumable("launch")
def launch(c, no_wait=False, dry_run=False):
    """Launch the worker, front-end and back-end with a key pair and Elastic IPs; wait for SSH."""
    ec2 = cloud.client(c)
    net = _network(c, ec2, dry_run)
    ami = resolve_ami(c, ec2)
    key_name = _key_pair(c, ec2, dry_run)  # checked before any instance exists
    ids = {role: _instance(c, ec2, role, net, ami, key_name, dry_run) for role in ROLES}
    if dry_run:
        for role in ROLES:
            _address(c, ec2, role, ids[role], dry_run)
        return
    with cloud.step("instances reaching `running`", "launch"):
        ec2.get_waiter("instance_running").wait(InstanceIds=list(ids.values()))
    for role in ROLES:
        _address(c, ec2, role, ids[role], dry_run)
    data = state.refresh(c, ec2)
    if not no_wait:
        wait_for_ssh(c, data, ROLES)


@task(help={"json": "print machine-readable JSON instead"})
@cloud.resumable("status")
def status(c, json=False):
    """Show the stack as AWS has it now: ids, states, addresses and the app's URLs."""
    data = state.refresh(c)
    data["urls"] = urls(c, data)
    if json:
        print(jsonlib.dumps(data, indent=2, sort_keys=True))
        return
    print(f"stack   {data['stack']} ({data['region']})")
    for label, name in (("vpc", "vpc_id"), ("subnet", "subnet_id"), ("igw", "igw_id"), ("routes", "route_table_id")):
        print(f"{label:<7} {data[name] or '-'}")
    for role in ROLES:
        i = data["instances"][role]
        group = data["security_groups"].get(role) or "-"
        print(f"{role:<8} {i['id'] or '-'} {i['state'] or 'absent'} "
              f"public {i['public_ip'] or '-'} private {i['private_ip'] or '-'} sg {group}")
    print(f"key     {data['key_name']} ({data['key_path'] or 'no local private key'})")
    for name, url in data["urls"].items():
        print(f"{name:<8} {url}")


@task(help={"dry-run": "print what would be stopped, change nothing"})
@cloud.resumable("stop-worker")
def stop_worker(c, dry_run=False):
    """Stop the working machine (the guide: it "can be stopped afterward"); its Elastic IP stays."""
    ec2 = cloud.client(c)
    worker = _worker(c, ec2)
    if worker["State"]["Name"] == "stopped":
        say("ok", f"instance {worker['InstanceId']} (worker) already stopped")
    elif dry_run:
        say("would stop", f"instance {worker['InstanceId']} (worker)")
    else:
        with cloud.step(f"stopping worker {worker['InstanceId']}", "stop-worker"):
            ec2.stop_instances(InstanceIds=[worker["InstanceId"]])
            ec2.get_waiter("instance_stopped").wait(InstanceIds=[worker["InstanceId"]])
        say("stopped", f"instance {worker['InstanceId']} (worker)")
    if not dry_run:
        state.refresh(c, ec2)


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
    if worker["State"]["Name"] == "running":
        say("ok", f"instance {worker['InstanceId']} (worker) already running")
    elif dry_run:
        say("would start", f"instance {worker['InstanceId']} (worker)")
        return
    else:
        with cloud.step(f"starting worker {worker['InstanceId']}", "start-worker"):
            ec2.start_instances(InstanceIds=[worker["InstanceId"]])
            ec2.get_waiter("instance_running").wait(InstanceIds=[worker["InstanceId"]])
        say("started", f"instance {worker['InstanceId']} (worker)")
    if not dry_run:
        data = state.refresh(c, ec2)
        if not no_wait:
            wait_for_ssh(c, data, ["worker"])


@task(
    help={
        "yes": "don't ask for confirmation",
        "dry-run": "print what would be deleted, change nothing",
    }
)
@cloud.resumable("destroy")
def destroy(c, yes=False, dry_run=False):
    """Delete everything of the stack, in dependency order (the key pair only if `launch` made it)."""
    ec2 = cloud.client(c)
    where = f"stack {cloud.stack(c)} in {cloud.session(c).region_name}"
    if not (yes or dry_run) and not _confirm(f"Delete every resource of {where}?"):
        raise Exit("destroy: nothing deleted")
    # Each kind only once nothing depends on it any more (AWS refuses otherwise).
    for remove in (_remove_instances, _remove_addresses, _remove_groups, _remove_route_tables,
                   _remove_gateways, _remove_subnets, _remove_vpcs, _remove_key_pair):
        remove(c, ec2, _Deleter(dry_run))
    if not dry_run:
        state.refresh(c, ec2)


class _Deleter:
    """Run (or with --dry-run, only print) one deletion, as a named, resumable step."""

    def __init__(self, dry_run):
        self.dry_run = dry_run

    def __call__(self, what, *calls):
        if self.dry_run:
            say("would delete", what)
            return
        with cloud.step(f"delete {what}", "destroy"):
            for call, params in calls:
                cloud.retry_dependency(call, **params)
        say("deleted", what)


def _remove_instances(c, ec2, delete):
    ids = [i["InstanceId"] for i in cloud.find(c, ec2, "instances")]
    if not ids:
        return
    waiter = ec2.get_waiter("instance_terminated").wait
    delete(f"instances {' '.join(ids)}", (ec2.terminate_instances, {"InstanceIds": ids}), (waiter, {"InstanceIds": ids}))


def _remove_addresses(c, ec2, delete):
    for address in cloud.find(c, ec2, "addresses"):
        calls = [(ec2.release_address, {"AllocationId": address["AllocationId"]})]
        if address.get("AssociationId"):
            calls.insert(0, (ec2.disassociate_address, {"AssociationId": address["AssociationId"]}))
        delete(f"elastic-ip {address['PublicIp']}", *calls)


def _remove_groups(c, ec2, delete):
    groups = cloud.find(c, ec2, "security_groups")
    # Rules naming another group (back-end <- worker) would block that group's deletion.
    for group in groups:
        pointing = [p for p in group["IpPermissions"] if p.get("UserIdGroupPairs")]
        if pointing:
            params = {"GroupId": group["GroupId"], "IpPermissions": pointing}
            delete(f"rules of security-group {group['GroupId']} naming other groups",
                   (ec2.revoke_security_group_ingress, params))
    for group in groups:
        delete(f"security-group {group['GroupId']} ({group['GroupName']})",
               (ec2.delete_security_group, {"GroupId": group["GroupId"]}))


def _remove_route_tables(c, ec2, delete):
    for table in cloud.find(c, ec2, "route_tables"):
        calls = [(ec2.disassociate_route_table, {"AssociationId": a["RouteTableAssociationId"]})
                 for a in table["Associations"] if not a.get("Main")]
        calls.append((ec2.delete_route_table, {"RouteTableId": table["RouteTableId"]}))
        delete(f"route-table {table['RouteTableId']}", *calls)


def _remove_gateways(c, ec2, delete):
    for gateway in cloud.find(c, ec2, "internet_gateways"):
        gateway_id = gateway["InternetGatewayId"]
        calls = [(ec2.detach_internet_gateway, {"InternetGatewayId": gateway_id, "VpcId": a["VpcId"]})
                 for a in gateway.get("Attachments", [])]
        calls.append((ec2.delete_internet_gateway, {"InternetGatewayId": gateway_id}))
        delete(f"internet-gateway {gateway_id}", *calls)


def _remove_subnets(c, ec2, delete):
    for subnet in cloud.find(c, ec2, "subnets"):
        delete(f"subnet {subnet['SubnetId']}", (ec2.delete_subnet, {"SubnetId": subnet["SubnetId"]}))


def _remove_vpcs(c, ec2, delete):
    for vpc in cloud.find(c, ec2, "vpcs"):
        delete(f"vpc {vpc['VpcId']}", (ec2.delete_vpc, {"VpcId": vpc["VpcId"]}))


def _remove_key_pair(c, ec2, delete):
    """Only a key pair `launch` created (tagged with the stack); a user's own key stays."""
    for pair in cloud.find(c, ec2, "key_pairs"):
        delete(f"key-pair {pair['KeyName']}", (ec2.delete_key_pair, {"KeyName": pair["KeyName"]}))
        path = state.key_file(c)
        if not delete.dry_run and pair["KeyName"] == state.key_name(c) and path.is_file():
            path.unlink()  # useless without its key pair, and in the way of a new one
            say("deleted", f"private key {path}")


def _confirm(question):
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def _network(c, ec2, dry_run):
    """The subnet and groups `create-vpc` made; `launch` doesn't make them itself."""
    subnet = cloud.find_one(c, ec2, "subnets")
    groups = {role: cloud.find_one(c, ec2, "security_groups", role) for role in ROLES}
    if subnet and all(groups.values()):
        return {"subnet_id": subnet["SubnetId"], "groups": {r: g["GroupId"] for r, g in groups.items()}}
    if dry_run:
        return None
    raise Exit(f"no network for stack {cloud.stack(c)}: run `fab create-vpc` first")


def resolve_ami(c, ec2):
    """aws.ami if set; else Canonical's SSM parameter; else Canonical's newest matching image."""
    aws = c.config.aws
    if aws.ami:
        try:
            ec2.describe_images(ImageIds=[aws.ami])
        except ClientError as error:
            raise cloud.ConfigError(f"aws.ami={aws.ami!r}: {error}") from error
        say("ami", f"{aws.ami} (aws.ami)")
        return aws.ami
    name = aws.ami_ssm_parameter.format(release=aws.ubuntu_release)
    try:
        image = cloud.client(c, "ssm").get_parameter(Name=name)["Parameter"]["Value"]
        say("ami", f"{image} (ubuntu {aws.ubuntu_release}, from {name})")
        return image
    except ClientError as error:
        # Not published in this region or partition, or not allowed: search instead.
        print(f"ami: {name} unavailable ({error.response['Error']['Code']}), searching Canonical's images")
    pattern = f"ubuntu/images/hvm-ssd*/ubuntu-*-{aws.ubuntu_release}-amd64-server-*"
    with cloud.step(f"looking up the Ubuntu {aws.ubuntu_release} image", "launch"):
        images = ec2.describe_images(
            Owners=[CANONICAL],
            Filters=[
                {"Name": "name", "Values": [pattern]},
                {"Name": "architecture", "Values": ["x86_64"]},
                {"Name": "state", "Values": ["available"]},
            ],
        )["Images"]
    if not images:
        raise cloud.ConfigError(f"no Ubuntu {aws.ubuntu_release} image from Canonical here: set aws.ami")
    newest = max(images, key=lambda image: image["CreationDate"])
    say("ami", f"{newest['ImageId']} ({newest['Name']})")
    return newest["ImageId"]


def _key_pair(c, ec2, dry_run):
    """The key pair's name; created with its private key saved 0600 unless it exists."""
    name, path = state.key_name(c), state.key_file(c)
    exists = ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [name]}])["KeyPairs"]
    if exists:
        if not path.is_file():
            raise cloud.ConfigError(
                f"key pair {name!r} exists in AWS but its private key is not at {path}: "
                "set ssh.key to the .pem file, or another aws.key_name"
            )
        say("exists", f"key-pair {name} ({path})")
        return name
    if path.exists():
        # Never overwrite a private key: it may be the only copy for other machines.
        raise cloud.ConfigError(f"{path} exists but AWS has no key pair {name!r}: move the file away")
    if dry_run:
        say("would create", f"key-pair {name} (saved to {path})")
        return name
    with cloud.step(f"key pair {name}", "launch"):
        material = ec2.create_key_pair(
            KeyName=name,
            KeyType=c.config.aws.key_type,
            TagSpecifications=cloud.tag_spec(c, "key-pair", "key"),
        )["KeyMaterial"]
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Created 0600 from the first byte: ssh refuses keys others can read.
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(material if material.endswith("\n") else material + "\n")
    say("created", f"key-pair {name} (saved to {path})")
    return name


def _instance(c, ec2, role, net, ami, key_name, dry_run):
    wanted = c.config.aws.instance_types[role]
    found = net and cloud.find_one(c, ec2, "instances", role)
    if found:
        instance_id, current = found["InstanceId"], found["State"]["Name"]
        say("exists", f"instance {instance_id} ({role}, {found['InstanceType']}, {current})")
        if found["InstanceType"] != wanted:
            cloud.warn(f"{role} is {found['InstanceType']}, config says {wanted}: not resized")
        if current in ("stopped", "stopping"):
            if dry_run:
                say("would start", f"instance {instance_id} ({role})")
            else:
                with cloud.step(f"starting {role} {instance_id}", "launch"):
                    ec2.get_waiter("instance_stopped").wait(InstanceIds=[instance_id])
                    ec2.start_instances(InstanceIds=[instance_id])
                say("started", f"instance {instance_id} ({role})")
        return instance_id
    if dry_run:
        say("would create", f"instance {role} ({wanted}, {ami})")
        return None
    with cloud.step(f"instance {role}", "launch"):
        instance_id = ec2.run_instances(
            ImageId=ami,
            InstanceType=wanted,
            KeyName=key_name,
            MinCount=1,
            MaxCount=1,
            SubnetId=net["subnet_id"],
            SecurityGroupIds=[net["groups"][role]],
            TagSpecifications=cloud.tag_spec(c, "instance", role, role)
            + cloud.tag_spec(c, "volume", role, role),
        )["Instances"][0]["InstanceId"]
    say("created", f"instance {instance_id} ({role}, {wanted})")
    return instance_id


def _address(c, ec2, role, instance_id, dry_run):
    """The guide's step 6: an Elastic IP per machine, stable across stop/start."""
    found = cloud.find_one(c, ec2, "addresses", role)
    if found:
        allocation = found["AllocationId"]
        say("exists", f"elastic-ip {found['PublicIp']} ({role})")
    elif dry_run:
        say("would create", f"elastic-ip ({role})")
        return
    else:
        with cloud.step(f"elastic ip of {role}", "launch"):
            found = ec2.allocate_address(Domain="vpc", TagSpecifications=cloud.tag_spec(c, "elastic-ip", role, role))
        allocation = found["AllocationId"]
        say("created", f"elastic-ip {found['PublicIp']} ({role})")
    if found.get("InstanceId") == instance_id:
        return
    if dry_run:
        say("would change", f"elastic-ip {found['PublicIp']} associated to {instance_id or role}")
        return
    with cloud.step(f"association of elastic ip {found['PublicIp']} to {role}", "launch"):
        ec2.associate_address(AllocationId=allocation, InstanceId=instance_id, AllowReassociation=True)
    say("changed", f"elastic-ip {found['PublicIp']} associated to {instance_id} ({role})")


def _worker(c, ec2):
    worker = cloud.find_one(c, ec2, "instances", "worker")
    if not worker:
        raise Exit(f"no worker instance in stack {cloud.stack(c)}: run `fab launch` first")
    return worker


def ssh_answers(host, port, timeout):
    """True if something at host:port speaks SSH (sends an `SSH-` banner)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            banner = b""
            while len(banner) < 4:
                chunk = conn.recv(4 - len(banner))
                if not chunk:
                    break
                banner += chunk
            return banner == b"SSH-"
    except OSError:
        return False


def wait_for_ssh(c, data, roles):
    """Wait until each role's public address answers SSH, up to ssh.timeout seconds in all."""
    port, timeout = c.config.ssh.port, c.config.ssh.timeout
    started = time.monotonic()
    for role in roles:
        host = data["instances"][role]["public_ip"]
        print(f"waiting ssh {role} {host}:{port} (up to {timeout}s)", flush=True)
        while True:
            left = timeout - (time.monotonic() - started)
            if ssh_answers(host, port, max(0.1, min(c.config.ssh.connect_timeout, left))):
                break
            if left <= 0:
                raise cloud.StepFailed(f"ssh on {role} {host}:{port}", "launch", f"no SSH banner within {timeout}s")
            print(f"  ... {role} not answering yet ({int(time.monotonic() - started)}s)", flush=True)
            time.sleep(max(0, min(2, left)))
        say("ready", f"ssh {role} {host}:{port}")


def urls(c, data):
    """Where the app, the back-end and Jupyter are reached (Jupyter only through SSH)."""
    ip = {role: data["instances"][role]["public_ip"] for role in ROLES}
    found = {}
    if ip["frontend"]:
        port = c.config.frontend.port
        found["app"] = f"http://{ip['frontend']}/" if port == 80 else f"http://{ip['frontend']}:{port}/"
    if ip["backend"]:
        found["backend"] = f"http://{ip['backend']}:{c.config.backend.port}/"
    if ip["worker"]:
        key, port = data["key_path"] or "<key.pem>", c.config.worker.jupyter_port
        found["jupyter"] = (
            f"http://localhost:{port}/ after "
            f"ssh -i {key} -N -L {port}:localhost:{port} {c.config.ssh.user}@{ip['worker']}"
        )
    return found
