"""Failures that name what failed, and `deploy`: the whole guide from create-vpc to a
working page, with no inventory: hosts from the AWS state on the moto server."""
import base64
import io
import json
import os
import re
import socket
import subprocess
import threading
import urllib.request
from pathlib import Path

import numpy as np
import paramiko
import pytest
from invoke.exceptions import Exit
from PIL import Image

from tasks import deploy, frontend, hosts, instances, network
from tasks.remote import CLOUD_INIT
from tests.fixtures import MNIST_NPZ, context, free_port
from tests.fixtures.ssh_hosts import captured


@pytest.fixture
def silent_port():
    """A port that accepts TCP connections and never says a word (a hung host)."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True)
    thread.start()
    yield server.getsockname()[1]
    server.close()


def test_unreachable_hosts_are_named(silent_port):
    closed = free_port()
    for spec, reason in ((f"backend@127.0.0.9:{closed}", "refused"),
                         (f"backend@127.0.0.1:{silent_port}", "no answer within 2s")):
        c = context(ssh={"connect_timeout": 2, "hosts": {"backend": spec}})
        with pytest.raises(Exit) as error:
            hosts.connect(c, "backend")
        message = error.value.message
        assert f"cannot reach the backend ({spec})" in message and reason in message.lower(), message


def test_key_paths_are_expanded():
    c = context(ssh={"key": "~/.ssh/digits.pem", "hosts": {"worker": "ubuntu@203.0.113.10"}})
    assert hosts.address(c, "worker") == ("ubuntu", "203.0.113.10", 22, Path.home() / ".ssh/digits.pem")


def test_host_keys_are_trusted_on_first_use_then_required(ssh_hosts, tmp_path):
    known = tmp_path / "stack.known_hosts"
    c = context(**ssh_hosts.config(ssh={"known_hosts": str(known)}))
    entry = f"[127.0.0.3]:{ssh_hosts.port}"
    with hosts.connect(c, "frontend"):
        pass
    recorded = paramiko.HostKeys(str(known)).lookup(entry)
    assert list(recorded) == ["ssh-ed25519"]
    with hosts.connect(c, "frontend"):  # the same key again: accepted, the file unchanged
        pass
    assert paramiko.HostKeys(str(known)).lookup(entry)["ssh-ed25519"] == recorded["ssh-ed25519"]
    # Someone else's key for that address (a replaced machine, or a man in the middle).
    other = paramiko.Ed25519Key.from_private_key_file(str(ssh_hosts.key))
    known.write_text(f"{entry} ssh-ed25519 {other.get_base64()}\n")
    with pytest.raises(Exit) as error:
        hosts.connect(c, "frontend")
    message = error.value.message
    assert message.startswith(f"refusing to connect to the frontend (frontend@127.0.0.3:{ssh_hosts.port}):"
                              f" its host key has changed since it was recorded in {known}"), message
    assert f"delete the line for {entry} from {known}" in message
    assert known.read_text() == f"{entry} ssh-ed25519 {other.get_base64()}\n"  # left for the user to judge


@pytest.mark.parametrize("cloud_init", ["waits", "absent"])
def test_apt_waits_for_cloud_init_where_it_runs(tmp_path, cloud_init):
    """The shell step ensure_apt runs first, on a host with and without cloud-init."""
    if Path("/var/lib/cloud/instance/boot-finished").exists():
        pytest.skip("this machine's own cloud-init has finished: the step would stop there")
    calls = tmp_path / "calls"
    if cloud_init == "waits":
        (tmp_path / "cloud-init").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
        (tmp_path / "cloud-init").chmod(0o755)
    path = f"{tmp_path}:/usr/bin:/bin"
    out = subprocess.run(["sh", "-c", CLOUD_INIT.format(limit=5)], capture_output=True, text=True,
                         env={**os.environ, "PATH": path}, check=True).stdout
    if cloud_init == "waits":
        assert out == "waited\n" and calls.read_text() == "status --wait\n"
    else:
        assert out == "none\n" and not calls.exists()


def test_failed_command_names_host_command_output_and_task(ssh_hosts):
    c = context(**ssh_hosts.config(frontend={"docroot": "/proc/no-such-docroot"}))
    with pytest.raises(Exit) as error:
        frontend.setup_frontend(c, backend_url="http://127.0.0.4:5000")
    message = error.value.message
    assert f"FAILED [setup-frontend] on the frontend (frontend@127.0.0.3:{ssh_hosts.port})" in message
    assert "install -D -m 644" in message and "/proc/no-such-docroot/index.html" in message  # the command
    assert "exited 1" in message and "install:" in message  # its output
    assert message.rstrip().endswith("re-run: fab setup-frontend")


@pytest.fixture
def private_address_here():
    """Factory: give this machine an AWS private address (on lo), as the VPC would route
    it; removed afterwards. The private back-end's sshd and gunicorn listen on 0.0.0.0."""
    added = []

    def add(address):
        subprocess.run(["ip", "address", "add", f"{address}/32", "dev", "lo"], check=True, capture_output=True)
        added.append(address)

    yield add
    for address in added:
        subprocess.run(["ip", "address", "del", f"{address}/32", "dev", "lo"], capture_output=True)


@pytest.mark.slow
def test_deploy_from_create_vpc_with_a_private_backend(aws_context, ssh_hosts, tmp_path, private_address_here):
    """backend.mode private, no inventory, hosts from the AWS state on moto: moto's Elastic
    IPs are 127.x addresses where the test sshd answers; the back-end has none, only its
    private 10.251.1.x address (put on lo here), reached over SSH through the front-end
    and by apache's forwarding. The page calls its own origin."""
    port = free_port("0.0.0.0")
    c = aws_context(
        # Not the machines tier's 192.168.0.0/16 (tests/fixtures/machines.py): a private address of
        # its own, whatever else this machine runs.
        aws={"vpc_cidr": "10.251.0.0/16", "subnet_cidr": "10.251.0.0/24", "private_subnet_cidr": "10.251.1.0/24",
             "second_subnet_cidr": "10.251.2.0/24"},
        ssh={"port": ssh_hosts.port, "connect_timeout": 10, "timeout": 60,
             "known_hosts": str(tmp_path / "known_hosts")},
        train={"artifacts": str(tmp_path / "artifacts"), "data": str(MNIST_NPZ), "epochs": 1, "limit": 6000},
        backend={"port": port, "service": "digits-backend-test-deploy", "mode": "private"},
        # A deploy's test, not the gate's (tests/test_backend.py): the host's serving model may be
        # another test's brief training, as good as this one's give or take a point.
        model={"max_regression": 100},
    )
    assert not any(c.config.ssh.hosts.values())
    ssh_hosts.trust_key_dir(c.config.aws.key_dir)  # cloud-init's part: the instances trust the new key pair
    # The machines first, to learn the back-end's private address; `deploy` then finds them.
    network.create_vpc(c)
    instances.launch(c, no_wait=True)
    saved = json.loads((tmp_path / "state" / f"{c.config.aws.stack}.json").read_text())
    private = saved["instances"]["backend"]["private_ip"]
    assert private.startswith("10.251.1.") and saved["instances"]["backend"]["public_ip"] is None
    private_address_here(private)

    result, printed = captured(deploy.deploy, c)
    state = json.loads((tmp_path / "state" / f"{c.config.aws.stack}.json").read_text())
    ip = {role: state["instances"][role]["public_ip"] for role in ("worker", "frontend")}
    assert all(address.startswith("127.") for address in ip.values()), ip
    for step in ("preflight", "create-vpc", "launch", "setup-worker", "train", "setup-backend", "push-model",
                 "setup-frontend"):
        assert f"== {step}\n" in printed
    # launch logged in to it through the front-end
    assert f"  checked: ssh login on the backend (ubuntu@{private}:{ssh_hosts.port} via frontend)\n" in printed
    assert f"TASK [setup-backend] backend (ubuntu@{private}:{ssh_hosts.port} via frontend)\n" in printed
    assert result["url"] == f"http://{ip['frontend']}/" and f"the app: {result['url']}" in printed
    page = result["url"].rstrip("/")
    assert f"  checked: the back-end answers through the page's origin: {page}/health\n" in printed
    # The page at the front-end's address calls its own origin, which forwards to the back-end.
    with urllib.request.urlopen(result["url"] + "static/config.js", timeout=5) as response:
        assert 'backendUrl: "/"' in response.read().decode()
    with np.load(MNIST_NPZ) as data:
        png = io.BytesIO()
        Image.fromarray(data["x_test"][0]).save(png, format="PNG")
    body = b"data:image/png;base64," + base64.b64encode(png.getvalue())
    request = urllib.request.Request(f"{page}/predict/", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=15) as response:
        assert response.read().decode() == "7"  # MNIST's first test image
    # `fab status` reads the back-end's /metrics through the front-end (SSH): that request is counted.
    status, printed = captured(instances.status, c)
    line = next(line for line in printed.splitlines() if line.startswith("metrics "))
    assert re.fullmatch(r"metrics [\d.]+ req/s, p99 (<= [\d.]+ ms|-), 0 errors \(5xx\), \d+ refused \(4xx\),"
                        r" \d+ corrections today, model [0-9a-f]{12}"
                        r" \(since the service started: \d+ requests\)", line), line
    assert int(re.search(r"started: (\d+) requests", line)[1]) >= 2  # /health through apache, then /predict/
    # Resumable: a second run finds everything in place, even with the state file lost:
    # the hosts' addresses are read back from AWS's tags.
    state_file = tmp_path / "state" / f"{c.config.aws.stack}.json"
    state_file.unlink()
    again, printed = captured(deploy.deploy, c, start_at="setup-worker")
    assert again["changed"] == 0, printed
    assert "== launch: skipped (--start-at setup-worker)" in printed
    assert f"TASK [setup-backend] backend (ubuntu@{private}:{ssh_hosts.port}" in printed
    assert json.loads(state_file.read_text())["instances"]["backend"]["private_ip"] == private
    # Three machines, one sshd: its key was recorded once per address, on first contact,
    # the back-end's at its private address.
    known = paramiko.HostKeys(str(tmp_path / "known_hosts"))
    expected = [*ip.values(), private]
    assert sorted(known.keys()) == sorted(f"[{address}]:{ssh_hosts.port}" for address in expected)
