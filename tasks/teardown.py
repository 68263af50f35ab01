"""Guide, "Architecture", undone: `destroy` removes everything of a stack, in dependency order.

Found by tags like everything else, so it resumes after a failure and a second
run is a no-op. The key pair goes only if `launch` created it (tagged with the
stack); the stack's SSH known_hosts file goes too.
"""
import functools

from invoke import task
from invoke.exceptions import Exit

from . import cloud, hosts, keypair, state, tier

TASK = "destroy"


@task(
    help={
        "yes": "don't ask for confirmation",
        "dry-run": "print what would be deleted, change nothing",
    }
)
@cloud.resumable(TASK)
def destroy(c, yes=False, dry_run=False):
    """Delete everything of the stack, in dependency order (the key pair only if `launch` made it)."""
    ec2 = cloud.client(c)
    where = cloud.where(c)
    if not (yes or dry_run) and not _confirm(f"Delete every resource of {where}?{tier.confirmation(c)}"):
        raise Exit("destroy: nothing deleted")
    with cloud.AwsRun(c, TASK, dry_run, about=where, ec2=ec2) as aws:
        delete = _Deleter(aws)
        made_key = state.load(c)["key_created"]  # read before anything changes the state file
        # The back-end tier first (tasks/tier.py): its balancer and group hold subnets and groups.
        tier.remove(c, delete)
        # Each kind only once nothing depends on it any more (AWS refuses otherwise).
        for remove in (_remove_instances, _remove_nat_gateways, _remove_addresses, _remove_groups, _remove_route_tables,
                       _remove_gateways, _remove_subnets, _remove_vpcs):
            remove(aws, delete)
        _remove_key_pair(aws, delete, made_key)
        _remove_known_hosts(aws)
        if not dry_run:
            state.refresh(c, ec2)
    return aws.result


class _Deleter:
    """Run (or with --dry-run, only print) one deletion, as a named, resumable step."""

    def __init__(self, aws):
        self.aws = aws  # the task's cloud.AwsRun
        self.dry_run = aws.dry_run

    def __call__(self, what, *calls):
        if self.dry_run:
            self.aws.would(f"delete {what}")
            return
        with self.aws.step(f"delete {what}"):
            for call, params in calls:
                cloud.retry_dependency(call, **params)
        self.aws.changed(f"{what} deleted")


def _remove_instances(aws, delete):
    ids = [i["InstanceId"] for i in aws.find("instances")]
    if not ids:
        return
    waiter = aws.ec2.get_waiter("instance_terminated").wait
    delete(f"instances {' '.join(ids)}", (aws.ec2.terminate_instances, {"InstanceIds": ids}),
           (waiter, {"InstanceIds": ids}))


def _remove_nat_gateways(aws, delete):
    """Before the addresses (a NAT gateway holds one) and the subnet it sits in; one an
    interrupted run left "deleting" is waited for, its address is not free before."""
    for nat in aws.find("nat_gateways", state=[*cloud.NAT_LIVE_STATES, "deleting"]):
        nat_id = nat["NatGatewayId"]
        gone = (aws.ec2.get_waiter("nat_gateway_deleted").wait, {"NatGatewayIds": [nat_id]})
        if nat["State"] == "deleting":
            delete(f"nat-gateway {nat_id} (already deleting)", gone)
        else:
            delete(f"nat-gateway {nat_id}", (aws.ec2.delete_nat_gateway, {"NatGatewayId": nat_id}), gone)


# What AWS answers, for a while, to releasing the address of a NAT gateway just deleted.
NAT_ADDRESS_BUSY = ("InvalidIPAddress.InUse", "AuthFailure")


def _remove_addresses(aws, delete):
    for address in aws.find("addresses"):
        release = (aws.ec2.release_address, {"AllocationId": address["AllocationId"]})
        nat = {"Key": "Role", "Value": "nat"} in address.get("Tags", [])
        if nat:  # freed by its gateway's deletion, not by a disassociation
            release = (functools.partial(cloud.retry, aws.ec2.release_address, NAT_ADDRESS_BUSY, 12, 5), release[1])
        calls = [release]
        if address.get("AssociationId") and not nat:
            calls.insert(0, (aws.ec2.disassociate_address, {"AssociationId": address["AssociationId"]}))
        delete(f"elastic-ip {address['PublicIp']}", *calls)


def _remove_groups(aws, delete):
    groups = aws.find("security_groups")
    # A rule naming another group (the back-end's, naming the front-end's) would block
    # that group's deletion: such rules go first.
    for group in groups:
        pointing = [p for p in group["IpPermissions"] if p.get("UserIdGroupPairs")]
        if pointing:
            params = {"GroupId": group["GroupId"], "IpPermissions": pointing}
            delete(f"rules of security-group {group['GroupId']} naming other groups",
                   (aws.ec2.revoke_security_group_ingress, params))
    for group in groups:
        delete(f"security-group {group['GroupId']} ({group['GroupName']})",
               (aws.ec2.delete_security_group, {"GroupId": group["GroupId"]}))


def _remove_route_tables(aws, delete):
    for table in aws.find("route_tables"):
        calls = [(aws.ec2.disassociate_route_table, {"AssociationId": a["RouteTableAssociationId"]})
                 for a in table["Associations"] if not a.get("Main")]
        calls.append((aws.ec2.delete_route_table, {"RouteTableId": table["RouteTableId"]}))
        delete(f"route-table {table['RouteTableId']}", *calls)


def _remove_gateways(aws, delete):
    for gateway in aws.find("internet_gateways"):
        gateway_id = gateway["InternetGatewayId"]
        calls = [(aws.ec2.detach_internet_gateway, {"InternetGatewayId": gateway_id, "VpcId": a["VpcId"]})
                 for a in gateway.get("Attachments", [])]
        calls.append((aws.ec2.delete_internet_gateway, {"InternetGatewayId": gateway_id}))
        delete(f"internet-gateway {gateway_id}", *calls)


def _remove_subnets(aws, delete):
    for subnet in aws.find("subnets"):
        delete(f"subnet {subnet['SubnetId']}", (aws.ec2.delete_subnet, {"SubnetId": subnet["SubnetId"]}))


def _remove_vpcs(aws, delete):
    for vpc in aws.find("vpcs"):
        delete(f"vpc {vpc['VpcId']}", (aws.ec2.delete_vpc, {"VpcId": vpc["VpcId"]}))


def _remove_key_pair(aws, delete, made_here):
    """Only a key pair `launch` created (tagged with the stack); a user's own key stays.

    `made_here`: the state file (of this stack, in this region) says `launch` made the pair,
    so that a run stopped between deleting the pair and its key still removes the key.
    """
    pairs = aws.find("key_pairs")
    for pair in pairs:
        delete(f"key-pair {pair['KeyName']}", (aws.ec2.delete_key_pair, {"KeyName": pair["KeyName"]}))
    path, name = state.key_file(aws.c), state.key_name(aws.c)
    ours = name in [pair["KeyName"] for pair in pairs] or made_here
    # The private key `launch` saved (ssh.key and aws.key_name unset): useless without its pair,
    # and in the way of a new one. Never another region's or a user's own.
    if aws.c.config.ssh.get("key") or aws.c.config.aws.key_name or not ours or not path.is_file() or aws.dry_run:
        return
    if not keypair.named(aws.ec2, name):
        path.unlink()
        aws.changed(f"private key {path} deleted")


def _remove_known_hosts(aws):
    """The host keys of machines that are gone: new ones at the same Elastic IPs would
    otherwise be refused as changed keys."""
    path = hosts.known_hosts_file(aws.c)
    if not path.is_file():
        return
    if aws.dry_run:
        aws.would(f"delete known_hosts {path}")
    else:
        path.unlink()
        aws.changed(f"known_hosts {path} deleted")


def _confirm(question):
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False
