"""The one door to AWS: session and clients, tags, lookups by tag, and step errors.

Credentials, profile and region come from boto3's usual chain (AWS_PROFILE,
AWS_DEFAULT_REGION, ~/.aws, AWS_ENDPOINT_URL...) unless `aws.profile` /
`aws.region` are set in config.
"""
import functools
import ipaddress
import os
import re
import sys
import time
from contextlib import contextmanager

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, ProfileNotFound, WaiterError

from .errors import ConfigError, StepFailed  # one set of error types: tasks/errors.py
from .report import Tally

# Throttling and transient errors are retried by botocore itself, with backoff.
# In botocore's client config `max_attempts` counts the retries: 11 attempts in all.
RETRIES = BotoConfig(retries={"mode": "standard", "max_attempts": 10})

# Instances in these states still hold their tags' place; "terminated" ones do not.
LIVE_STATES = ["pending", "running", "stopping", "stopped"]
# A NAT gateway in these states is the stack's; "deleted" ones linger in the API for an hour.
NAT_LIVE_STATES = ["pending", "available"]


@contextmanager
def step(resource, task):
    """Turn any AWS error inside into a `StepFailed` naming the resource and task."""
    try:
        yield
    except (ClientError, BotoCoreError) as error:
        raise StepFailed(resource, task, error) from error


def resumable(task_name):
    """Decorate a task body: an AWS error no finer `step` caught still names the task to re-run."""

    def wrap(body):
        @functools.wraps(body)  # invoke reads the options from the wrapped signature
        def run(c, *args, **kwargs):
            with step(f"stack {stack(c)}", task_name):
                return body(c, *args, **kwargs)

        return run

    return wrap


def retry(call, codes, attempts=12, delay=5, **params):
    """Call, retrying while AWS answers one of the error `codes`.

    For eventual consistency, which botocore's retry modes leave alone: a
    terminated instance's network interface, or a just released address, can
    block a deletion for a little while (`DependencyViolation`); a just created
    route table can be unknown to the next call for a moment (`...NotFound`).
    """
    for attempt in range(1, attempts + 1):
        try:
            return call(**params)
        except ClientError as error:
            if error.response["Error"]["Code"] not in codes or attempt == attempts:
                raise
            time.sleep(delay)


def wait(ec2, waiter, attempts=12, delay=5, **params):
    """A botocore waiter that also outlasts eventual consistency: vpc_available and
    subnet_available stop at once on a `...NotFound` for a resource that was just created, and
    internet_gateway_exists retries a code EC2 does not send; that is retried here, nothing else."""
    for attempt in range(1, attempts + 1):
        try:
            return ec2.get_waiter(waiter).wait(**params)
        except WaiterError as error:
            code = (error.last_response or {}).get("Error", {}).get("Code", "")
            if not code.endswith(".NotFound") or attempt == attempts:
                raise
            time.sleep(delay)


def retry_dependency(call, attempts=12, delay=5, **params):
    """Call, retrying while AWS still sees a dependency that is going away."""
    return retry(call, ("DependencyViolation",), attempts, delay, **params)


def warn(message):
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


@functools.cache
def _session(profile, region, _env, verbose):
    found = boto3.Session(profile_name=profile, region_name=region)
    if verbose:
        _watch(found.events)
    return found


def session(c):
    """The boto3 session for this config (cached, so event hooks set on it stick).

    With `aws.verbose`, each call its clients make, each retry and each failure is
    printed on stderr (see `_watch`): stdout stays the tasks' own (`status --json`).
    """
    aws = c.config.aws
    # The environment is part of the key: boto3 reads it only when a session is made.
    env = (os.environ.get("AWS_PROFILE"), os.environ.get("AWS_DEFAULT_REGION"))
    try:
        found = _session(aws.profile or None, aws.region or None, env, bool(aws.get("verbose")))
    except ProfileNotFound as error:
        raise ConfigError(f"{error} (aws.profile / AWS_PROFILE)") from error
    region = found.region_name
    if not region:
        raise ConfigError("no AWS region: set aws.region in fabric.yaml or AWS_DEFAULT_REGION")
    if region not in known_regions(found):
        raise ConfigError(f"unknown AWS region {region!r} (aws.region / AWS_DEFAULT_REGION)")
    return found


def forget_sessions():
    """Drop cached sessions (tests: event hooks must not leak between them)."""
    _session.cache_clear()


def known_regions(found):
    return {
        region
        for partition in found.get_available_partitions()
        for region in found.get_available_regions("ec2", partition_name=partition)
    }


def retry_config():
    """RETRIES, or as many attempts in all (the first one included) as $AWS_MAX_ATTEMPTS says,
    botocore's own variable (which RETRIES would otherwise override)."""
    value = os.environ.get("AWS_MAX_ATTEMPTS", "").strip()
    if not value:
        return RETRIES
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"AWS_MAX_ATTEMPTS={value!r} is not a number of attempts (1 or more)")
    return BotoConfig(retries={"mode": "standard", "total_max_attempts": int(value)})


def total_attempts():
    """Attempts botocore makes at one call before it gives up: the first one and the retries."""
    retries = retry_config().retries
    return retries.get("total_max_attempts") or retries["max_attempts"] + 1


def client(c, service="ec2"):
    return session(c).client(service, config=retry_config())


def _watch(events):
    """`aws.verbose`: print every call, each retry botocore makes and why, and each failure.

    botocore decides on a retry in `needs-retry` (our handler only notes why, in the
    request's context) and makes one only by creating the request again: a
    `request-created` whose attempt is 2 or more is a retry that happens.
    """

    def say(event_name, message):
        _, service, operation = event_name.split(".", 2)
        print(f"aws: {service} {operation}{message}", file=sys.stderr, flush=True)

    def call(event_name, **_):
        say(event_name, "")

    def note_why(request_dict, response=None, caught_exception=None, **_):
        if caught_exception is not None:
            request_dict["context"]["verbose_reason"] = type(caught_exception).__name__
        elif response is not None and response[0].status_code >= 300:
            request_dict["context"]["verbose_reason"] = _reason(*response)

    def retrying(event_name, request, **_):
        attempt = request.context.get("retries", {}).get("attempt", 1)
        if attempt > 1:
            why = request.context.get("verbose_reason", "?")
            say(event_name, f": {why}, retry {attempt - 1}/{total_attempts() - 1}")

    def failed(event_name, http_response, parsed, **_):
        if http_response.status_code >= 300:
            attempts = parsed.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
            say(event_name, f": {_reason(http_response, parsed)}, failed after {attempts} attempt"
                            + "s" * (attempts > 1))

    def broken(event_name, exception, **_):
        say(event_name, f": {type(exception).__name__}, failed: {exception}")

    events.register("before-call", call, unique_id="aws-verbose-call")
    events.register("needs-retry", note_why, unique_id="aws-verbose-why")
    events.register("request-created", retrying, unique_id="aws-verbose-retry")
    events.register("after-call", failed, unique_id="aws-verbose-failed")
    events.register("after-call-error", broken, unique_id="aws-verbose-broken")


def _reason(http_response, parsed):
    """An error answer in a few words: its code, or its HTTP status when it has none."""
    error = parsed.get("Error", {})
    code = str(error.get("Code") or http_response.status_code)
    if code.isdigit():  # a bare 5xx: botocore makes the status the code
        return f"HTTP {code} {error.get('Message') or ''}".rstrip()
    return code


def stack(c):
    """The stack's name (aws.stack, the Project tag): read here only."""
    return c.config.aws.stack


def where(c):
    """`stack mnist in eu-west-3`: what a task's report is about."""
    return f"stack {stack(c)} in {session(c).region_name}"


def tags(c, name, role=None):
    """Every resource carries its stack (so stacks don't see each other) and, if any, its role."""
    found = [
        {"Key": "Project", "Value": stack(c)},
        {"Key": "Name", "Value": f"{stack(c)}-{name}"},
        {"Key": "ManagedBy", "Value": "fabric"},
    ]
    if role:
        found.append({"Key": "Role", "Value": role})
    return found


def tag_spec(c, resource_type, name, role=None):
    return [{"ResourceType": resource_type, "Tags": tags(c, name, role)}]


def tag_filters(c, role=None, name=None, **more):
    """Filters selecting this stack's resources; `name` its Name tag, <stack>-<name> (what tells
    the public subnet and route table from the private ones); `more` adds e.g. vpc_id=... (as vpc-id)."""
    filters = [{"Name": "tag:Project", "Values": [stack(c)]}]
    if role:
        filters.append({"Name": "tag:Role", "Values": [role]})
    if name:
        filters.append({"Name": "tag:Name", "Values": [f"{stack(c)}-{name}"]})
    for key, value in more.items():
        values = value if isinstance(value, list) else [value]
        filters.append({"Name": key.replace("_", "-"), "Values": values})
    return filters


# describe_<kind> -> key of the list in its answer.
_RESULT_KEYS = {
    "vpcs": "Vpcs",
    "subnets": "Subnets",
    "internet_gateways": "InternetGateways",
    "route_tables": "RouteTables",
    "security_groups": "SecurityGroups",
    "addresses": "Addresses",
    "key_pairs": "KeyPairs",
    "nat_gateways": "NatGateways",
}


def find(c, ec2, kind, role=None, name=None, **more):
    """This stack's resources of one kind, found by tags (never by counting)."""
    if kind == "instances":
        more = {"instance_state_name": LIVE_STATES, **more}
    filters = tag_filters(c, role, name, **more)
    if kind == "instances":
        pages = ec2.get_paginator("describe_instances").paginate(Filters=filters)
        found = [i for page in pages for r in page["Reservations"] for i in r["Instances"]]
    else:
        found = getattr(ec2, f"describe_{kind}")(Filters=filters)[_RESULT_KEYS[kind]]
    # The tags checked here too: an API that ignores a filter (moto does, for NAT gateways)
    # must never hand one stack another's resources, least of all to `destroy`.
    return [item for item in found if _tagged(item, filters)]


def _tagged(resource, filters):
    tags = {tag["Key"]: tag["Value"] for tag in resource.get("Tags", [])}
    return all(tags.get(f["Name"][4:]) in f["Values"] for f in filters if f["Name"].startswith("tag:"))


def find_one(c, ec2, kind, role=None, name=None, **more):
    """The one tagged resource, None, or an error if tags match several (fix by hand)."""
    found = find(c, ec2, kind, role, name, **more)
    if len(found) > 1:
        what = f"{kind} tagged Project={stack(c)}" + (f", Role={role}" if role else "")
        raise StepFailed(what, None, f"found {len(found)}, where the stack has one",
                         next_step="delete the extra ones, then re-run")
    return found[0] if found else None


class AwsRun(Tally):
    """One task's AWS work, built once per run and passed to its steps, as `remote.Report` is for
    SSH and as amazon.aws passes one `module`: its report (a Tally: ok/changed/would, dry-run,
    the task's name), the config, the stack, its EC2 client and others on demand.

        with cloud.AwsRun(c, "launch", dry_run) as aws:
            vpc = aws.find_one("vpcs")
            with aws.step("vpc 10.0.0.0/16"):  # an AWS error here names the resource and task
                aws.ec2.create_vpc(...)
            aws.changed("vpc ... created")
    """

    def __init__(self, c, task, dry_run=False, role="aws", about=None, ec2=None):
        """`about`: what the header names in brackets, `stack mnist in eu-west-3` unless given."""
        self.c, self.stack = c, stack(c)
        self.ec2 = ec2 or client(c)  # a bad profile or region stops here, before the header
        self._clients = {"ec2": self.ec2}
        super().__init__(task, role, where=where(c) if about is None else about, dry_run=dry_run)

    def client(self, service):
        """Another service's client (ssm, sts...), made on first use."""
        if service not in self._clients:
            self._clients[service] = client(self.c, service)
        return self._clients[service]

    def step(self, resource):
        """`step(resource, <this task>)`: an AWS error inside names the resource and the task to re-run."""
        return step(resource, self.task)

    def find(self, kind, role=None, name=None, **more):
        return find(self.c, self.ec2, kind, role, name, **more)

    def find_one(self, kind, role=None, name=None, **more):
        return find_one(self.c, self.ec2, kind, role, name, **more)

    def tag_spec(self, resource_type, name, role=None):
        return tag_spec(self.c, resource_type, name, role)


def network(value, setting):
    """A CIDR from config or an option, or a clear error naming the setting."""
    try:
        return ipaddress.ip_network(str(value).strip(), strict=True)
    except ValueError as error:
        raise ConfigError(f"{setting}={value!r} is not a CIDR block ({error})") from error


# The worker's and back-end's pinned requirements (numpy 2.4, TensorFlow 2.21)
# need Python 3.11 or later: Ubuntu 24.04 (Python 3.12) is the first LTS with one.
OLDEST_UBUNTU = (24, 4)
UBUNTU_PYTHON = {"22.04": "3.10", "20.04": "3.8", "18.04": "3.6", "16.04": "3.5"}


def ubuntu_release(c):
    """aws.ubuntu_release as "YY.MM", or a clear error if its Python is too old for the app."""
    value = c.config.aws.ubuntu_release
    # YAML reads an unquoted 24.10 as the number 24.1.
    text = f"{value:.2f}" if isinstance(value, float) else str(value).strip()
    found = re.fullmatch(r"(\d{2})\.(\d{2})", text)
    if not found:
        raise ConfigError(f"aws.ubuntu_release={value!r} is not an Ubuntu release like 24.04")
    if (int(found[1]), int(found[2])) < OLDEST_UBUNTU:
        python = UBUNTU_PYTHON.get(text, "older than 3.11")
        raise ConfigError(
            f"aws.ubuntu_release={text!r}: Ubuntu {text} ships Python {python}, and the worker's and "
            "back-end's pinned requirements (numpy 2.4, TensorFlow 2.21) need Python 3.11 or later: "
            "use 24.04 or later"
        )
    return text
