"""Failures that name what failed, and `deploy`: the whole guide from create-vpc to a
working page, with no inventory: hosts from the AWS state on the moto server."""
import base64
import io
import json
import socket
import threading
import urllib.request

import numpy as np
import pytest
from invoke.exceptions import Exit
from PIL import Image

from tasks import deploy, frontend, hosts
from tests.conftest import MNIST_NPZ
from tests.fixtures.ssh_hosts import captured, context, free_port


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


def test_failed_command_names_host_command_output_and_task(ssh_hosts):
    c = context(**ssh_hosts.config(frontend={"docroot": "/proc/no-such-docroot"}))
    with pytest.raises(Exit) as error:
        frontend.setup_frontend(c, backend_url="http://127.0.0.4:5000")
    message = error.value.message
    assert f"FAILED [setup-frontend] on the frontend (frontend@127.0.0.3:{ssh_hosts.port})" in message
    assert "install -D -m 644" in message and "/proc/no-such-docroot/index.html" in message  # the command
    assert "exited 1" in message and "install:" in message  # its output
    assert message.rstrip().endswith("re-run: fab setup-frontend")


@pytest.mark.slow
def test_deploy_from_create_vpc_without_inventory(aws_context, ssh_hosts, tmp_path):
    """moto's Elastic IPs are 127.x addresses where the test sshd answers: `launch`
    waits for them, and every remote step reaches its host through the AWS state."""
    port = free_port("0.0.0.0")
    c = aws_context(
        ssh={"port": ssh_hosts.port, "connect_timeout": 10, "timeout": 60},
        train={"artifacts": str(tmp_path / "artifacts"), "data": str(MNIST_NPZ), "epochs": 1, "limit": 6000},
        backend={"port": port, "service": "digits-backend-test-deploy"},
    )
    assert not any(c.config.ssh.hosts.values())
    ssh_hosts.trust_key_dir(c.config.aws.key_dir)  # cloud-init's part: the instances trust the new key pair
    result, printed = captured(deploy.deploy, c)
    state = json.loads((tmp_path / "state" / f"{c.config.aws.stack}.json").read_text())
    ip = {role: state["instances"][role]["public_ip"] for role in ("worker", "frontend", "backend")}
    assert all(address.startswith("127.") for address in ip.values()), ip
    for step in ("create-vpc", "launch", "setup-worker", "train", "setup-backend", "push-model", "setup-frontend"):
        assert f"== {step}\n" in printed
    assert f"TASK [setup-backend] backend (ubuntu@{ip['backend']}:{ssh_hosts.port})" in printed
    assert result["url"] == f"http://{ip['frontend']}/" and f"the app: {result['url']}" in printed
    # The page at the front-end's address, wired to the back-end's address, answers a digit.
    with urllib.request.urlopen(result["url"] + "static/config.js", timeout=5) as response:
        assert f'"http://{ip["backend"]}:{port}"' in response.read().decode()
    with np.load(MNIST_NPZ) as data:
        png = io.BytesIO()
        Image.fromarray(data["x_test"][0]).save(png, format="PNG")
    body = b"data:image/png;base64," + base64.b64encode(png.getvalue())
    request = urllib.request.Request(f"http://{ip['backend']}:{port}/predict/", data=body, method="POST",
                                     headers={"Origin": result["url"].rstrip("/")})
    with urllib.request.urlopen(request, timeout=15) as response:
        assert response.read().decode().strip() in "0123456789"
        assert response.headers["Access-Control-Allow-Origin"] == result["url"].rstrip("/")
    # Resumable: a second run finds everything in place.
    again, printed = captured(deploy.deploy, c, start_at="setup-worker")
    assert again["changed"] == 0, printed
    assert "== launch: skipped (--start-at setup-worker)" in printed
