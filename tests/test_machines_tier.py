"""The back-end tier's data plane on machines (tests/fixtures/machines.py, MotoMachines): `fab
scale --backends 3` on the moto server, and each instance the Auto Scaling group starts boots as
a machine that configures itself from its user-data alone: cloud-init installs the service,
pulls the app and the model `current` names from the moto server's S3 (checksum verified),
with the instance profile's credentials from the metadata service (IMDSv2), as on EC2.

Traffic goes through the stand-in for the ALB (tasks/balancer.py: apache mod_proxy_balancer +
mod_proxy_hcheck, members = the target group's registered targets) under clients that never
stop and post as the page does (one retry of a 502/503/504 or a connection error, after the
page's pause: tests/fixtures/load.py post_as_the_page): a rolling push-model (the real swap over
SSH) fails no request and every answer is the old model's or the new one's; a back-end machine
dies (its network dark, no reset): 0 failed requests (what is sent after it, by the balancer's
retry on another member, then its health check; what it had already taken, which no balancer
resends, by the client's retry: counted, printed); then its instance terminated, the group's
replacement boots, configures itself and answers clients through the balancer: the time it
takes is printed."""
import contextlib
import hashlib
import io
import json
import subprocess
import time
import urllib.request

import boto3
import pytest

from tasks import balancer, cloud, keypair, network, tier
from tasks.report import Tally
from tests.fixtures import free_port, wait_for
from tests.fixtures.load import Load, agreed_digits, tally
from tests.fixtures.moto import RAISED, REGION
from tests.test_balancer import APACHE, HTTPD
from tests.test_faults import models  # noqa: F401  (A, B: two models, other bytes, the same digits)

pytestmark = pytest.mark.slow
LITE = "cnn-mnist.tflite"
BOOT = 240  # seconds: a bound against hanging (apt, pip), never a claim about speed
SETTLE = 3  # seconds: 3 of the stand-in's health-check intervals (tasks/balancer.py, hcinterval=1)


def health(address, port):
    """The checksum a back-end's /health reports, or None."""
    try:
        with urllib.request.urlopen(f"http://{address}:{port}/health", timeout=3) as answer:
            return json.loads(answer.read())["model"]["sha256"]
    except (OSError, ValueError, KeyError):
        return None


def predictions(machine, port):
    """How many digits the machine's back-end answered: its /metrics (asked from the machine
    itself, the only place it answers), digits_predictions_total over all digits."""
    text = machine.exec("curl", "-sf", f"http://127.0.0.1:{port}/metrics", check=False).stdout
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("digits_predictions_total{"))


def booted(machine):
    """The machine, once it answers SSH (None before)."""
    return machine if machine is not None and machine.is_running() and machine.answers_ssh() else None


def configured(machine):
    """cloud-init's final state on the machine (its user-data ran to the end, or why not)."""
    try:
        done = machine.exec("cloud-init", "status", "--wait", check=False, timeout=BOOT)
    except subprocess.TimeoutExpired:
        return f"not done after {BOOT}s"
    return done.stdout.strip() + done.stderr.strip()


def test_an_auto_scaling_group_of_machines_behind_the_stand_in_balancer(
        aws_context, account_quotas, moto_machines, models, tmp_path):  # noqa: F811
    account_quotas.values.update(RAISED)
    services = moto_machines.services
    c = aws_context(ssh={"port": 22, "connect_timeout": 10, "timeout": 180,
                         "known_hosts": str(tmp_path / "known_hosts")},
                    backend={"s3_endpoint": services.s3_endpoint})
    port = int(c.config.backend.port)
    old, new = ((models[name] / LITE).read_bytes() for name in "AB")
    old_sha, new_sha = (hashlib.sha256(data).hexdigest() for data in (old, new))
    digits = agreed_digits([models["A"], models["B"]], count=20)
    aws = {"ec2": boto3.client("ec2", region_name=REGION), "s3": boto3.client("s3", region_name=REGION),
           "asg": boto3.client("autoscaling", region_name=REGION)}

    network.create_vpc(c)
    with cloud.AwsRun(c, "launch") as aws_run:  # the stack's key pair (launch's step), for SSH to the back-ends
        keypair.ensure_key_pair(aws_run)
    # The first model in the bucket before the group exists, as push-model leaves it when no
    # back-end is registered: the back-ends start with it.
    s3 = cloud.client(c, "s3")
    with Tally("push-model", "backend-tier") as done:
        bucket = tier.ensure_bucket(c, s3, done)
        tier.upload_model(c, s3, bucket, old, old_sha, done)
    s3.put_object(Bucket=bucket, Key="current", Body=old_sha.encode())

    started = time.monotonic()
    tier.scale(c, backends=3)
    ids = sorted(tier.target_health(c))
    assert len(ids) == 3
    machines = {iid: wait_for(lambda iid=iid: booted(moto_machines.machine(iid)), f"{iid}'s machine", 60)
                for iid in ids}
    for iid, machine in machines.items():
        state = configured(machine)
        if "status: done" not in state:
            print(machine.exec("tail", "-n", "60", "/var/log/cloud-init-output.log", check=False).stdout)
        assert "status: done" in state, iid
        # Configured from its user-data alone: the service up, the model `current` names, verified.
        assert machine.exec("systemctl", "is-active", "digits-backend", check=False).stdout.strip() == "active"
        served = machine.exec("sha256sum", "/opt/digits-backend/models/current/cnn-mnist.tflite").stdout
        assert served.split()[0] == old_sha
        wait_for(lambda m=machine: health(m.ip, port) == old_sha, f"{iid} serving the first model", 60)
        # ...through the instance profile's credentials, which it asked the metadata service for.
        asked = {path for address, path in services.asked if address == machine.ip}
        assert f"/latest/meta-data/iam/security-credentials/{tier.names(c)['role']}" in asked, asked
    boot_seconds = time.monotonic() - started
    assert not moto_machines.errors, moto_machines.errors

    # The stand-in balancer: its members are the registered targets, at their private addresses.
    http_port = free_port()
    events = []  # (time, what): shown with the requests that failed, if any
    (tmp_path / "httpd.conf").write_text(HTTPD.format(root=tmp_path, port=http_port))
    httpd = None
    try:
        with balancer.Sync(c, tmp_path / "balancer.conf", tmp_path / "httpd.pid") as sync:
            registered = {i["id"]: i["private_ip"] for i in tier.registered(c, {"ec2": aws["ec2"],
                                                                                 "elb": cloud.client(c, "elbv2")})}
            assert sync.current == [f"{registered[iid]}:{port}" for iid in ids]
            httpd = subprocess.Popen([APACHE, "-f", str(tmp_path / "httpd.conf"), "-DFOREGROUND"])
            wait_for(lambda: health("127.0.0.1", http_port) == old_sha, "the balancer", 20)
            with Load("127.0.0.1", http_port, digits, clients=4, retry=True) as load:
                load.wait_for_answers(20)

                # A rolling push-model: each back-end out, swapped over SSH, checked, back in.
                def drained_then_swapped(c, instance, digest):
                    # moto's deregistration waiter returns at once; the ALB would drain first (the
                    # deregistration delay): the real swap once the stand-in has dropped the member.
                    member = f"{instance['private_ip']}:{port}"
                    wait_for(lambda: member not in sync.current, f"{member} out of the balancer", 10, 0.05)
                    time.sleep(1)  # requests already sent to it finish (gracefully reloaded apache)
                    events.append((time.monotonic(), f"swap {instance['id']}"))
                    return tier.swap_over_ssh(c, instance, digest)

                rolled_at = time.monotonic()
                tier.push_model(c, new, new_sha, on_backend=drained_then_swapped)
                rolled = time.monotonic() - rolled_at
                assert {iid: health(m.ip, port) for iid, m in machines.items()} == dict.fromkeys(ids, new_sha)
                assert aws["s3"].get_object(Bucket=bucket, Key="current")["Body"].read().decode() == new_sha
                after_roll = time.monotonic()
                load.wait_for_answers(20, since=after_roll, what="answers after the roll")
                # As an ALB sends to a target registered again once it passes the health check, the
                # stand-in does after its first passing check (every second): all members in.
                time.sleep(SETTLE)

                # One back-end's machine dies (its network first: packets dropped, no reset). What
                # the balancer sends it from then on fails to connect (connectiontimeout) and goes to
                # another back-end (the balancer's retry), until its health check takes it out.
                victim = ids[0]
                killed_at = moto_machines.power_off(victim)  # the instant its network went dark
                load.wait_for_answers(40, since=killed_at, what="answers after a back-end died")

                # Its instance terminated: the group launches another, which boots, configures
                # itself from its user-data (the new model: `current`) and is let in by the balancer.
                terminated_at = time.monotonic()
                aws["ec2"].terminate_instances(InstanceIds=[victim])
                replacement = wait_for(lambda: next((i["InstanceId"] for i in aws["asg"].describe_auto_scaling_groups(
                    AutoScalingGroupNames=[tier.names(c)["group"]])["AutoScalingGroups"][0]["Instances"]
                    if i["InstanceId"] not in ids), None), "the group's replacement", 60)
                machine = wait_for(lambda: booted(moto_machines.machine(replacement)), "the replacement's machine",
                                   60)
                wait_for(lambda: health(machine.ip, port) == new_sha, "the replacement to serve", BOOT, 1)
                serving = time.monotonic() - terminated_at
                member = f"{machine.ip}:{port}"
                wait_for(lambda: member in sync.current and f"{registered[victim]}:{port}" not in sync.current,
                         "the balancer to follow the registrations", 30)
                joined_at = time.monotonic()
                # The balancer sends it clients' requests: its own counts have them.
                answered_by_replacement = wait_for(lambda: predictions(machine, port), "predictions by the replacement",
                                                   30)
                in_balancer = time.monotonic() - terminated_at
                load.wait_for_answers(20, since=joined_at, what="answers with the replacement in")
                # `fab status`: each back-end with the model its /health reports over SSH. The
                # replacement's host key is new: recorded and said on stderr, never into the stdout
                # of `status --json`.
                printed = io.StringIO()
                with contextlib.redirect_stdout(printed):
                    described = tier.describe(c)
                shown = {b["id"]: b["model"] for b in described["backends"]}
                assert printed.getvalue() == "" and shown[replacement] == new_sha[:12], (printed.getvalue(), shown)
                assert set(shown.values()) == {new_sha[:12]}, shown
            outcomes = load.outcomes
    finally:
        if httpd:
            httpd.terminate()
            httpd.wait(timeout=10)

    events += [(rolled_at, "roll"), (after_roll, "rolled"), (killed_at, "power off"),
               (terminated_at, "terminate"), (joined_at, "replacement in the balancer")]
    retried = load.retried()
    timeline = "\n".join(f"{when - rolled_at:8.2f} {what}" for when, what in sorted(
        events + [(o.start, f"{o.problem} ({o.end - o.start:.2f}s)") for o in load.failed()]
        + [(o.start, f"retried after {o.retried} ({o.end - o.start:.2f}s)") for o in retried]))
    log = (tmp_path / "error.log").read_text(errors="replace").splitlines()
    why = timeline + "\n" + "\n".join(line for line in log if "proxy" in line)[-3000:]
    # 0 failed requests overall (the roll, the power-off, the replacement). What the dead machine
    # had already taken when it died, no balancer resends (an ALB neither: a POST): the balancer's
    # 504 (or a cut answer) reaches the client, which asks once more as the page does (counted).
    assert load.failed() == [], f"{tally(load.failed())}\n{why}"
    held = [o for o in retried if o.start < killed_at < o.end]  # in flight on the dead machine
    during_roll = [o for o in outcomes if rolled_at <= o.start < after_roll]
    assert during_roll and {o.sha256 for o in during_roll} <= {old_sha, new_sha}
    assert {o.sha256 for o in outcomes if o.ok and o.start >= after_roll} == {new_sha}
    after_death = [o for o in outcomes if o.start >= killed_at]
    assert len(after_death) >= 40 and all(o.ok for o in after_death)
    assert not moto_machines.errors, moto_machines.errors
    print(f"\n[machines tier] 3 back-ends configured from user-data in {boot_seconds:.1f}s; roll {rolled:.1f}s"
          f" ({len(during_roll)} requests, 0 failed); a back-end powered off: {len(after_death)} requests"
          f" started after it, 0 failed; {len(held)} it had taken when it died answered on the client's retry"
          f" ({len(retried)} retried in all: {sorted({o.retried.split(':')[0] for o in retried})}; slowest"
          f" answer {max(o.end - o.start for o in outcomes):.1f}s, the page's budget 10 s);"
          f" replacement serving {serving:.1f}s after the terminate, answering clients through the balancer"
          f" after {in_balancer:.1f}s ({answered_by_replacement:.0f} predictions); {tally(outcomes)}", flush=True)
