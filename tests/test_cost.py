"""The stack's estimated cost (tasks/cost.py) in `status`, `status --json`, `stop-worker`, `deploy`.

Expected figures are worked out here from the price table and from what the `aws` CLI
sees on the same moto server, not from the code under test.
"""
import json

import pytest

from tasks import cost, deploy, instances, network
from tasks.cost import PRICES
from tests.fixtures.moto import aws_cli

HOURS = 730
EIP = 0.005
NAT = 0.045
# us-east-1 On-Demand Linux: the default types (aws.instance_types)
M5_XLARGE, T2_MICRO = 0.192, 0.0116


def what_the_cli_sees(moto_endpoint, stack):
    tagged = f"Name=tag:Project,Values={stack}"
    live = "Name=instance-state-name,Values=pending,running,stopping,stopped"
    found = aws_cli(moto_endpoint, {
        "instances": (["describe-instances", "--filters", tagged, live],
                      "Reservations[].Instances[].[InstanceType, State.Name, BlockDeviceMappings[0].Ebs.VolumeId]"),
        "addresses": (["describe-addresses", "--filters", tagged], "Addresses[].AllocationId"),
        "nats": (["describe-nat-gateways", "--filter", tagged, "Name=state,Values=pending,available"],
                 "NatGateways[].NatGatewayId"),
    })
    volumes = [v for _, _, v in found["instances"]]
    found["gb"] = sum(aws_cli(moto_endpoint, {"v": (["describe-volumes", "--volume-ids", *volumes],
                                                    "Volumes[].Size")})["v"]) if volumes else 0
    return found


def expected_hourly(seen):
    compute = sum(PRICES["instance_hourly"][kind] for kind, state, _ in seen["instances"] if state == "running")
    return (compute + seen["gb"] * PRICES["ebs_gb_month"]["gp3"] / HOURS + len(seen["addresses"]) * EIP
            + len(seen["nats"]) * NAT)


def cost_line(out):
    return next(line for line in out.splitlines() if line.startswith("cost    "))


def test_the_price_table_is_dated_and_has_the_types_that_can_be_chosen():
    assert PRICES["region"] == "us-east-1" and PRICES["currency"] == "USD"
    assert PRICES["as_of"][:2] == "20" and PRICES["hours_per_month"] == HOURS
    for name in ("t2.micro", "t3.micro", "t4g.micro", "m5.xlarge", "m6g.xlarge", "m7g.xlarge"):
        assert 0 < PRICES["instance_hourly"][name] < 1, name
    assert (PRICES["instance_hourly"]["m5.xlarge"], PRICES["instance_hourly"]["t2.micro"]) == (M5_XLARGE, T2_MICRO)
    assert (PRICES["public_ipv4_hourly"], PRICES["nat_gateway_hourly"], PRICES["nat_gateway_per_gb"]) == (EIP, NAT, NAT)


@pytest.mark.parametrize("mode", ["proxied", "private"])
def test_status_prints_the_stacks_cost(aws_context, moto_endpoint, capsys, mode):
    c = aws_context(backend={"mode": mode})
    network.create_vpc(c)
    instances.launch(c, no_wait=True)
    capsys.readouterr()
    seen = what_the_cli_sees(moto_endpoint, c.config.aws.stack)
    # proxied: three Elastic IPs; private: the back-end has none, the NAT gateway has one
    assert len(seen["addresses"]) == 3 and len(seen["nats"]) == (mode == "private")
    hourly = expected_hourly(seen)
    fixed = M5_XLARGE + 2 * T2_MICRO + 3 * EIP + (NAT if mode == "private" else 0)
    assert hourly == pytest.approx(fixed + seen["gb"] * 0.08 / HOURS)

    instances.status(c)
    out = capsys.readouterr().out
    assert cost_line(out).startswith(f"cost    ${hourly:.4f}/h, about ${hourly * HOURS:,.2f}/month (us-east-1 On-Demand"
                                     f" prices of {PRICES['as_of']}; eu-west-3's differ; not counted: data transfer")
    assert "  worker   m5.xlarge running: $0.1920/h\n" in out
    assert "  frontend t2.micro running: $0.0116/h\n" in out
    assert "  ipv4     3 public addresses: $0.0150/h\n" in out
    if mode == "private":
        assert "the NAT gateway's processing per GB" in cost_line(out)
        assert ": $0.0450/h + $0.045 per GB processed\n" in out
    else:
        assert "  nat " not in out

    instances.status(c, json=True)
    figures = json.loads(capsys.readouterr().out)["cost"]
    assert figures["hourly"] == pytest.approx(hourly, abs=1e-6)
    assert figures["monthly"] == pytest.approx(hourly * HOURS, abs=0.01)
    assert figures["complete"] is True and figures["currency"] == "USD"
    assert figures["prices"] == {"region": "us-east-1", "as_of": PRICES["as_of"], "file": "tasks/prices.json"}
    kinds = [item["kind"] for item in figures["items"]]
    assert kinds == ["instance"] * 3 + ["volumes", "public_ipv4"] + ["nat_gateway"] * (mode == "private")


def test_a_stopped_worker_bills_only_its_volume(aws_context, moto_endpoint, capsys):
    c = aws_context()
    network.create_vpc(c)
    instances.launch(c, no_wait=True)
    capsys.readouterr()
    instances.stop_worker(c)
    out = capsys.readouterr().out
    assert (f"  stopping the worker saves $0.1920/h, about $140.16/month (m5.xlarge, us-east-1 On-Demand prices of"
            f" {PRICES['as_of']}; eu-west-3's differ); its EBS volume and Elastic IP still bill\n") in out
    instances.stop_worker(c)  # already stopped: still says what being stopped saves
    assert "stopping the worker saves $0.1920/h" in capsys.readouterr().out
    instances.stop_worker(c, dry_run=True)
    assert "stopping the worker would save $0.1920/h" in capsys.readouterr().out

    seen = what_the_cli_sees(moto_endpoint, c.config.aws.stack)
    assert sorted(state for _, state, _ in seen["instances"]) == ["running", "running", "stopped"]
    hourly = expected_hourly(seen)
    assert hourly == pytest.approx(2 * T2_MICRO + 3 * EIP + seen["gb"] * 0.08 / HOURS)
    instances.status(c, json=True)
    figures = json.loads(capsys.readouterr().out)["cost"]
    assert figures["hourly"] == pytest.approx(hourly, abs=1e-6)
    worker = next(i for i in figures["items"] if i.get("role") == "worker")
    assert (worker["state"], worker["hourly"]) == ("stopped", 0.0)
    instances.status(c)
    out = capsys.readouterr().out
    assert cost_line(out).startswith(f"cost    ${hourly:.4f}/h")
    assert "  worker   m5.xlarge stopped: $0.0000/h (compute not billed while stopped)\n" in out


def test_an_unknown_type_says_price_unknown(aws_context, capsys):
    c = aws_context(aws={"instance_types": {"worker": "r5.large", "frontend": "t2.micro", "backend": "t2.micro"}})
    network.create_vpc(c)
    instances.launch(c, no_wait=True)
    capsys.readouterr()
    instances.status(c)
    out = capsys.readouterr().out
    assert "  worker   r5.large running: price unknown\n" in out
    assert cost_line(out).startswith("cost    at least $0.0") and ", + price unknown for worker r5.large (" in out
    instances.status(c, json=True)
    figures = json.loads(capsys.readouterr().out)["cost"]
    assert figures["complete"] is False and figures["unknown"] == ["worker r5.large"]
    worker = next(i for i in figures["items"] if i.get("role") == "worker")
    assert worker["hourly"] is None
    instances.stop_worker(c)
    assert ("stopping the worker saves its r5.large's compute: price unknown (not in tasks/prices.json)"
            in capsys.readouterr().out)


def test_deploy_ends_with_the_cost(aws_context, monkeypatch, capsys):
    """`deploy`'s AWS steps, as they are (the SSH ones have their own tests): its summary prices the stack."""
    c = aws_context()
    steps = deploy.steps
    monkeypatch.setattr(deploy, "steps", lambda *args: [s for s in steps(*args) if s[0] in deploy.AWS_STEPS])
    deploy.deploy(c)
    out = capsys.readouterr().out
    summary = out[out.index("DEPLOYED: "):]
    assert "\ncost    $0.2" in summary and "/month (us-east-1 On-Demand prices of" in summary
    assert "  worker   m5.xlarge running: $0.1920/h" in summary


def test_no_estimate_is_an_error():
    assert cost.lines({"error": "ClientError: not authorized"}) == ["cost    unknown (ClientError: not authorized)"]


def test_breakdown_counts_each_state_and_kind():
    def machine(role, kind, state):
        return {"InstanceId": f"i-{role}", "InstanceType": kind, "State": {"Name": state},
                "Tags": [{"Key": "Role", "Value": role}]}

    figures = cost.breakdown(
        [machine("worker", "m7g.xlarge", "stopping"), machine("frontend", "t4g.micro", "pending"),
         machine("backend", "t3.micro", "running")],
        [{"VolumeId": "vol-1", "Size": 8, "VolumeType": "gp3"}, {"VolumeId": "vol-2", "Size": 10, "VolumeType": "io2"}],
        [{}, {}], [], "us-east-1")
    assert figures["hourly"] == pytest.approx(0.0084 + 0.0104 + 8 * 0.08 / HOURS + 2 * EIP, abs=1e-6)
    assert figures["unknown"] == ["volume vol-2 (io2)"] and figures["complete"] is False
    assert cost.lines(figures)[0].startswith("cost    at least $0.0297/h, about $21.66/month, + price unknown for"
                                             " volume vol-2 (io2) (us-east-1 On-Demand prices of")
    assert "'s differ" not in cost.lines(figures)[0]  # the stack is where the prices are from
