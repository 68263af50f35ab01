"""The stand-in for the ALB (tasks/balancer.py): a real apache with mod_proxy_balancer and
mod_proxy_hcheck on loopback, its members the target group's registered targets on the moto
server (moto's instances mapped onto loopback ports). Under a client that never stops: a rolling
push-model across 3 back-ends fails no request and every answer is the old model's or the new
one's; then one back-end powered off: every request started after it still answers; then one dies
holding requests it had taken: the balancer answers those 502 (it resends no POST), and clients
that retry as the page does (tests/fixtures/load.py post_as_the_page) get every answer.

The back-ends here are small HTTP servers answering /health and /predict/ with their model's
checksum, as keras_flask does: what is under test is the balancer and the roll, not the app."""
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from tasks import balancer, network, tier
from tests.fixtures import free_port
from tests.fixtures.load import post_as_the_page
from tests.fixtures.moto import RAISED

APACHE = shutil.which("apache2") or "/usr/sbin/apache2"
MODULES = "/usr/lib/apache2/modules"
BACKEND = """
import http.server, json, sys, time
port, model, hold = int(sys.argv[1]), sys.argv[2], len(sys.argv) > 3
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args): pass
    def answer(self, body):
        data = json.dumps(body).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data))); self.end_headers(); self.wfile.write(data)
    def do_GET(self): self.answer({"status": "ok", "model": {"sha256": model}})
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if hold: time.sleep(60)  # taken, never answered: it dies with them
        self.answer({"digit": 7, "model": {"sha256": model}})
http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""
HTTPD = """ServerRoot {root}
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile {root}/httpd.pid
DefaultRuntimeDir {root}
ErrorLog {root}/error.log
User www-data
Group www-data
""" + "".join(f"LoadModule {name}_module {MODULES}/mod_{name}.so\n" for name in (
    "mpm_event", "authz_core", "alias", "slotmem_shm", "proxy", "proxy_http", "proxy_balancer", "proxy_hcheck",
    "lbmethod_byrequests")) + "Include {root}/balancer.conf\n"


class Backend:
    def __init__(self, root, port, model):
        self.root, self.port = root, port
        self.start(model)

    def start(self, model, hold=False):
        self.model = model
        self.process = subprocess.Popen([sys.executable, "-c", BACKEND, str(self.port), model] + ["hold"] * hold)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"back-end on {self.port} did not start")

    def stop(self):
        self.process.kill()
        self.process.wait()


class Client(threading.Thread):
    """POST /predict/ through the balancer in a loop: (start time, status, model) of each request."""

    def __init__(self, url):
        super().__init__(daemon=True)
        self.url, self.results, self.done = url, [], threading.Event()

    def run(self):
        while not self.done.is_set() and len(self.results) < 20000:  # bounded
            started = time.monotonic()
            try:
                request = urllib.request.Request(f"{self.url}/predict/", data=b"{}", method="POST")
                with urllib.request.urlopen(request, timeout=10) as answer:
                    self.results.append((started, answer.status, json.loads(answer.read())["model"]["sha256"]))
            except OSError as error:
                self.results.append((started, getattr(error, "code", None) or repr(error), None))


def test_rolling_push_and_a_dead_backend_behind_the_stand_in_balancer(aws_context, account_quotas, tmp_path):
    account_quotas.values.update(RAISED)
    c = aws_context()
    network.create_vpc(c)
    tier.scale(c, backends=3)
    ids = sorted(tier.target_health(c))
    backends = {instance: Backend(tmp_path, free_port(), "old") for instance in ids}
    address_of = {i: f"127.0.0.1:{b.port}" for i, b in backends.items()}
    port = free_port()
    (tmp_path / "httpd.conf").write_text(HTTPD.format(root=tmp_path, port=port))
    httpd = None
    try:
        with balancer.Sync(c, tmp_path / "balancer.conf", tmp_path / "httpd.pid",
                           address_of=lambda instance: address_of[instance["id"]]) as sync:
            assert sync.current == [address_of[i] for i in ids]  # the registered targets, nothing else
            httpd = subprocess.Popen([APACHE, "-f", str(tmp_path / "httpd.conf"), "-DFOREGROUND"])
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 20
            while True:
                try:
                    urllib.request.urlopen(f"{url}/health", timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, (tmp_path / "error.log").read_text()[-2000:]
                    time.sleep(0.1)
            client = Client(url)
            client.start()
            time.sleep(0.5)

            swapped = []

            def swap(c, instance, digest):
                # The ALB drains a deregistered target; the stand-in drops it at its next sync.
                member = address_of[instance["id"]]
                while member in sync.current:
                    time.sleep(0.05)
                time.sleep(0.3)  # requests already sent to it finish
                backends[instance["id"]].stop()
                backends[instance["id"]].start(digest)
                swapped.append((instance["id"], sync.current.copy()))
                return True

            tier.push_model(c, b"new model", "new", on_backend=swap)
            # A model that fails its health check on the first back-end (here: it never answers
            # /health as "bad"): that one goes back to "new", the roll stops, no client sees "bad".
            with pytest.raises(tier.cloud.StepFailed, match="the roll stopped there"):
                tier.push_model(c, b"bad model", "bad", on_backend=lambda c, i, d: swap(c, i, d) and d != "bad")
            assert [(i, backends[i].model) for i in ids] == [(i, "new") for i in ids]
            time.sleep(1)  # all members back in, answering the new model
            rolled = len(client.results)

            victim = ids[1]
            killed_at = time.monotonic()
            backends[victim].stop()  # powered off, not deregistered: the health check finds it
            time.sleep(3)
            client.done.set()
            client.join(timeout=15)

            # Another dies with requests it had taken (here at once: its process killed, so the
            # balancer reads no answer and says 502; a machine gone dark gets its 504 after 10 s).
            # No balancer resends a POST; a client that retries as the page does gets its answer.
            holder = ids[2]
            backends[holder].stop()
            backends[holder].start("new", hold=True)
            time.sleep(2)  # its 1 s health check passes again: a member, with ids[0]
            held = []
            senders = [threading.Thread(target=lambda: held.append(post_as_the_page("127.0.0.1", port, 7, b"{}")))
                       for _ in range(4)]  # byrequests: 2 to each member
            for sender in senders:
                sender.start()
            time.sleep(1)
            backends[holder].stop()
            for sender in senders:
                sender.join(timeout=30)
    finally:
        if httpd:
            httpd.terminate()
            httpd.wait(timeout=10)
        for backend in backends.values():
            backend.stop()

    during_roll = client.results[:rolled]
    assert [r for r in during_roll if r[1] != 200] == []  # 0 failed requests while rolling
    assert {r[2] for r in during_roll} == {"old", "new"}
    assert {r[2] for r in during_roll[-20:]} == {"new"}
    # Each back-end was out of the balancer while it was swapped, the other two in.
    assert [i for i, _ in swapped] == [*ids, ids[0], ids[0]]  # the roll, then "bad" on the first and back
    for instance, members in swapped:
        assert address_of[instance] not in members and len(members) == 2
    after_kill = [r for r in client.results[rolled:] if r[0] > killed_at]
    assert after_kill and [r for r in after_kill if r[1] != 200] == []  # the balancer retried, then dropped it
    assert len(held) == 4 and all(o.ok for o in held), held
    assert [o.retried for o in held].count("HTTP 502") == 2, held  # the 2 the dying one had taken
    print(f"requests: {rolled} while rolling 3 back-ends, {len(after_kill)} after one was powered off, 0 failed;"
          f" 2 of 4 taken by one that died, answered on the client's retry; {sync.reloads} graceful reloads")
