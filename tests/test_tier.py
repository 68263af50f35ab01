"""The back-end tier (tasks/tier.py) on the moto server: bucket, role, balancer, targets, template,
Auto Scaling group; `scale` up and down, a second run a no-op, bad counts and limits refused
before anything is made, `status`, and `destroy` leaving nothing (checked with the `aws` CLI)."""
import base64
import hashlib
import json
import os
import random
import signal
import subprocess
import sys

import boto3
import pytest
from botocore.exceptions import ClientError

from tasks import cloud, errors, frontend, instances, network, teardown, tier
from tasks.config import ROOT
from tasks.report import Tally
from tests.fixtures.moto import RAISED, REGION


@pytest.fixture
def aws(aws_env):
    """The tests' own clients (never the session of the code under test)."""
    return {name: boto3.client(service, region_name=REGION) for name, service in (
        ("ec2", "ec2"), ("elb", "elbv2"), ("asg", "autoscaling"), ("iam", "iam"), ("s3", "s3"))}


@pytest.fixture
def stack(aws_context, account_quotas):
    """Factory: a Context whose network exists (`create-vpc`), in an account with raised limits."""
    account_quotas.values.update(RAISED)

    def build(**sections):
        c = aws_context(**sections)
        network.create_vpc(c)
        return c

    return build


def group_of(aws, c):
    return aws["asg"].describe_auto_scaling_groups(AutoScalingGroupNames=[tier.names(c)["group"]])[
        "AutoScalingGroups"][0]


def health(aws, c):
    [group] = aws["elb"].describe_target_groups(Names=[tier.names(c)["targets"]])["TargetGroups"]
    found = aws["elb"].describe_target_health(TargetGroupArn=group["TargetGroupArn"])["TargetHealthDescriptions"]
    return {item["Target"]["Id"]: item["TargetHealth"]["State"] for item in found}


def test_scale_builds_the_tier_and_a_second_run_changes_nothing(stack, aws, capsys):
    c = stack()
    first = tier.scale(c, backends=2)
    assert first["changed"] >= 10
    n = tier.names(c)
    bucket = tier.bucket_name(c)

    # The bucket: versioned, private, encrypted, the app a back-end installs in app/.
    assert aws["s3"].get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    block = aws["s3"].get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert all(block.values()) and len(block) == 4
    keys = {o["Key"] for o in aws["s3"].list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == set(tier.APP_OBJECTS)

    # The role: assumed by EC2 only, may read the bucket's objects and nothing else.
    role = aws["iam"].get_role(RoleName=n["role"])["Role"]
    assert role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
    [policy] = aws["iam"].list_role_policies(RoleName=n["role"])["PolicyNames"]
    document = aws["iam"].get_role_policy(RoleName=n["role"], PolicyName=policy)["PolicyDocument"]
    assert document["Statement"] == [{"Sid": "ReadTheModels", "Effect": "Allow", "Action": ["s3:GetObject"],
                                      "Resource": [f"arn:aws:s3:::{bucket}/*"]},
                                     {"Sid": "TellMissingFromDenied", "Effect": "Allow", "Action": ["s3:ListBucket"],
                                      "Resource": [f"arn:aws:s3:::{bucket}"]}]
    assert not aws["iam"].list_attached_role_policies(RoleName=n["role"])["AttachedPolicies"]
    profile = aws["iam"].get_instance_profile(InstanceProfileName=n["role"])["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == [n["role"]]

    # The balancer: internal (proxied mode), in two zones, its listener forwarding to the targets.
    [balancer] = aws["elb"].describe_load_balancers(Names=[n["balancer"]])["LoadBalancers"]
    assert balancer["Scheme"] == "internal" and balancer["Type"] == "application"
    assert len({z["ZoneName"] for z in balancer["AvailabilityZones"]}) == 2
    [target_group] = aws["elb"].describe_target_groups(Names=[n["targets"]])["TargetGroups"]
    assert (target_group["HealthCheckPath"], target_group["Port"], target_group["Matcher"]) == (
        "/health", 5000, {"HttpCode": "200"})
    attributes = {a["Key"]: a["Value"] for a in aws["elb"].describe_target_group_attributes(
        TargetGroupArn=target_group["TargetGroupArn"])["Attributes"]}
    assert attributes["deregistration_delay.timeout_seconds"] == "30"
    [listener] = aws["elb"].describe_listeners(LoadBalancerArn=balancer["LoadBalancerArn"])["Listeners"]
    assert listener["Port"] == 80 and listener["DefaultActions"][0]["TargetGroupArn"] == target_group[
        "TargetGroupArn"]

    # Groups: the balancer takes 80 from the front-end only; the back-ends take 5000 from the balancer.
    ec2 = aws["ec2"]
    tagged = [{"Name": "tag:Project", "Values": [c.config.aws.stack]}]
    groups = {next(t["Value"] for t in g["Tags"] if t["Key"] == "Role"): g
              for g in ec2.describe_security_groups(Filters=tagged)["SecurityGroups"]}
    [rule] = groups["balancer"]["IpPermissions"]
    assert (rule["FromPort"], rule["IpRanges"], [p["GroupId"] for p in rule["UserIdGroupPairs"]]) == (
        80, [], [groups["frontend"]["GroupId"]])
    assert any(p["FromPort"] == 5000 and groups["balancer"]["GroupId"] in [g["GroupId"] for g in
               p["UserIdGroupPairs"]] for p in groups["backend"]["IpPermissions"])

    # The launch template: the back-end's image and type, IMDSv2, encrypted gp3, profile, user-data.
    [version] = ec2.describe_launch_template_versions(LaunchTemplateName=n["template"])["LaunchTemplateVersions"]
    data = version["LaunchTemplateData"]
    assert data["InstanceType"] == "t2.micro" and data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["ImageId"].startswith("ami-") and data["IamInstanceProfile"] == {"Name": n["role"]}
    [root] = data["BlockDeviceMappings"]
    assert root["Ebs"]["VolumeType"] == "gp3" and root["Ebs"]["Encrypted"] is True
    assert data["NetworkInterfaces"][0]["Groups"] == [groups["backend"]["GroupId"]]
    script = base64.b64decode(data["UserData"]).decode()
    assert script.startswith("#!/bin/bash") and f"BUCKET={bucket}" in script and "@" not in script.replace(
        "@system-service", "").replace("@privileged", "").replace("@resources", "")
    assert "ProtectSystem=strict" in script and "systemctl enable --now digits-backend" in script

    # The group: min = desired = max = 2, replaced on the balancer's health check, registered.
    group = group_of(aws, c)
    assert (group["MinSize"], group["DesiredCapacity"], group["MaxSize"]) == (2, 2, 2)
    # EC2's health check until a model exists (no back-end can pass /health before), then ELB's.
    assert group["HealthCheckType"] == "EC2" and group["TargetGroupARNs"] == [target_group["TargetGroupArn"]]
    assert len(group["Instances"]) == 2 and set(health(aws, c)) == {i["InstanceId"] for i in group["Instances"]}
    assert not aws["asg"].describe_policies(AutoScalingGroupName=n["group"])["ScalingPolicies"]

    capsys.readouterr()
    again = tier.scale(c, backends=2)
    assert again["changed"] == 0, capsys.readouterr().out
    assert len(aws["elb"].describe_load_balancers()["LoadBalancers"]) == 1
    assert len(ec2.describe_launch_template_versions(LaunchTemplateName=n["template"])["LaunchTemplateVersions"]) == 1


def test_scale_up_down_and_heal_and_status(stack, aws, capsys):
    c = stack()
    tier.scale(c, backends=2)
    assert tier.scale(c, backends=3)["changed"] == 1
    assert len(group_of(aws, c)["Instances"]) == 3 and len(health(aws, c)) == 3
    # A back-end dies: the group launches another from the template (moto 5.2 does not register
    # the replacement into the target group, as AWS does; the machines tier sees that part).
    victim = group_of(aws, c)["Instances"][0]["InstanceId"]
    aws["ec2"].terminate_instances(InstanceIds=[victim])
    now = {i["InstanceId"] for i in group_of(aws, c)["Instances"]}
    assert len(now) == 3 and victim not in now and victim not in health(aws, c)
    capsys.readouterr()
    assert tier.scale(c, backends=2)["changed"] == 1
    group = group_of(aws, c)
    assert (group["MinSize"], group["DesiredCapacity"], group["MaxSize"]) == (2, 2, 2)
    kept = {i["InstanceId"] for i in group["Instances"]}
    assert len(kept) == 2

    capsys.readouterr()
    instances.status(c)
    out = capsys.readouterr().out
    assert f"2 back-ends (max 2) behind internal ALB {tier.names(c)['balancer']}" in out
    for instance_id in kept:
        assert f"  {instance_id} {REGION}" in out and "target healthy" in out
    assert "the ALB adds about $0.0225/h ($16.43/month" in out
    instances.status(c, json=True)
    shown = json.loads(capsys.readouterr().out)["tier"]
    assert {b["id"] for b in shown["backends"]} == kept and shown["desired"] == 2
    # Each back-end's model is what its /health says over SSH: moto's instances have no sshd.
    assert all(b["model"].startswith("? (no SSH") for b in shown["backends"]), shown["backends"]
    # The front-end's apache forwards /predict/ and /health to the internal balancer.
    [balancer] = aws["elb"].describe_load_balancers(Names=[tier.names(c)["balancer"]])["LoadBalancers"]
    assert frontend.proxy_target(c) == f"{balancer['DNSName']}:80" == f"{shown['balancer']}:80"


def test_max_adds_a_target_tracking_policy_and_unsetting_it_removes_it(stack, aws):
    c = stack(backend={"max": 4})
    tier.scale(c, backends=2)
    group = group_of(aws, c)
    assert (group["MinSize"], group["DesiredCapacity"], group["MaxSize"]) == (2, 2, 4)
    [policy] = aws["asg"].describe_policies(AutoScalingGroupName=group["AutoScalingGroupName"])["ScalingPolicies"]
    assert policy["PolicyType"] == "TargetTrackingScaling"
    assert policy["TargetTrackingConfiguration"]["TargetValue"] == 60.0
    c.config.backend.max = None
    assert tier.scale(c, backends=2)["changed"] == 2  # sizes, policy
    assert not aws["asg"].describe_policies(AutoScalingGroupName=group["AutoScalingGroupName"])["ScalingPolicies"]


def test_public_mode_balancer_faces_the_internet(stack, aws):
    c = stack(backend={"mode": "public"})
    tier.scale(c, backends=2)
    [balancer] = aws["elb"].describe_load_balancers(Names=[tier.names(c)["balancer"]])["LoadBalancers"]
    assert balancer["Scheme"] == "internet-facing"
    [group] = aws["ec2"].describe_security_groups(GroupIds=balancer["SecurityGroups"])["SecurityGroups"]
    assert group["IpPermissions"][0]["IpRanges"] == [{"CidrIp": "0.0.0.0/0"}]
    # The page calls the balancer, not one back-end of the group (config.js and the CSP follow this).
    assert frontend.default_backend_url(c) == f"http://{balancer['DNSName']}"


def nothing_made(aws):
    return (not aws["elb"].describe_load_balancers()["LoadBalancers"]
            and not aws["asg"].describe_auto_scaling_groups()["AutoScalingGroups"]
            and not aws["s3"].list_buckets()["Buckets"] and not aws["iam"].list_roles()["Roles"])


@pytest.mark.parametrize("count", [0, -1, "two", "1.5"])
def test_a_bad_count_is_refused_before_anything_is_made(stack, aws, count):
    c = stack()
    with pytest.raises(errors.ConfigError, match=r"--backends=.*whole number, 1 or more"):
        tier.scale(c, backends=count)
    assert nothing_made(aws)


@pytest.mark.parametrize(("section", "value", "said"), [
    ("backend", {"max": 1}, "backend.max=1: a whole number no smaller than the back-ends' count 2"),
    ("aws", {"second_subnet_cidr": "192.168.0.128/25"}, "overlaps aws.subnet_cidr"),
    ("aws", {"second_subnet_cidr": "10.0.0.0/24"}, "inside aws.vpc_cidr"),
])
def test_bad_settings_are_refused_before_anything_is_made(stack, aws, section, value, said):
    c = stack()
    c.config[section].update(value)
    with pytest.raises(errors.ConfigError, match=said):
        tier.scale(c, backends=2)
    assert nothing_made(aws)


def test_a_count_over_the_accounts_vcpus_is_refused_before_anything_is_made(stack, aws, account_quotas):
    c = stack()
    account_quotas.values["L-1216C47A"] = 4  # t2.micro: 1 vCPU each
    with pytest.raises(errors.QuotaExceeded) as refused:
        tier.scale(c, backends=5)
    message = refused.value.message
    assert "Running On-Demand Standard instances (vCPUs): need 5" in message and "L-1216C47A" in message
    assert "nothing was created" in message
    assert nothing_made(aws)
    assert tier.scale(c, backends=4)["changed"] > 0  # within the limit: made


def test_count_one_is_the_single_backend(stack, aws, capsys):
    c = stack()
    assert tier.scale(c)["changed"] == 0
    assert "1 back-end (backend.count 1)" in capsys.readouterr().out
    assert nothing_made(aws)


def aws_cli(endpoint, queries):
    """{name: answer} of each `aws <args>`, run side by side (a CLI start costs a second or two):
    a check independent of boto3 calls here."""
    running = {name: subprocess.Popen(["aws", "--endpoint-url", endpoint, "--region", REGION, "--output", "json",
                                       *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, args in queries.items()}
    found = {}
    for name, process in running.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        found[name] = json.loads(out or "null")
    return found


def test_a_users_own_bucket_is_used_as_it_is_and_never_deleted(stack, aws, monkeypatch):
    """backend.bucket naming a bucket this stack did not make: used, not retagged or reconfigured,
    not named in destroy's question, and left with its objects by destroy."""
    mine = "someone-elses-models"
    where = {"CreateBucketConfiguration": {"LocationConstraint": aws["s3"].meta.region_name}}
    aws["s3"].create_bucket(Bucket=mine, **where)
    aws["s3"].put_bucket_versioning(Bucket=mine, VersioningConfiguration={"Status": "Enabled"})
    aws["s3"].put_object(Bucket=mine, Key="keep/me.txt", Body=b"theirs")
    c = stack(backend={"bucket": mine})
    tier.scale(c, backends=1)
    with pytest.raises(ClientError):  # no tags were put on it
        aws["s3"].get_bucket_tagging(Bucket=mine)
    questions = []
    monkeypatch.setattr("builtins.input", lambda question: questions.append(question) or "y")
    teardown.destroy(c)
    assert questions and mine not in questions[0]
    assert aws["s3"].get_object(Bucket=mine, Key="keep/me.txt")["Body"].read() == b"theirs"


def test_destroy_removes_the_tier_and_asks_naming_the_bucket(stack, aws, moto_endpoint, monkeypatch):
    c = stack()  # (the single machines' part of destroy: tests/test_destroy.py)
    tier.scale(c, backends=2)
    bucket = tier.bucket_name(c)
    aws["s3"].put_object(Bucket=bucket, Key="models/abc.tflite", Body=b"1")
    aws["s3"].put_object(Bucket=bucket, Key="models/abc.tflite", Body=b"2")  # a second version
    questions = []
    monkeypatch.setattr("builtins.input", lambda question: questions.append(question) or "n")
    with pytest.raises(teardown.Exit):
        teardown.destroy(c)
    assert f"This deletes bucket {bucket} and its 2 model version(s)." in questions[0]
    assert group_of(aws, c)  # nothing deleted on "n"

    teardown.destroy(c, yes=True)
    # The `aws` CLI (4 processes side by side: each start costs seconds on a loaded machine)...
    left = aws_cli(moto_endpoint, {
        "balancers": ["elbv2", "describe-load-balancers", "--query", "LoadBalancers[].LoadBalancerName"],
        "groups": ["autoscaling", "describe-auto-scaling-groups", "--query",
                   "AutoScalingGroups[].AutoScalingGroupName"],
        "roles": ["iam", "list-roles", "--query", "Roles[].RoleName"],
        "buckets": ["s3api", "list-buckets", "--query", "Buckets[].Name"],
    })
    # ... and the tests' own clients for the rest.
    tagged = [{"Name": "tag:Project", "Values": [c.config.aws.stack]}]
    live = [{"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}]
    ec2 = aws["ec2"]
    left.update({
        "target groups": aws["elb"].describe_target_groups()["TargetGroups"],
        "templates": ec2.describe_launch_templates()["LaunchTemplates"],
        "profiles": aws["iam"].list_instance_profiles()["InstanceProfiles"],
        "instances": ec2.describe_instances(Filters=live)["Reservations"],
        "subnets": ec2.describe_subnets(Filters=tagged)["Subnets"],
        "security groups": ec2.describe_security_groups(Filters=tagged)["SecurityGroups"],
        "vpcs": ec2.describe_vpcs(Filters=tagged)["Vpcs"],
    })
    assert left == dict.fromkeys(left, [])
    assert teardown.destroy(c, yes=True)["changed"] == 0


# --- Faults: `fab scale` through the fault proxy (tests/fixtures/aws_faults.py) ----------------


def tier_inventory(aws):
    """Account-wide counts of everything `scale` makes (tagged or not: an orphan counts too)."""
    ec2 = aws["ec2"]
    return {
        "balancers": len(aws["elb"].describe_load_balancers()["LoadBalancers"]),
        "listeners": sum(len(aws["elb"].describe_listeners(LoadBalancerArn=b["LoadBalancerArn"])["Listeners"])
                         for b in aws["elb"].describe_load_balancers()["LoadBalancers"]),
        "target_groups": len(aws["elb"].describe_target_groups()["TargetGroups"]),
        "groups": [(g["DesiredCapacity"], len(g["Instances"]))
                   for g in aws["asg"].describe_auto_scaling_groups()["AutoScalingGroups"]],
        "templates": len(ec2.describe_launch_templates()["LaunchTemplates"]),
        "roles": len(aws["iam"].list_roles()["Roles"]),
        "profiles": [len(p["Roles"]) for p in aws["iam"].list_instance_profiles()["InstanceProfiles"]],
        "buckets": len(aws["s3"].list_buckets()["Buckets"]),
        "subnets": len(ec2.describe_subnets()["Subnets"]),
        "security_groups": len(ec2.describe_security_groups()["SecurityGroups"]),
        "rules": sorted(len(g["IpPermissions"]) for g in ec2.describe_security_groups()["SecurityGroups"]),
    }


def fab_scale(c, proxy, tmp_path, **env):
    """`fab scale --backends 2 --no-wait` as a user runs it, with AWS behind the proxy."""
    from tests.test_aws_faults import fab_config

    config = fab_config(c, tmp_path / f"{c.config.aws.stack}.yaml")
    settings = {k: v for k, v in os.environ.items() if not k.startswith(("FABRIC_", "AWS_MAX_ATTEMPTS"))}
    settings.update(AWS_ENDPOINT_URL=proxy.url, **env)
    return subprocess.Popen([sys.executable, "-m", "fabric", "-f", str(config), "scale", "--backends", "2",
                             "--no-wait"], cwd=ROOT, env=settings, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_scale_converges_through_throttling_and_a_kill(stack, aws, fault_proxy, tmp_path):
    """Every kind of call faulted once (botocore retries): a complete tier. Then, on a new stack, a
    run SIGKILLed right after moto made a change of a kind chosen by a seeded RNG, and run again:
    exactly the first run's resources, none duplicated or orphaned (counted account-wide)."""
    empty = tier_inventory(aws)
    throttled = stack()
    fault_proxy.reset(faults_per_kind=1)
    done = fab_scale(throttled, fault_proxy, tmp_path)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, out + err
    faulted = fault_proxy.faulted()
    assert {"elasticloadbalancing:CreateLoadBalancer", "autoscaling:CreateAutoScalingGroup", "s3:CreateBucket",
            "iam:CreateRole", "ec2:CreateLaunchTemplate"} <= set(faulted) and set(faulted.values()) == {1}
    clean = tier_inventory(aws)
    assert clean["groups"] == [(2, 2)] and clean["balancers"] == clean["listeners"] == 1
    teardown.destroy(throttled, yes=True)
    assert tier_inventory(aws) == empty

    killed = stack()
    changes = sorted(kind for kind in faulted if not kind.split(":")[1].startswith(("Describe", "Get", "List", "Head")))
    kind = random.Random("scale/1").choice(changes)
    fault_proxy.reset()
    fault_proxy.arm_kill(1, "after", kind)
    process = fab_scale(killed, fault_proxy, tmp_path)
    fault_proxy.set_victim(process)
    process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL and fault_proxy.killed[1:] == (kind, "after")
    fault_proxy.reset()
    done = fab_scale(killed, fault_proxy, tmp_path)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, out + err
    assert tier_inventory(aws) == clean, f"killed after {kind}"


# --- push-model across the tier ------------------------------------------------------------------


class Backends:
    """`on_backend` for tier.push_model: what each back-end is asked to serve, and whether it was out
    of the balancer then (the real one swaps over SSH; these are moto's instances)."""

    def __init__(self, c, aws, bad=()):
        self.c, self.aws, self.bad, self.calls = c, aws, set(bad), []

    def __call__(self, c, instance, digest):
        self.calls.append((instance["id"], digest[:12], sorted(health(self.aws, self.c))))
        return digest not in self.bad


def test_push_model_rolls_one_backend_at_a_time_and_stops_at_the_first_failure(stack, aws, tmp_path):
    c = stack()
    tier.scale(c, backends=3)
    ids = sorted(health(aws, c))
    bucket = tier.bucket_name(c)
    good, bad = b"good model", b"bad model"
    good_sha, bad_sha = (hashlib.sha256(m).hexdigest() for m in (good, bad))

    first = Backends(c, aws)
    tier.push_model(c, good, good_sha, on_backend=first)
    # Each back-end was swapped while out of the balancer, the other two in it.
    assert [(i, d) for i, d, _ in first.calls] == [(i, good_sha[:12]) for i in ids]
    for instance_id, _, registered_then in first.calls:
        assert registered_then == [i for i in ids if i != instance_id]
    assert sorted(health(aws, c)) == ids
    assert aws["s3"].get_object(Bucket=bucket, Key="current")["Body"].read().decode() == good_sha
    assert aws["s3"].get_object(Bucket=bucket, Key=f"models/{good_sha}.tflite")["Body"].read() == good
    assert group_of(aws, c)["HealthCheckType"] == "ELB"  # a model is served: a failing back-end is replaced

    again = Backends(c, aws)
    assert tier.push_model(c, good, good_sha, on_backend=again)["changed"] == 6  # 3 out, 3 in; no upload

    broken = Backends(c, aws, bad={bad_sha})
    with pytest.raises(errors.StepFailed) as failed:
        tier.push_model(c, bad, bad_sha, on_backend=broken)
    message = failed.value.message
    assert f"back-end {ids[0]}" in message and "the roll stopped there" in message and good_sha[:12] in message
    # The first back-end tried it and went back; the others never saw it; all serve again.
    assert [(i, d) for i, d, _ in broken.calls] == [(ids[0], bad_sha[:12]), (ids[0], good_sha[:12])]
    assert sorted(health(aws, c)) == ids
    assert aws["s3"].get_object(Bucket=bucket, Key="current")["Body"].read().decode() == good_sha
    versions = aws["s3"].list_object_versions(Bucket=bucket, Prefix="models/")["Versions"]
    assert {v["Key"] for v in versions} == {f"models/{good_sha}.tflite", f"models/{bad_sha}.tflite"}

    def ssh_lost(c, instance, digest):
        raise ConnectionError("the SSH connection was lost")

    # A failure the roll does not expect (SSH lost mid-swap): the back-end is registered again, not
    # left out of the target group where no roll and no health check would ever find it.
    with pytest.raises(ConnectionError):
        tier.push_model(c, bad, bad_sha, on_backend=ssh_lost)
    assert sorted(health(aws, c)) == ids


def test_the_accuracy_gate_holds_on_the_tier_too(stack, aws):
    """The serving model's metrics go to the bucket beside it; a model that reads MNIST worse by more
    than model.max_regression is refused before any back-end sees it, unless --force."""
    c = stack()
    tier.scale(c, backends=2)
    bucket = tier.bucket_name(c)
    good, worse = b"good model", b"worse model"
    good_sha, worse_sha = (hashlib.sha256(m).hexdigest() for m in (good, worse))
    tier.push_model(c, good, good_sha, on_backend=Backends(c, aws), metrics={"test_accuracy": 0.990})
    stored = json.loads(aws["s3"].get_object(Bucket=bucket, Key=f"models/{good_sha}.metrics.json")["Body"].read())
    assert stored == {"test_accuracy": 0.990}
    untouched = Backends(c, aws)
    with pytest.raises(errors.StepFailed) as refused:
        tier.push_model(c, worse, worse_sha, on_backend=untouched, metrics={"test_accuracy": 0.985})
    assert "accuracy gate: MNIST test accuracy 98.50% against the serving model's 99.00%" in refused.value.message
    assert "--force" in refused.value.message and untouched.calls == []
    assert aws["s3"].get_object(Bucket=bucket, Key="current")["Body"].read().decode() == good_sha
    forced = Backends(c, aws)
    tier.push_model(c, worse, worse_sha, on_backend=forced, metrics={"test_accuracy": 0.985}, force=True)
    assert len(forced.calls) == 2
    assert aws["s3"].get_object(Bucket=bucket, Key="current")["Body"].read().decode() == worse_sha


def test_fab_push_model_goes_through_the_tier(stack, aws, tmp_path, monkeypatch):
    """`push-model`'s task sends a .tflite to the tier when the stack has one (no SSH to a single back-end)."""
    from tasks import backend

    c = stack()
    tier.scale(c, backends=2)
    model = tmp_path / "cnn-mnist.tflite"
    model.write_bytes(b"a tflite model")
    seen = []
    monkeypatch.setattr(tier, "swap_over_ssh", lambda c, instance, digest: seen.append(instance["id"]) or True)
    backend.push_model(c, model=str(model))
    assert sorted(seen) == sorted(health(aws, c))
    digest = hashlib.sha256(b"a tflite model").hexdigest()
    assert aws["s3"].get_object(Bucket=tier.bucket_name(c), Key="current")["Body"].read().decode() == digest


# --- The user-data's pull script, run here against moto's S3 -------------------------------------


def pull_script(c, bucket, root):
    """The Python a back-end's cloud-init writes to /usr/local/sbin/digits-pull, out of the rendered
    user-data, with its two paths moved under `root`."""
    text = tier.user_data(c, bucket)
    script = text.split("cat > /usr/local/sbin/digits-pull <<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    env = text.split("cat > /etc/digits-backend/pull.env <<'ENV'\n", 1)[1].split("\nENV\n", 1)[0]
    (root / "pull.env").write_text(env)
    (root / "models").mkdir(exist_ok=True)
    (root / "app").mkdir(exist_ok=True)
    path = root / "digits-pull"
    path.write_text(script.replace("/etc/digits-backend/pull.env", str(root / "pull.env"))
                    .replace('"/opt/digits-backend"', repr(str(root))))
    return path


def test_user_data_pulls_the_app_and_the_current_model(aws_context, aws, tmp_path, moto_endpoint):
    c = aws_context(backend={"s3_endpoint": moto_endpoint})
    s3 = cloud.client(c, "s3")
    with Tally("scale", "backend-tier") as tally:  # scale's S3 part only (the rest: the tests above)
        bucket = tier.ensure_bucket(c, s3, tally)
        tier.ensure_app(c, s3, bucket, tally)
    script = pull_script(c, bucket, tmp_path)
    assert subprocess.run(["bash", "-n"], input=tier.user_data(c, bucket), text=True).returncode == 0

    def pull(*args):
        return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60)

    assert pull("model").returncode == 3  # no model pushed yet: the unit waits for one
    assert pull("app").returncode == 0
    assert (tmp_path / "app" / "keras_flask.py").read_bytes() == (ROOT / "Files" / "keras_flask.py").read_bytes()

    model = b"model one"
    digest = hashlib.sha256(model).hexdigest()
    with Tally("push-model", "backend-tier") as tally:
        tier.upload_model(c, s3, bucket, model, digest, tally)
    s3.put_object(Bucket=bucket, Key="current", Body=digest.encode())  # as push_model does after a roll
    done = pull("model")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == digest
    assert os.readlink(tmp_path / "models" / "current") == digest[:12]
    assert (tmp_path / "models" / "current" / "cnn-mnist.tflite").read_bytes() == model

    # A model whose bytes are not its name is refused, and `current` stays.
    forged = hashlib.sha256(b"other").hexdigest()
    aws["s3"].put_object(Bucket=bucket, Key=f"models/{forged}.tflite", Body=b"tampered")
    refused = pull("model", forged)
    assert refused.returncode == 1 and "does not have that checksum" in refused.stderr
    assert os.readlink(tmp_path / "models" / "current") == digest[:12]


def test_dry_run_plans_and_makes_nothing(stack, aws, capsys):
    c = stack()
    result = tier.scale(c, backends=3, dry_run=True)
    out = capsys.readouterr().out
    assert result["changed"] == 0 and nothing_made(aws)
    for planned in ("would create bucket", "would create role", "would create load balancer",
                    "would create launch template", "would create auto scaling group"):
        assert planned in out, out
