"""Fault tolerance of `create-vpc`, `launch` and `destroy`: the real `fab`, moto, and a proxy between.

* Throttling and transient errors (tests/fixtures/aws_faults.py answers the first
  call of each kind with one, never forwarding it) are retried by botocore: the
  tasks complete with exactly a clean run's resources, and `aws.verbose` shows
  every call and every retry.
* Faults that outlast the retry budget stop the task with the StepFailed message.
* A task SIGKILLed at a request chosen by a seeded RNG, before moto got the
  request or after moto answered it (AWS then did something the client never
  learned), completes when run again, with exactly the resources of a clean run:
  none duplicated, none orphaned, counted account-wide (untagged ones too).

AWS_FAULT_SEEDS=N runs N seeds per task (default 4: even ones kill before a request
reaches moto, odd ones after moto made a change); AWS_FAULT_SWEEP=1 also kills, one
run each, before and after every request that changes something (minutes);
AWS_FAULTS_LOG=<file> appends each test's figures (requests, faults per kind, kills)
to it as JSON lines.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
from collections import Counter

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from tasks import cloud, hosts, instances, network, state
from tasks.config import ROOT
from tests.fixtures.moto import RAISED, aws_cli

SEEDS = int(os.environ.get("AWS_FAULT_SEEDS", "4"))
COMMANDS = {"create-vpc": ["create-vpc"], "launch": ["launch", "--no-wait"], "destroy": ["destroy", "--yes"]}
# "<task>:private": the same with backend.mode private (a private subnet, the NAT gateway and its address).
PRIVATE = ["create-vpc:private", "launch:private", "destroy:private"]
CALL = re.compile(r"^aws: (\S+) (\w+)$", re.M)
RETRY = re.compile(r"^aws: (\S+) (\w+): (.+), retry (\d+)/(\d+)$", re.M)
# What verbose output calls each fault the proxy injects.
SHOWN_AS = {"RequestLimitExceeded": "RequestLimitExceeded", "Unavailable": "Unavailable",
            "ThrottlingException": "ThrottlingException", "bare-503": "HTTP 503 Service Unavailable"}
# Verbose lines name a service by botocore's id, the proxy by its signing name.
SIGNED = {"auto-scaling": "autoscaling", "elastic-load-balancing-v2": "elasticloadbalancing"}
DEFAULT_RETRIES = 10  # cloud.RETRIES: 11 attempts in all

# Account-wide, tagged or not: kind -> (describe call, list key, id key).
KINDS = {
    "vpcs": ("describe_vpcs", "Vpcs", "VpcId"),
    "subnets": ("describe_subnets", "Subnets", "SubnetId"),
    "internet_gateways": ("describe_internet_gateways", "InternetGateways", "InternetGatewayId"),
    "route_tables": ("describe_route_tables", "RouteTables", "RouteTableId"),
    "security_groups": ("describe_security_groups", "SecurityGroups", "GroupId"),
    "addresses": ("describe_addresses", "Addresses", "AllocationId"),
    "key_pairs": ("describe_key_pairs", "KeyPairs", "KeyName"),
    "volumes": ("describe_volumes", "Volumes", "VolumeId"),
    "network_interfaces": ("describe_network_interfaces", "NetworkInterfaces", "NetworkInterfaceId"),
    "nat_gateways": ("describe_nat_gateways", "NatGateways", "NatGatewayId"),
}


@pytest.fixture(autouse=True)
def raised_limits(account_quotas):
    """These tests run several stacks in one account at once: an account with raised limits."""
    account_quotas.values.update(RAISED)



def inventory(ec2):
    """{kind: {id: (its Project tag or None, its Name tag or None)}} of everything in the account."""
    def tags(resource):
        found = {t["Key"]: t["Value"] for t in resource.get("Tags", [])}
        return found.get("Project"), found.get("Name")

    def every(call, key, **params):  # all pages: moto answers 100 reservations at a time
        if ec2.can_paginate(call):
            return [item for page in ec2.get_paginator(call).paginate(**params) for item in page[key]]
        return getattr(ec2, call)(**params)[key]

    instances = [i for r in every("describe_instances", "Reservations") for i in r["Instances"]]
    gone = {i["InstanceId"] for i in instances if i["State"]["Name"] not in cloud.LIVE_STATES}
    # moto also keeps a deleted NAT gateway's network interface; AWS deletes it with the gateway.
    gone_nat = {a.get("NetworkInterfaceId") for n in every("describe_nat_gateways", "NatGateways")
                if n["State"] in ("deleted", "failed") for a in n.get("NatGatewayAddresses", [])}
    found = {}
    for kind, (call, key, id_key) in KINDS.items():
        items = every(call, key)
        if kind == "nat_gateways":
            items = [i for i in items if i["State"] not in ("deleted", "failed")]
        if kind == "network_interfaces":  # moto keeps a terminated instance's primary one; AWS deletes it
            items = [i for i in items if i.get("Attachment", {}).get("InstanceId") not in gone
                     and i["NetworkInterfaceId"] not in gone_nat]
        found[kind] = {i[id_key]: tags(i) for i in items}
    found["instances"] = {i["InstanceId"]: tags(i) for i in instances if i["InstanceId"] not in gone}
    return found


def change(before, after, stack):
    """What a run added and removed, by kind, as counts of (owner, name): the stack's own
    resources as "stack", untagged ones as None; another stack's would show by name."""
    def owner(tags):
        project, name = tags
        if project is None:
            return "untagged"
        if project == stack:
            return f"stack {name.removeprefix(stack)}" if name else "stack"
        return f"other stack {project}"

    found = {}
    for kind in after:
        added = Counter(owner(after[kind][i]) for i in after[kind].keys() - before[kind].keys())
        removed = Counter(owner(before[kind][i]) for i in before[kind].keys() - after[kind].keys())
        if added or removed:
            found[kind] = {"added": dict(added), "removed": dict(removed)}
    return found


def fab_config(c, path, **aws):
    """The Context's settings as a fabric.yaml for `fab -f`: the same stack, mode, state, keys, known_hosts."""
    a, ssh = c.config.aws, c.config.ssh
    settings = {
        "backend": {"mode": c.config.backend.mode},
        "aws": {"stack": a.stack, "region": a.region, "ssh_cidr": a.ssh_cidr, "ip_check_url": a.ip_check_url,
                "ip_check_timeout": a.ip_check_timeout, "state_file": a.state_file, "key_dir": a.key_dir, **aws},
        "ssh": {"known_hosts": ssh.known_hosts, "port": ssh.port, "timeout": ssh.timeout,
                "connect_timeout": ssh.connect_timeout},
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def start_fab(config, task, proxy, **env):
    """`fab -f config <task>` with AWS behind the proxy (the rest of aws_env's settings kept)."""
    settings = {k: v for k, v in os.environ.items() if not k.startswith(("FABRIC_", "AWS_MAX_ATTEMPTS"))}
    settings.update(AWS_ENDPOINT_URL=proxy.url, **env)
    return subprocess.Popen(
        [sys.executable, "-m", "fabric", "-f", str(config), *COMMANDS[task.partition(":")[0]]],
        cwd=ROOT, env=settings, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def run_fab(config, task, proxy, check=True, **env):
    process = start_fab(config, task, proxy, **env)
    out, err = process.communicate(timeout=600)
    if check:
        assert process.returncode == 0, f"fab {task} failed:\n{out}\n{err}"
        assert f"RECAP [{task.partition(':')[0]}] aws:" in out
    return process.returncode, out, err


def context_for(task, aws_context):
    """A fresh stack's Context for "<task>" or "<task>:private"."""
    return aws_context(backend={"mode": "private"}) if task.endswith(":private") else aws_context()


def set_up(task, c):
    """What the task needs to exist first, made in-process straight on moto."""
    task = task.partition(":")[0]
    if task in ("launch", "destroy"):
        network.create_vpc(c)
    if task == "destroy":
        instances.launch(c, no_wait=True)


_REFERENCES = {}


def reference(task, aws_context, ec2, proxy, tmp_path):
    """A clean run of the task through the proxy, once a session: its requests by kind, and what
    it added and removed."""
    if task not in _REFERENCES:
        c = context_for(task, aws_context)
        set_up(task, c)
        before = inventory(ec2)
        proxy.reset()
        _, out, err = run_fab(fab_config(c, tmp_path / "reference.yaml"), task, proxy)
        assert not CALL.search(err)  # aws.verbose is off by default
        _REFERENCES[task] = {
            "requests": proxy.total,
            "sequence": list(proxy.sequence),
            "kinds": dict(proxy.requests),
            "change": change(before, inventory(ec2), c.config.aws.stack),
        }
        assert _REFERENCES[task]["change"], f"a clean {task} changed nothing"
    return _REFERENCES[task]


def record(**figures):
    print(json.dumps(figures, sort_keys=True))
    if os.environ.get("AWS_FAULTS_LOG"):
        with open(os.environ["AWS_FAULTS_LOG"], "a") as log:
            log.write(json.dumps(figures, sort_keys=True) + "\n")


def local_key_matches_aws(c, ec2):
    """The saved private key is 0600 OpenSSH, no temp file beside it, and AWS's pair is its public half."""
    path = state.key_file(c)
    assert path.stat().st_mode & 0o777 == 0o600
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]  # no temp files
    key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    [pair] = ec2.describe_key_pairs(KeyNames=[state.key_name(c)], IncludePublicKey=True)["KeyPairs"]
    assert pair["PublicKey"].split()[:2] == public.decode().split()[:2]
    assert {"Key": "Project", "Value": c.config.aws.stack} in pair["Tags"]


CLI_QUERIES = {
    "vpcs": (["describe-vpcs"], "Vpcs[].VpcId"),
    "subnets": (["describe-subnets"], "Subnets[].SubnetId"),
    "security_groups": (["describe-security-groups"], "SecurityGroups[].GroupId"),
    "addresses": (["describe-addresses"], "Addresses[].AllocationId"),
    "key_pairs": (["describe-key-pairs"], "KeyPairs[].KeyName"),
    "instances": (["describe-instances", "--filters",
                   "Name=instance-state-name,Values=pending,running,stopping,stopped"],
                  "Reservations[].Instances[].InstanceId"),
}


def test_tasks_complete_through_throttling_and_transient_errors(aws_context, ec2, fault_proxy, tmp_path,
                                                                 moto_endpoint):
    """Each task's every kind of call is answered once with RequestLimitExceeded, Unavailable, a bare
    503 or (SSM) ThrottlingException: each still completes, with a clean run's requests plus one per
    kind, a clean run's resources, and each retry shown by aws.verbose (env or fabric.yaml)."""
    references = {task: reference(task, aws_context, ec2, fault_proxy, tmp_path) for task in COMMANDS}
    c = aws_context()
    stack = c.config.aws.stack
    plain = fab_config(c, tmp_path / "plain.yaml")
    verbose = fab_config(c, tmp_path / "verbose.yaml", verbose=True)
    ways = {"create-vpc": (plain, {"FABRIC_AWS_VERBOSE": "1"}), "launch": (verbose, {}),
            "destroy": (plain, {"FABRIC_AWS_VERBOSE": "1"})}
    pristine = inventory(ec2)
    names_used = set()
    for task, (config, env) in ways.items():
        ref = references[task]
        before = inventory(ec2)
        fault_proxy.reset(faults_per_kind=1)

        _, out, err = run_fab(config, task, fault_proxy, **env)

        assert change(before, inventory(ec2), stack) == ref["change"]
        # Every kind was faulted once and asked once more than in the clean run; moto saw a clean run.
        assert fault_proxy.faulted() == dict.fromkeys(ref["kinds"], 1)
        assert dict(fault_proxy.requests) == {kind: n + 1 for kind, n in ref["kinds"].items()}
        assert dict(fault_proxy.forwarded) == ref["kinds"]
        # Verbose: one line per call, one per retry, naming the fault: all the proxy saw.
        # (Service Quotas answers from the account_quotas server, not through the proxy.)
        calls = Counter(f"{SIGNED.get(service, service)}:{op}" for service, op in CALL.findall(err)
                        if service != "service-quotas")
        retries = {f"{SIGNED.get(service, service)}:{op}": (why, int(n), int(of))
                   for service, op, why, n, of in RETRY.findall(err)}
        assert calls == Counter(ref["kinds"])
        assert retries == {kind: (SHOWN_AS[names[0]], 1, DEFAULT_RETRIES)
                           for kind, names in fault_proxy.fault_names.items()}
        assert sum(calls.values()) + len(retries) == fault_proxy.total
        names_used.update(name for names in fault_proxy.fault_names.values() for name in names)
        record(test="faults", task=task, requests=fault_proxy.total, faults=fault_proxy.faulted(),
               fault_names=fault_proxy.fault_names)
    assert names_used == set(SHOWN_AS)  # every kind of fault was injected somewhere
    assert inventory(ec2) == pristine  # nothing of the stack left
    listed = {kind: sorted(ids) for kind, ids in aws_cli(moto_endpoint, CLI_QUERIES).items()}
    assert listed == {kind: sorted(pristine[kind]) for kind in CLI_QUERIES}


def test_faults_outlasting_the_retry_budget_stop_the_task_clearly(aws_context, ec2, fault_proxy, tmp_path):
    """CreateVpc always throttled: botocore gives up after AWS_MAX_ATTEMPTS, and the task stops with
    the StepFailed message naming the resource and the task to re-run; re-run, it completes."""
    c = aws_context()
    config = fab_config(c, tmp_path / "fabric.yaml")
    fault_proxy.reset(faults_per_kind=1000, only={"ec2:CreateVpc"}, cycle=("RequestLimitExceeded",))

    code, out, err = run_fab(config, "create-vpc", fault_proxy, check=False,
                             AWS_MAX_ATTEMPTS="3", FABRIC_AWS_VERBOSE="1")

    assert code == 1
    assert ("step failed: vpc 192.168.0.0/16: An error occurred (RequestLimitExceeded) when calling the "
            "CreateVpc operation (reached max retries: 2): Request limit exceeded.\n"
            "re-run `fab create-vpc`: it finds what exists by tags and creates only the rest") in err
    assert "STOPPED [create-vpc] aws: ok=0 changed=0" in out
    assert (fault_proxy.requests["ec2:CreateVpc"], fault_proxy.forwarded["ec2:CreateVpc"]) == (3, 0)
    assert RETRY.findall(err) == [("ec2", "CreateVpc", "RequestLimitExceeded", "1", "2"),
                                  ("ec2", "CreateVpc", "RequestLimitExceeded", "2", "2")]
    assert "aws: ec2 CreateVpc: RequestLimitExceeded, failed after 3 attempts\n" in err
    assert ec2.describe_vpcs(Filters=cloud.tag_filters(c))["Vpcs"] == []
    record(test="budget", requests=fault_proxy.total, faults=fault_proxy.faulted())

    fault_proxy.reset()
    run_fab(config, "create-vpc", fault_proxy)
    assert len(ec2.describe_vpcs(Filters=cloud.tag_filters(c))["Vpcs"]) == 1


def test_the_retry_budget_is_botocores_own(aws_context, monkeypatch):
    """11 attempts unless $AWS_MAX_ATTEMPTS (botocore's variable, attempts in all) says otherwise."""
    c = aws_context()
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    assert cloud.total_attempts() == DEFAULT_RETRIES + 1
    assert cloud.client(c).meta.config.retries == {"mode": "standard", "total_max_attempts": 11}
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    assert cloud.total_attempts() == 3
    assert cloud.client(c).meta.config.retries == {"mode": "standard", "total_max_attempts": 3}
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "lots")
    with pytest.raises(cloud.ConfigError, match=r"AWS_MAX_ATTEMPTS='lots' is not a number of attempts"):
        cloud.client(c)


def test_verbose_is_off_unless_asked(aws_context, capsys):
    c = aws_context()
    network.create_vpc(c, dry_run=True)
    assert "aws: " not in capsys.readouterr().err
    c = aws_context(aws={"verbose": True})
    network.create_vpc(c, dry_run=True)
    captured = capsys.readouterr()
    assert captured.err.startswith("aws: ec2 DescribeAvailabilityZones\n") and not CALL.search(captured.out)


def kill_and_resume(task, c, proxy, config, at, when, kind=None):
    """`fab <task>` SIGKILLed at the `at`-th request (of `kind`), then run again to the end."""
    proxy.reset()
    proxy.arm_kill(at, when, kind)
    process = start_fab(config, task, proxy)
    proxy.set_victim(process)
    out, err = process.communicate(timeout=600)
    assert process.returncode == -signal.SIGKILL, f"not killed:\n{out}\n{err}"
    killed = proxy.killed
    proxy.reset()
    _, out, _ = run_fab(config, task, proxy)
    return killed, out


def changes_made(sequence):
    """1-based positions of the requests that change something (not Describe.../Get...)."""
    return [n for n, kind in enumerate(sequence, 1) if not kind.split(":")[1].startswith(("Describe", "Get"))]


def killed_run_converges(task, at, when, aws_context, ec2, proxy, tmp_path):
    """Kill `fab <task>` at request `at` (`when`: before forwarding it, or after moto answered it),
    run it again to the end, and check the result against a clean run's. Returns the killed
    request's kind."""
    ref = reference(task, aws_context, ec2, proxy, tmp_path)
    c = context_for(task, aws_context)
    stack = c.config.aws.stack
    pristine = inventory(ec2)
    set_up(task, c)
    before = inventory(ec2)

    killed, out = kill_and_resume(task, c, proxy, fab_config(c, tmp_path / f"{stack}.yaml"), at, when)

    assert killed == (at, ref["sequence"][at - 1], when)
    after = inventory(ec2)
    assert change(before, after, stack) == ref["change"]  # none missing, duplicated or orphaned
    saved = state.load(c)
    task = task.partition(":")[0]
    if task == "create-vpc":
        [vpc] = ec2.describe_vpcs(Filters=cloud.tag_filters(c))["Vpcs"]
        assert saved["vpc_id"] == vpc["VpcId"]
    if task == "launch":
        local_key_matches_aws(c, ec2)
        machines = sorted(i for i, (project, _) in after["instances"].items() if project == stack)
        assert len(machines) == 3 and sorted(saved["instances"][role]["id"] for role in saved["instances"]) == machines
    if task == "destroy":
        assert after == pristine  # nothing of the stack left, nothing else touched
        assert saved["vpc_id"] is None and not hosts.known_hosts_file(c).exists()
        assert not state.key_file(c).exists()
    return killed[1]


@pytest.mark.parametrize(("task", "seed"), [(task, seed) for task in COMMANDS for seed in range(SEEDS)]
                         + [(task, seed) for task in PRIVATE for seed in range(max(2, SEEDS // 2))])
def test_a_killed_task_completes_when_run_again(task, seed, aws_context, ec2, fault_proxy, tmp_path):
    """Even seeds: killed before any request reaches moto; odd seeds: after moto made a change."""
    ref = reference(task, aws_context, ec2, fault_proxy, tmp_path)
    rng = random.Random(f"{task}/{seed}")
    if seed % 2:
        when, at = "after", rng.choice(changes_made(ref["sequence"]))
    else:
        when, at = "before", rng.randint(1, ref["requests"])
    kind = killed_run_converges(task, at, when, aws_context, ec2, fault_proxy, tmp_path)
    record(test="kill", task=task, seed=seed, at=at, of=ref["requests"], when=when, kind=kind)


@pytest.mark.skipif(not os.environ.get("AWS_FAULT_SWEEP"), reason="AWS_FAULT_SWEEP=1: minutes, not for every run")
@pytest.mark.parametrize("task", list(COMMANDS) + PRIVATE)
def test_every_change_killed_before_and_after_aws_made_it(task, aws_context, ec2, fault_proxy, tmp_path):
    """Each request that changes something, killed before moto gets it and after it answered."""
    ref = reference(task, aws_context, ec2, fault_proxy, tmp_path)
    for at in changes_made(ref["sequence"]):
        for when in ("before", "after"):
            kind = killed_run_converges(task, at, when, aws_context, ec2, fault_proxy, tmp_path)
            record(test="sweep", task=task, at=at, of=ref["requests"], when=when, kind=kind)


def test_launch_killed_after_aws_imported_the_key(network_ready_fab, ec2):
    """AWS has the pair, the client never learned it: the key saved before the import is used."""
    c, config, proxy = network_ready_fab
    killed, out = kill_and_resume("launch", c, proxy, config, 1, "after", kind="ec2:ImportKeyPair")
    assert killed[1:] == ("ec2:ImportKeyPair", "after")
    assert f"  ok: key-pair {state.key_name(c)} exists" in out
    local_key_matches_aws(c, ec2)
    assert len(ec2.describe_key_pairs()["KeyPairs"]) == 1


def test_launch_killed_before_aws_got_the_key(network_ready_fab, ec2):
    """The key is saved, AWS never heard of it: the next run imports the saved key."""
    c, config, proxy = network_ready_fab
    killed, out = kill_and_resume("launch", c, proxy, config, 1, "before", kind="ec2:ImportKeyPair")
    assert killed[1:] == ("ec2:ImportKeyPair", "before")
    assert f"  changed: key-pair {state.key_name(c)} imported from {state.key_file(c)}" in out
    local_key_matches_aws(c, ec2)
    assert len(ec2.describe_key_pairs()["KeyPairs"]) == 1


@pytest.fixture
def network_ready_fab(aws_context, fault_proxy, tmp_path):
    c = aws_context()
    network.create_vpc(c)
    return c, fab_config(c, tmp_path / "fabric.yaml"), fault_proxy


@pytest.fixture
def destroy_killed_after_deleting_the_key_pair(aws_context, ec2, fault_proxy, tmp_path):
    c = aws_context()
    pristine = inventory(ec2)
    set_up("destroy", c)
    killed, _ = kill_and_resume("destroy", c, fault_proxy, fab_config(c, tmp_path / "fabric.yaml"), 1, "after",
                                kind="ec2:DeleteKeyPair")
    assert killed[1:] == ("ec2:DeleteKeyPair", "after")
    assert inventory(ec2) == pristine
    return c


def test_destroy_killed_after_deleting_the_key_pair_leaves_no_private_key(destroy_killed_after_deleting_the_key_pair):
    """The re-run finds no pair in AWS and still removes the private key `launch` saved."""
    assert not state.key_file(destroy_killed_after_deleting_the_key_pair).exists()
