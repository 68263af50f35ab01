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
from botocore.exceptions import BotoCoreError, ClientError, ProfileNotFound
from invoke.exceptions import Exit

# Throttling and transient errors are retried by botocore itself, with backoff.
RETRIES = BotoConfig(retries={"mode": "standard", "max_attempts": 10})

# Instances in these states still hold their tags' place; "terminated" ones do not.
LIVE_STATES = ["pending", "running", "stopping", "stopped"]


class ConfigError(Exit):
    """Bad settings, found before anything is created."""

    def __init__(self, message):
        super().__init__(f"bad config: {message}", code=2)
        self.args = (self.message,)


class StepFailed(Exit):
    """An AWS call failed; re-running the task resumes where it stopped."""

    def __init__(self, resource, task, error):
        super().__init__(
            f"step failed: {resource}: {error}\n"
            f"re-run `fab {task}`: it finds what exists by tags and creates only the rest"
        )
        self.args = (self.message,)
        self.resource = resource


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
            with step(f"stack {c.config.aws.stack}", task_name):
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


def retry_dependency(call, attempts=12, delay=5, **params):
    """Call, retrying while AWS still sees a dependency that is going away."""
    return retry(call, ("DependencyViolation",), attempts, delay, **params)


def warn(message):
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


@functools.lru_cache(maxsize=None)
def _session(profile, region, _env):
    return boto3.Session(profile_name=profile, region_name=region)


def session(c):
    """The boto3 session for this config (cached, so event hooks set on it stick)."""
    aws = c.config.aws
    # The environment is part of the key: boto3 reads it only when a session is made.
    env = (os.environ.get("AWS_PROFILE"), os.environ.get("AWS_DEFAULT_REGION"))
    try:
        found = _session(aws.profile or None, aws.region or None, env)
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


def client(c, service="ec2"):
    return session(c).client(service, config=RETRIES)


def stack(c):
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


def tag_filters(c, role=None, **more):
    """Filters selecting this stack's resources; `more` adds e.g. vpc_id=... (as vpc-id)."""
    filters = [{"Name": "tag:Project", "Values": [stack(c)]}]
    if role:
        filters.append({"Name": "tag:Role", "Values": [role]})
    for name, value in more.items():
        values = value if isinstance(value, list) else [value]
        filters.append({"Name": name.replace("_", "-"), "Values": values})
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
}


def find(c, ec2, kind, role=None, **more):
    """This stack's resources of one kind, found by tags (never by counting or names)."""
    if kind == "instances":
        filters = tag_filters(c, role, instance_state_name=LIVE_STATES, **more)
        pages = ec2.get_paginator("describe_instances").paginate(Filters=filters)
        return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]
    answer = getattr(ec2, f"describe_{kind}")(Filters=tag_filters(c, role, **more))
    return answer[_RESULT_KEYS[kind]]


def find_one(c, ec2, kind, role=None, **more):
    """The one tagged resource, None, or an error if tags match several (fix by hand)."""
    found = find(c, ec2, kind, role, **more)
    if len(found) > 1:
        what = f"{kind} tagged Project={stack(c)}" + (f", Role={role}" if role else "")
        raise Exit(f"found {len(found)} {what}; delete the extra ones, then re-run")
    return found[0] if found else None


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
