"""iam/digits-operator.json: every AWS action the tasks call, and no other; proved on moto.

Two proofs. (1) Every call the tasks make during full runs (both network layouts,
preflight, the rare repair paths) is recorded from botocore's events on the tasks'
own session, and the policy must allow exactly those actions: one the tasks call
but the policy lacks, or one the policy allows but no task calls, is named.
(2) A second moto server enforces IAM (`INITIAL_NO_AUTH_ACTION_COUNT`): the test
makes a user with the policy (unauthenticated, the first four requests), then runs
the tasks with that user's keys: all succeed; with one action taken out of the
policy, the task fails and names the action.

What moto 5.2 does and does not check (moto/core/responses.py `call_action`,
moto/iam/access_control.py): every request of a query or JSON service (EC2, SSM,
Service Quotas, STS, IAM...) is checked for its signature and its action against
the user's policies; `sts:GetCallerIdentity` is always allowed (as on AWS). It
evaluates no condition key (a `Condition` passes vacuously: no request context is
handed to it), and the resource it checks is always "*" for EC2 and SSM, so a
statement naming a resource ARN never matches there: the policy's one such
statement (`ssm:GetParameter` on the public parameters) is denied on moto, and
`launch` falls back to describe_images, as it does on AWS without the parameter.
"""
import ast
import importlib.util
import json
import os
import re
import subprocess
import urllib.request

import boto3
import botocore.exceptions
import botocore.session
import pytest
from botocore import xform_name
from botocore.exceptions import ClientError
from invoke.exceptions import Exit

from tasks import cloud, instances, network, teardown, tier
from tasks.config import ROOT
from tests.fixtures.moto import REGION, moto_server

POLICY = ROOT / "iam" / "digits-operator.json"
# Actions AWS authorizes for every caller, whatever its policies say.
NEEDS_NO_PERMISSION = {"sts:GetCallerIdentity"}
# A managed policy's size limit (characters, whitespace not counted).
MANAGED_POLICY_LIMIT = 6144
# The only statement that names a resource: moto checks EC2 and SSM calls against "*".
SCOPED = {"ssm:GetParameter": "arn:aws:ssm:*::parameter/aws/service/*",
          "iam:PassRole": "arn:aws:iam::*:role/*-backend-role",
          "iam:CreateServiceLinkedRole": "arn:aws:iam::*:role/aws-service-role/*"}
# S3's API calls whose IAM action has another name (the rest are s3:<operation>).
# HeadObject/GetObject of a missing key: 404 only with s3:ListBucket, else 403 (ensure_app, current_model).
S3_ACTIONS = {"HeadObject": ["s3:GetObject", "s3:ListBucket"], "GetObject": ["s3:GetObject", "s3:ListBucket"],
              "ListObjectVersions": ["s3:ListBucketVersions"],
              "PutPublicAccessBlock": ["s3:PutBucketPublicAccessBlock"],
              "PutBucketEncryption": ["s3:PutEncryptionConfiguration"],
              "DeleteObjects": ["s3:DeleteObject", "s3:DeleteObjectVersion"]}
# What AWS authorizes besides the call itself: tags given on create (each service's own tagging
# action), the back-ends' role handed to EC2 through the launch template, and the service-linked
# roles ELB and Auto Scaling make on their first use in an account.
IMPLIED = {"elasticloadbalancing:CreateLoadBalancer": ["elasticloadbalancing:AddTags",
                                                        "iam:CreateServiceLinkedRole"],
           "elasticloadbalancing:CreateTargetGroup": ["elasticloadbalancing:AddTags"],
           "elasticloadbalancing:CreateListener": ["elasticloadbalancing:AddTags"],
           "iam:CreateRole": ["iam:TagRole"], "iam:CreateInstanceProfile": ["iam:TagInstanceProfile"],
           "autoscaling:CreateAutoScalingGroup": ["autoscaling:CreateOrUpdateTags", "iam:PassRole",
                                                  "iam:CreateServiceLinkedRole"],
           "autoscaling:UpdateAutoScalingGroup": ["iam:PassRole"]}
SERVICES = ("ec2", "ssm", "sts", "service-quotas", "elbv2", "autoscaling", "iam", "s3")


def load_policy(document=None):
    return json.loads(POLICY.read_text()) if document is None else document


def policy_actions(document=None):
    """{action: statement Sid} of the policy's Allow statements."""
    return {action: statement["Sid"] for statement in load_policy(document)["Statement"]
            for action in statement["Action"]}


def without(action, document=None):
    """The policy less one action."""
    document = json.loads(json.dumps(load_policy(document)))
    for statement in document["Statement"]:
        statement["Action"] = [a for a in statement["Action"] if a != action]
    document["Statement"] = [s for s in document["Statement"] if s["Action"]]
    return document


def tag_on_create(document=None):
    """The create actions whose tags the policy allows (ec2:CreateTags' ec2:CreateAction)."""
    [statement] = [s for s in load_policy(document)["Statement"] if s["Action"] == ["ec2:CreateTags"]]
    return set(statement["Condition"]["StringEquals"]["ec2:CreateAction"])


class Recorder:
    """The IAM actions (`ec2:CreateVpc`) a boto3 session's clients call, and the calls that
    tag what they create (AWS authorizes those tags as ec2:CreateTags, which moto skips)."""

    def __init__(self):
        self.actions, self.tagging, self.denied = set(), set(), set()
        self.sessions = []

    def watch(self, session):
        if any(s is session for s in self.sessions):
            return
        self.sessions.append(session)
        session.events.register("before-parameter-build", self._call, unique_id="test-iam-record")
        session.events.register("after-call", self._answer, unique_id="test-iam-denied")

    @staticmethod
    def action(model):
        # The IAM prefix is the signing name: "servicequotas" for botocore's "service-quotas".
        return f"{model.service_model.signing_name}:{model.name}"

    @staticmethod
    def iam_actions(model):
        """The IAM actions one call needs: its own (S3's by IAM's name for it), and what it implies."""
        name = Recorder.action(model)
        found = S3_ACTIONS.get(model.name, [name]) if name.startswith("s3:") else [name]
        return set(found) | set(IMPLIED.get(name, ()))

    def _call(self, params, model, **_):
        self.actions |= self.iam_actions(model)
        if params.get("TagSpecifications"):
            self.tagging.add(model.name)

    def _answer(self, http_response, model, **_):
        if http_response.status_code == 403:
            self.denied.add(self.action(model))


def check_in_sync(recorder, document=None):
    """The policy allows every action called, and nothing else; messages name each action."""
    needed = (recorder.actions | ({"ec2:CreateTags"} if recorder.tagging else set())) - NEEDS_NO_PERMISSION
    allowed = set(policy_actions(document))
    missing, unused = sorted(needed - allowed), sorted(allowed - needed)
    problems = [f"the tasks call {a}, which {POLICY.relative_to(ROOT)} does not allow: add it" for a in missing]
    problems += [f"{POLICY.relative_to(ROOT)} allows {a}, which no task called: remove it"
                 f" (or make this test's run reach the call)" for a in unused]
    assert not problems, "\n".join(problems)
    assert tag_on_create(document) == recorder.tagging, (
        f"ec2:CreateTags' ec2:CreateAction must list exactly the calls that tag on create:"
        f" add {sorted(recorder.tagging - tag_on_create(document))},"
        f" remove {sorted(tag_on_create(document) - recorder.tagging)}")


def preflight_module():
    """tasks/preflight.py's task, once it exists (being written alongside)."""
    if importlib.util.find_spec("tasks.preflight") is None:
        return None
    from tasks import preflight

    return preflight.preflight


def run_preflight(c):
    found = preflight_module()
    if found is None:
        return None
    try:
        return found(c)
    except Exit as error:  # a problem moto has (e.g. no Service Quotas here): the calls were made all the same
        return error


def role_instance(ec2, c, role):
    return cloud.find_one(c, ec2, "instances", role)


# --- The policy file -----------------------------------------------------------------------


def test_the_policy_is_a_small_explicit_allow_list():
    document = load_policy()
    assert document["Version"] == "2012-10-17"
    seen = []
    for statement in document["Statement"]:
        assert statement["Effect"] == "Allow" and re.fullmatch(r"[A-Za-z]+", statement["Sid"])
        actions = statement["Action"]
        assert actions == sorted(actions), f"{statement['Sid']}: keep the actions sorted"
        for action in actions:
            assert re.fullmatch(r"[a-z0-9]+:[A-Z][A-Za-z0-9]+", action), f"{action}: no wildcards, one action each"
        seen += actions
        resource = statement["Resource"]
        assert resource == "*" or actions == [a for a in actions if SCOPED.get(a) == resource]
    assert len(seen) == len(set(seen)), "an action in two statements"
    assert not set(seen) & NEEDS_NO_PERMISSION
    size = len(re.sub(r"\s", "", POLICY.read_text()))
    assert size <= MANAGED_POLICY_LIMIT, f"{size} characters: over a managed policy's {MANAGED_POLICY_LIMIT}"


def test_each_mutating_action_is_where_its_verb_says():
    sids = policy_actions()
    for action, sid in sids.items():
        verb = re.match(r"[A-Z][a-z]+", action.split(":")[1])[0]
        if verb in ("Describe", "Get") and action not in SCOPED:
            assert sid == "ReadTheStackAndTheAccount", action
        elif verb in ("Delete", "Terminate", "Release", "Detach", "Disassociate", "Revoke"):
            assert sid == "TearDownTheStack", action


# --- (1) What the tasks call, recorded ----------------------------------------------------


def full_runs(aws_context, ec2, recorder):
    """Every task in both layouts, and the repair paths a normal run skips."""
    c = aws_context()
    recorder.watch(cloud.session(c))
    run_preflight(c)
    network.create_vpc(c)
    instances.launch(c, no_wait=True)
    instances.status(c)
    instances.status(c, json=True)
    instances.stop_worker(c)
    instances.start_worker(c, no_wait=True)
    # An instance launched before IMDSv2 was required here: `launch` switches it.
    worker = role_instance(ec2, c, "worker")["InstanceId"]
    ec2.modify_instance_metadata_options(InstanceId=worker, HttpTokens="optional")
    instances.launch(c, no_wait=True)
    # A default route someone pointed elsewhere: `create-vpc` replaces it.
    [table] = cloud.find(c, ec2, "route_tables", name="public")
    other = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.replace_route(RouteTableId=table["RouteTableId"], DestinationCidrBlock="0.0.0.0/0", GatewayId=other)
    network.create_vpc(c)
    ec2.delete_internet_gateway(InternetGatewayId=other)
    run_preflight(c)  # with the stack there: the zone of its subnet, what is in use
    teardown.destroy(c, yes=True)

    # The back-end tier (tasks/tier.py), and its repair paths.
    balanced = aws_context(backend={"max": 3, "bucket": "digits-iam-test-models"})  # named: its tags are read
    recorder.watch(cloud.session(balanced))
    network.create_vpc(balanced)
    tier.scale(balanced, backends=2)
    names = tier.names(balanced)
    # The sabotage with the test's own clients: the recorder watches the tasks' session only.
    elb, asg = boto3.client("elbv2", region_name=REGION), boto3.client("autoscaling", region_name=REGION)
    targets = tier.find_targets(elb, names["targets"])
    elb.modify_target_group(TargetGroupArn=targets["TargetGroupArn"], HealthCheckPath="/")
    [listener] = elb.describe_listeners(
        LoadBalancerArn=tier.find_balancer(elb, names["balancer"])["LoadBalancerArn"])["Listeners"]
    elb.modify_listener(ListenerArn=listener["ListenerArn"], DefaultActions=[
        {"Type": "fixed-response", "FixedResponseConfig": {"StatusCode": "503"}}])
    asg.detach_load_balancer_target_groups(AutoScalingGroupName=names["group"],
                                           TargetGroupARNs=[targets["TargetGroupArn"]])
    balanced.config.aws.instance_types.backend = "t3.micro"  # a new launch template version
    balanced.config.backend.max = None  # the policy goes
    # (Not more back-ends: moto 5.2 fails to launch from a version made by CreateLaunchTemplateVersion.)
    tier.scale(balanced, backends=2, no_wait=True)
    # push-model's roll: S3, then each target out and in (the swap itself is SSH, no AWS call).
    tier.push_model(balanced, b"a model", "0" * 64, on_backend=lambda c, instance, digest: True)
    instances.status(balanced)
    teardown.destroy(balanced, yes=True)

    private = aws_context(backend={"mode": "private"})
    recorder.watch(cloud.session(private))
    run_preflight(private)
    network.create_vpc(private)
    instances.launch(private, no_wait=True)
    instances.status(private)
    teardown.destroy(private, yes=True)


def test_the_policy_allows_exactly_what_the_tasks_call(aws_context, ec2, capsys):
    recorder = Recorder()
    full_runs(aws_context, ec2, recorder)
    capsys.readouterr()
    assert "ec2:RunInstances" in recorder.actions and "ec2:DeleteNatGateway" in recorder.actions
    check_in_sync(recorder)


def test_the_sync_check_names_a_missing_and_an_unused_action():
    recorder = Recorder()
    recorder.actions = set(policy_actions()) - {"ec2:CreateTags"} | {"ec2:DescribeTags", "sts:GetCallerIdentity"}
    recorder.tagging = tag_on_create()
    with pytest.raises(AssertionError) as missing:
        check_in_sync(recorder)
    assert ("the tasks call ec2:DescribeTags, which iam/digits-operator.json does not allow: add it"
            in str(missing.value))
    recorder.actions -= {"ec2:DescribeTags", "ec2:DeleteNatGateway"}
    with pytest.raises(AssertionError) as unused:
        check_in_sync(recorder)
    assert "iam/digits-operator.json allows ec2:DeleteNatGateway, which no task called: remove it" in str(
        unused.value)
    recorder.actions |= {"ec2:DeleteNatGateway"}
    recorder.tagging = tag_on_create() | {"CreateVolume"}
    with pytest.raises(AssertionError, match=r"add \['CreateVolume'\]"):
        check_in_sync(recorder)


def calls_in_the_source():
    """{action: ["file:line", ...]} of every boto3 operation named in tasks/*.py: a method of an
    EC2, SSM, STS, Service Quotas, ELB, Auto Scaling, IAM or S3 client (called or passed on), a waiter's or paginator's
    operation, and cloud.find's describe_<kind>. It sees code paths no run reaches."""
    session = botocore.session.get_session()
    operations = {}
    for service in SERVICES:
        model = session.get_service_model(service)
        for name in model.operation_names:
            operations.setdefault(xform_name(name), set()).update(
                Recorder.iam_actions(model.operation_model(name)))
        try:
            waiters = session.get_waiter_model(service)
        except botocore.exceptions.DataNotFoundError:
            waiters = None
        for name in waiters.waiter_names if waiters else ():
            operations.setdefault(f"waiter:{xform_name(name)}", set()).update(
                Recorder.iam_actions(model.operation_model(waiters.get_waiter(name).operation)))
        paginators = session.get_component("data_loader").load_service_model(service, "paginators-1")
        for name in paginators["pagination"]:  # a paginator is named after its operation
            operations.setdefault(f"paginator:{xform_name(name)}", set()).update(
                Recorder.iam_actions(model.operation_model(name)))
    allowed = set(policy_actions()) | NEEDS_NO_PERMISSION
    for name, actions in operations.items():
        # A name several services share (delete_policy: autoscaling's and IAM's) is the allowed one's.
        if len({a.split(":")[0] for a in actions}) > 1 and actions & allowed:
            operations[name] = actions & allowed
    found = {}
    for path in sorted((ROOT / "tasks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Attribute):
                names.append(node.attr)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args
                  and node.func.attr in ("get_waiter", "get_paginator") and isinstance(node.args[0], ast.Constant)):
                names.append(f"{node.func.attr[4:]}:{node.args[0].value}")
            for name in names:
                for action in operations.get(name, ()):
                    found.setdefault(action, []).append(f"tasks/{path.name}:{node.lineno}")
    for kind in cloud._RESULT_KEYS:  # find's getattr(ec2, f"describe_{kind}")
        for action in operations[f"describe_{kind}"]:
            found.setdefault(action, []).append("tasks/cloud.py: find")
    return found


def test_every_call_in_the_source_is_allowed():
    """What a run may never reach (an error path, a repair) is allowed all the same."""
    allowed = set(policy_actions()) | NEEDS_NO_PERMISSION
    found = calls_in_the_source()
    missing = [f"{action} ({', '.join(where[:3])}) is called in the tasks but not allowed by"
               f" {POLICY.relative_to(ROOT)}: add it"
               for action, where in sorted(found.items()) if action not in allowed]
    assert not missing, "\n".join(missing)
    assert {"ec2:DescribeInstances", "ec2:DescribeRouteTables", "ec2:ReleaseAddress"} <= set(found)


# --- (2) Enforced: a moto server that checks IAM ---------------------------------------------

# The requests before enforcement starts: create-user, create-policy, attach-user-policy, create-access-key.
SETUP_REQUESTS = 4
USER = "digits-operator"


@pytest.fixture(scope="module")
def enforcing_endpoint(tmp_path_factory):
    """A second moto server, started with INITIAL_NO_AUTH_ACTION_COUNT: after the first
    requests it checks every one against the caller's IAM policies."""
    with moto_server(tmp_path_factory.mktemp("moto-iam"), INITIAL_NO_AUTH_ACTION_COUNT=str(SETUP_REQUESTS)) as url:
        yield url


def moto_api(url, path, body=b""):
    # Not a form (urllib's default type): Flask would take the body as fields, and moto reads it raw.
    request = urllib.request.Request(f"{url}/moto-api/{path}", data=body, method="POST",
                                     headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request).close()


def unauthenticated(url, count):
    """The next `count` requests pass unchecked (moto's reset-auth), then every one is checked."""
    moto_api(url, "reset-auth", str(count).encode())


def aws_cli_iam(url, *args, env):
    done = subprocess.run(["aws", "--endpoint-url", url, "--region", REGION, "--output", "json", "iam", *args],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if done.stdout.strip() else {}


@pytest.fixture
def operator(enforcing_endpoint, aws_env, monkeypatch, tmp_path):
    """Factory: on a fresh enforcing server, docs/aws.md's commands make a user with
    `document` (the policy file by default) attached; the tasks then run with its keys."""

    def make(document=None, cli=False):
        moto_api(enforcing_endpoint, "reset")
        unauthenticated(enforcing_endpoint, SETUP_REQUESTS)
        text = json.dumps(load_policy(document))
        if cli:  # docs/aws.md's commands, word for word but the endpoint
            (tmp_path / "policy.json").write_text(text)
            env = dict(os.environ)
            aws_cli_iam(enforcing_endpoint, "create-user", "--user-name", USER, env=env)
            arn = aws_cli_iam(enforcing_endpoint, "create-policy", "--policy-name", USER, "--policy-document",
                              f"file://{tmp_path / 'policy.json'}", env=env)["Policy"]["Arn"]
            aws_cli_iam(enforcing_endpoint, "attach-user-policy", "--user-name", USER, "--policy-arn", arn, env=env)
            key = aws_cli_iam(enforcing_endpoint, "create-access-key", "--user-name", USER, env=env)["AccessKey"]
        else:
            iam = boto3.client("iam", endpoint_url=enforcing_endpoint, region_name=REGION)
            iam.create_user(UserName=USER)
            arn = iam.create_policy(PolicyName=USER, PolicyDocument=text)["Policy"]["Arn"]
            iam.attach_user_policy(UserName=USER, PolicyArn=arn)
            key = iam.create_access_key(UserName=USER)["AccessKey"]
        # From here on, the user's keys (made by moto now, never stored) and nothing else.
        monkeypatch.setenv("AWS_ENDPOINT_URL", enforcing_endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
        cloud.forget_sessions()
        return arn

    return make


def replace_policy(url, arn, document):
    """A new default version of the user's policy, made by the admin (one unchecked request)."""
    unauthenticated(url, 1)
    iam = boto3.client("iam", endpoint_url=url, region_name=REGION,
                       aws_access_key_id="admin", aws_secret_access_key="admin")  # noqa: S106 (moto's)
    iam.create_policy_version(PolicyArn=arn, PolicyDocument=json.dumps(document), SetAsDefault=True)


def test_moto_enforces_the_users_policy(operator, aws_context):
    """The ground the next tests stand on: with a policy allowing one read, moto refuses the rest."""
    operator({"Version": "2012-10-17", "Statement": [
        {"Sid": "One", "Effect": "Allow", "Action": ["ec2:DescribeVpcs"], "Resource": "*"}]})
    c = aws_context()
    assert cloud.client(c, "sts").get_caller_identity()["Arn"].endswith(f":user/{USER}")
    cloud.client(c).describe_vpcs()
    with pytest.raises(Exit) as refused:
        network.create_vpc(c)
    assert re.search(r"not authorized to perform: ec2:\w+", refused.value.message), refused.value.message


@pytest.mark.parametrize("mode", ["proxied", "private"])
def test_the_tasks_run_with_only_the_policy(operator, aws_context, capsys, mode):
    operator(cli=mode == "proxied")
    c = aws_context(backend={"mode": mode})
    recorder = Recorder()
    recorder.watch(cloud.session(c))
    assert cloud.client(c, "sts").get_caller_identity()["Arn"].endswith(f":user/{USER}")
    run_preflight(c)
    network.create_vpc(c)
    instances.launch(c, no_wait=True)
    instances.status(c)
    instances.stop_worker(c)
    instances.start_worker(c, no_wait=True)
    teardown.destroy(c, yes=True)
    out = capsys.readouterr().out
    assert "RECAP [destroy] aws:" in out
    assert "not authorized" not in out and "missing permission" not in out  # preflight's rows, the notes
    # moto checks SSM calls against resource "*", which the statement naming the public
    # parameters' ARN does not match: refused here, allowed on AWS; launch searched instead.
    assert recorder.denied <= {"ssm:GetParameter"}, recorder.denied
    assert "ec2:RunInstances" in recorder.actions and "ec2:DeleteVpc" in recorder.actions
    ec2 = cloud.client(c)
    assert not cloud.find(c, ec2, "vpcs") and not cloud.find(c, ec2, "instances")


def test_the_tier_runs_with_only_the_policy_and_a_missing_bucket_permission_is_named(operator, enforcing_endpoint,
                                                                                      aws_context, capsys):
    """`scale` and `destroy` of the back-end tier with the policy's user; then without s3:CreateBucket:
    `scale` stops at the bucket, naming the permission, before anything billed (no ALB, no group)."""
    arn = operator()
    c = aws_context()
    network.create_vpc(c)
    tier.scale(c, backends=2, no_wait=True)
    teardown.destroy(c, yes=True)
    assert "not authorized" not in capsys.readouterr().out
    c = aws_context()
    network.create_vpc(c)
    replace_policy(enforcing_endpoint, arn, without("s3:CreateBucket"))
    with pytest.raises(Exit) as failed:
        tier.scale(c, backends=2)
    message = failed.value.message
    assert "missing permission s3:CreateBucket" in message and "iam/digits-operator.json" in message, message
    assert "`fab scale`" in message
    assert not cloud.client(c, "elbv2").describe_load_balancers()["LoadBalancers"]
    assert not cloud.client(c, "autoscaling").describe_auto_scaling_groups()["AutoScalingGroups"]


@pytest.mark.parametrize(("action", "mode", "task"), [
    ("ec2:CreateVpc", "proxied", "create-vpc"),
    ("ec2:RunInstances", "proxied", "launch"),
    ("ec2:DeleteNatGateway", "private", "destroy"),
])
def test_a_missing_action_is_named(operator, enforcing_endpoint, aws_context, capsys, action, mode, task):
    arn = operator()
    c = aws_context(backend={"mode": mode})
    if task != "create-vpc":
        network.create_vpc(c)
    if task == "destroy":
        instances.launch(c, no_wait=True)
    replace_policy(enforcing_endpoint, arn, without(action))
    run = {"create-vpc": lambda: network.create_vpc(c), "launch": lambda: instances.launch(c, no_wait=True),
           "destroy": lambda: teardown.destroy(c, yes=True)}[task]
    with pytest.raises(Exit) as failed:
        run()
    message = failed.value.message
    assert action in message, message
    if importlib.util.find_spec("tasks.errors"):  # tasks/errors.py: the action and the file, by name
        assert f"missing permission {action}" in message and "iam/digits-operator.json" in message, message
    assert f"`fab {task}`" in message


def test_what_moto_does_not_check(operator, aws_context):
    """Why the policy names no tag condition and one resource ARN only: moto ignores the first and
    never matches the second. If this fails, moto has learnt one of them: the policy can then be
    narrowed to the stack's tags, and the tests here can prove it."""
    operator({"Version": "2012-10-17", "Statement": [
        {"Sid": "NeverOnAws", "Effect": "Allow", "Action": ["ec2:CreateVpc"], "Resource": "*",
         "Condition": {"StringEquals": {"aws:RequestTag/Project": "no-such-stack"}}},
        {"Sid": "AnyVpcOnAws", "Effect": "Allow", "Action": ["ec2:DescribeVpcs"], "Resource": "arn:aws:ec2:*:*:vpc/*"},
    ]})
    ec2 = cloud.client(aws_context())
    ec2.create_vpc(CidrBlock="10.9.0.0/16")  # AWS: denied (no such tag in the request); moto: allowed
    with pytest.raises(ClientError, match="not authorized to perform: ec2:DescribeVpcs"):
        ec2.describe_vpcs()  # AWS: allowed (the VPCs match); moto checks it against "*" and denies
