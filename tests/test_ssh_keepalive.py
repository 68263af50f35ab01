"""SSH keepalive on every connection the factory hands out, the jump host's included.

A NAT (an office router, AWS's NAT gateway: 350 s) forgets a TCP connection that carries
nothing for a while; a long silent command (cloud-init's wait, pip installing TensorFlow)
would be cut. Here a proxy on loopback plays that NAT: it drops a connection after
IDLE seconds with no byte either way, and the command stays silent for longer.
"""
import contextlib
import select
import socket
import threading
import time

import pytest

from tasks import hosts
from tests.fixtures import context
from tests.fixtures.ssh_hosts import ADDRESSES

IDLE = 3  # seconds of silence after which the "NAT" forgets a connection


def interval(transport):
    """The keepalive interval paramiko's transport was given (0: none)."""
    return transport.packetizer._Packetizer__keepalive_interval


class IdleDroppingProxy:
    """TCP on 127.0.0.1:<port> to `target`, closing a connection idle for `idle` seconds."""

    def __init__(self, target, idle):
        self.target, self.idle, self.dropped = target, idle, 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        self.server.settimeout(0.2)
        while not self.stop.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                continue
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client, upstream):
        peers, last = {client: upstream, upstream: client}, time.monotonic()
        try:
            while not self.stop.is_set():
                ready, _, _ = select.select(list(peers), [], [], 0.1)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
                    last = time.monotonic()
                if time.monotonic() - last > self.idle:
                    self.dropped += 1
                    return
        except OSError:
            return
        finally:
            for sock in peers:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self):
        self.stop.set()
        self.server.close()


@pytest.fixture
def nat(ssh_hosts):
    """A proxy that drops idle connections, in front of the front-end test host's sshd."""
    proxy = IdleDroppingProxy((ADDRESSES["frontend"], ssh_hosts.port), IDLE)
    yield proxy
    proxy.close()


def config(ssh_hosts, tmp_path, keepalive, **hosts_given):
    given = {**ssh_hosts.hosts, **hosts_given}
    return context(**ssh_hosts.config(ssh={"keepalive": keepalive, "hosts": given,
                                           "known_hosts": str(tmp_path / "known_hosts")}))


def private(c):
    c.config.backend.mode = "private"  # the back-end through the front-end, the jump host
    return c


def test_every_connection_has_a_keepalive(ssh_hosts, tmp_path):
    """Direct, through the jump host (both connections), and after fabric reconnects."""
    direct = hosts.connect(config(ssh_hosts, tmp_path, 7), "worker")
    try:
        assert interval(direct.transport) == 7
        direct.close()
        direct.run("true", hide=True)  # fabric opens it again for the next command
        assert interval(direct.transport) == 7
    finally:
        direct.close()
    jumped = hosts.connect(private(config(ssh_hosts, tmp_path, 7)), "backend")
    try:
        assert isinstance(jumped.gateway, hosts.Host) and jumped.gateway.role == "frontend"
        assert jumped.run("whoami", hide=True).stdout.strip() == "backend"
        assert interval(jumped.transport) == 7 and interval(jumped.gateway.transport) == 7
    finally:
        jumped.close()
    c = context(**ssh_hosts.config(ssh={"known_hosts": str(tmp_path / "known_hosts")}))
    assert c.config.ssh.keepalive == 15  # the default
    with hosts.connect(c, "frontend") as cxn:
        assert interval(cxn.transport) == 15


@pytest.mark.parametrize("route", ["direct", "through the jump host"])
def test_a_silent_command_outlives_an_idle_timeout(ssh_hosts, tmp_path, nat, route):
    """`sleep` twice as long as the NAT's idle timeout: cut without keepalives (the proxy
    really drops), finished with them."""
    spec = f"frontend@127.0.0.1:{nat.port}"
    outcomes = {}
    for keepalive in (0, 1):
        c = config(ssh_hosts, tmp_path, keepalive, frontend=spec)
        role = "frontend" if route == "direct" else "backend"
        if role == "backend":
            private(c)
        cxn = hosts.connect(c, role)
        try:
            result = cxn.run(f"sleep {2 * IDLE}; echo still here", hide=True, warn=True)
            outcomes[keepalive] = result.stdout.strip()
        except Exception as error:  # the connection cut under it: EOF, socket closed...
            outcomes[keepalive] = f"cut ({type(error).__name__})"
        finally:
            with contextlib.suppress(Exception):
                cxn.close()
    assert outcomes[1] == "still here", outcomes
    assert outcomes[0] != "still here" and nat.dropped >= 1, outcomes
