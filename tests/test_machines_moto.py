"""moto's instances as machines (tests/fixtures/machines.py, MotoMachines): `fab deploy` from
create-vpc to a working page, with no inventory and no code path that knows it is under test:
`launch` makes instances on the moto server, each instance `running` boots a machine at its
private address with the key pair and user-data moto holds, reached at its Elastic IP (a
127.x address moto gives, forwarded to the machine). Then stop-worker, start-worker, a train
on the restarted worker, and destroy, which removes the machines."""
import json
import socket
import time
import urllib.request

import pytest

from tasks import deploy, instances, teardown, worker
from tests.fixtures import MNIST_NPZ, wait_for
from tests.fixtures.ssh_hosts import captured

pytestmark = pytest.mark.slow


def test_deploy_from_create_vpc_on_moto_machines_in_private_mode(aws_context, moto_machines, tmp_path):
    from tests.test_machines_deploy import mnist_body, predict

    c = aws_context(
        ssh={"port": 22, "connect_timeout": 10, "timeout": 180, "known_hosts": str(tmp_path / "known_hosts")},
        train={"artifacts": str(tmp_path / "artifacts"), "data": str(MNIST_NPZ), "epochs": 1, "limit": 6000},
        backend={"mode": "private"},
    )
    started = time.monotonic()
    result, printed = captured(deploy.deploy, c)
    seconds = time.monotonic() - started
    assert not moto_machines.errors, moto_machines.errors
    state = json.loads((tmp_path / "state" / f"{c.config.aws.stack}.json").read_text())
    roles = state["instances"]
    # Each instance is a machine at its private address; the back-end has no public one.
    for role, data in roles.items():
        machine = moto_machines.machine(data["id"])
        assert machine is not None and machine.ip == data["private_ip"], (role, data)
        assert machine.wait_until_running() == "running"
    assert roles["backend"]["private_ip"].startswith("192.168.1.") and roles["backend"]["public_ip"] is None
    assert moto_machines.machine(roles["backend"]["id"]).subnet.name == "private"
    assert all(roles[role]["public_ip"].startswith("127.") for role in ("worker", "frontend"))
    private = roles["backend"]["private_ip"]
    assert f"TASK [setup-backend] backend (ubuntu@{private}:22 via frontend)" in printed
    assert "  checked: ssh backend answers through the front-end\n" in printed or "via frontend" in printed
    assert result["url"] == f"http://{roles['frontend']['public_ip']}/"
    label, body = mnist_body(0)
    assert predict(roles["frontend"]["public_ip"], 80, body) == (200, str(label))
    with urllib.request.urlopen(result["url"] + "static/config.js", timeout=10) as response:
        assert 'backendUrl: "/"' in response.read().decode()
    with pytest.raises(OSError):  # the operator has no way to the private back-end
        socket.create_connection((private, 22), timeout=3).close()
    print(f"\n[moto machines] deploy from create-vpc, private mode: {seconds:.1f}s", flush=True)

    # stop-worker powers the worker's machine off, keeping its disk; start-worker boots it again.
    worker_machine = moto_machines.machine(roles["worker"]["id"])
    boots = worker_machine.boots
    instances.stop_worker(c)
    wait_for(lambda: not worker_machine.is_running(), "the worker's machine to power off")
    instances.start_worker(c)
    wait_for(lambda: worker_machine.is_running() and worker_machine.boots > boots, "the worker to boot again")
    trained, printed = captured(worker.train, c, force=True)
    assert "changed" in printed and trained["changed"] >= 1, printed
    assert worker_machine.exec("test", "-d", "/home/ubuntu/myenv").returncode == 0  # the disk kept its venv

    # destroy: every instance terminated, every machine gone.
    teardown.destroy(c, yes=True)
    wait_for(lambda: not moto_machines.machines, "the machines to be removed")
    assert not moto_machines.errors, moto_machines.errors
