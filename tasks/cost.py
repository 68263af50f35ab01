"""What the stack costs, by the hour and by the month: an estimate `status`, `deploy` and
`stop-worker` print.

From the dated price table beside this file (tasks/prices.json: us-east-1, On-Demand,
Linux), applied to what AWS has now: each instance by its type and state (a stopped one
bills only its EBS volume), every public IPv4 address (Elastic IPs, the NAT gateway's
too, associated or not), each NAT gateway by the hour. Not counted: data transfer and the
NAT gateway's per-GB processing (named in the output), taxes, discounts. A type missing
from the table is "price unknown", never guessed; other regions' prices differ, and the
output says which region the prices are from.
"""
import json
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from invoke.exceptions import Exit

from . import cloud
from .config import ROLES

PRICE_FILE = Path(__file__).with_name("prices.json")
PRICES = json.loads(PRICE_FILE.read_text())
COMPUTE_STATES = ("pending", "running")  # billed for compute; "stopping" and "stopped" are not


def estimate(c, ec2=None):
    """The stack's estimated cost as AWS has it now: `status --json`'s "cost"."""
    ec2 = ec2 or cloud.client(c)
    machines = cloud.find(c, ec2, "instances")
    volume_ids = [m["Ebs"]["VolumeId"] for i in machines for m in i.get("BlockDeviceMappings", []) if "Ebs" in m]
    volumes = ec2.describe_volumes(VolumeIds=volume_ids)["Volumes"] if volume_ids else []
    addresses = cloud.find(c, ec2, "addresses")
    nats = cloud.find(c, ec2, "nat_gateways", state=cloud.NAT_LIVE_STATES)
    return breakdown(machines, volumes, addresses, nats, cloud.session(c).region_name)


def _role(resource):
    return next((t["Value"] for t in resource.get("Tags", []) if t["Key"] == "Role"), "?")


def breakdown(machines, volumes, addresses, nats, region, prices=PRICES):
    """The figures from AWS's descriptions: items, hourly and monthly sums, and what is unknown."""
    items, unknown = [], []
    for machine in sorted(machines, key=lambda m: (ROLES + (_role(m),)).index(_role(m))):  # the guide's order
        name, state = machine["InstanceType"], machine["State"]["Name"]
        hourly = instance_price(name, prices) if state in COMPUTE_STATES else 0.0
        if hourly is None:
            unknown.append(f"{_role(machine)} {name}")
        items.append({"kind": "instance", "role": _role(machine), "id": machine["InstanceId"], "type": name,
                      "state": state, "hourly": hourly})
    if volumes:
        hourly, gigabytes = 0.0, 0
        for volume in volumes:
            per_gb = prices["ebs_gb_month"].get(volume.get("VolumeType"))
            gigabytes += volume["Size"]
            if per_gb is None:
                unknown.append(f"volume {volume['VolumeId']} ({volume.get('VolumeType')})")
            else:
                hourly += volume["Size"] * per_gb / prices["hours_per_month"]
        items.append({"kind": "volumes", "count": len(volumes), "gb": gigabytes, "hourly": hourly})
    if addresses:
        items.append({"kind": "public_ipv4", "count": len(addresses),
                      "hourly": len(addresses) * prices["public_ipv4_hourly"]})
    for nat in nats:
        items.append({"kind": "nat_gateway", "id": nat["NatGatewayId"], "hourly": prices["nat_gateway_hourly"],
                      "per_gb": prices["nat_gateway_per_gb"]})
    hourly = sum(item["hourly"] or 0.0 for item in items)
    return {
        "hourly": round(hourly, 6),
        "monthly": round(hourly * prices["hours_per_month"], 2),
        "currency": prices["currency"],
        "complete": not unknown,
        "unknown": unknown,
        "items": [dict(item, hourly=None if item["hourly"] is None else round(item["hourly"], 6)) for item in items],
        "region": region,
        "prices": {"region": prices["region"], "as_of": prices["as_of"], "file": "tasks/prices.json"},
        "not_counted": "data transfer" + (", the NAT gateway's processing per GB" if nats else ""),
    }


def instance_price(name, prices=PRICES):
    """The type's On-Demand hourly price, or None when the table has none."""
    return prices["instance_hourly"].get(name)


def basis(region, prices=PRICES):
    """Whose prices: "us-east-1 On-Demand prices of 2026-06", and a word when the stack is elsewhere."""
    text = f"{prices['region']} On-Demand prices of {prices['as_of']}"
    return text if region == prices["region"] else f"{text}; {region}'s differ"


def money(value, digits=4):
    return f"${value:,.{digits}f}"


def lines(figures):
    """`status`'s lines: the sum first, then one line per item."""
    if "error" in figures:
        return [f"cost    unknown ({figures['error']})"]
    prices_from = basis(figures["region"])
    total = f"{money(figures['hourly'])}/h, about {money(figures['monthly'], 2)}/month"
    if not figures["complete"]:
        total = f"at least {total}, + price unknown for {', '.join(figures['unknown'])}"
    found = [f"cost    {total} ({prices_from}; not counted: {figures['not_counted']})"]
    for item in figures["items"]:
        price = "price unknown" if item["hourly"] is None else f"{money(item['hourly'])}/h"
        if item["kind"] == "instance":
            why = "" if item["state"] in COMPUTE_STATES else " (compute not billed while stopped)"
            found.append(f"  {item['role']:<8} {item['type']} {item['state']}: {price}{why}")
        elif item["kind"] == "volumes":
            found.append(f"  ebs      {item['count']} volume{'s' * (item['count'] != 1)}, {item['gb']} GB: {price}")
        elif item["kind"] == "public_ipv4":
            found.append(f"  ipv4     {item['count']} public address{'es' * (item['count'] != 1)}: {price}")
        else:
            found.append(f"  nat      {item['id']}: {price} + {money(item['per_gb'], 3)} per GB processed")
    return found


def figures(c, ec2=None):
    """`estimate`, or {"error": why} when there is none: a cost estimate never fails a task."""
    try:
        return estimate(c, ec2)
    except (ClientError, BotoCoreError, Exit) as error:  # e.g. no ec2:DescribeVolumes: the task goes on
        return {"error": f"{type(error).__name__}: {error}"}


def stop_saving(c, instance_type, dry_run=False):
    """What stopping the worker saves: its compute, by the hour and the month."""
    hourly = instance_price(instance_type)
    verb = "would save" if dry_run else "saves"
    if hourly is None:
        return f"stopping the worker {verb} its {instance_type}'s compute: price unknown (not in tasks/prices.json)"
    monthly = hourly * PRICES["hours_per_month"]
    return (f"stopping the worker {verb} {money(hourly)}/h, about {money(monthly, 2)}/month ({instance_type},"
            f" {basis(cloud.session(c).region_name)}); its EBS volume and Elastic IP still bill")
