"""Slow and abusive clients, bounded in count and time, only against the test hosts: a slowloris
(connections that send their headers, or their body, a byte at a time), a flood from one address,
and a steady client that keeps asking for a digit meanwhile. Each client has its own loopback
source address (127.0.0.0/8 is all ours), so the edge's per-address limits tell them apart.

Used by tests/test_frontend.py and tests/test_public_edge.py (short runs) and bench/edge.py (30 s,
with the figures).
"""
import base64
import http.client
import io
import json
import multiprocessing
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np


def mnist_digit(index=0):
    """(label, body) of an MNIST test digit as the page posts it: a PNG data URL."""
    from PIL import Image

    from tests.fixtures import MNIST_NPZ

    with np.load(MNIST_NPZ) as data:
        png = io.BytesIO()
        Image.fromarray(data["x_test"][index]).save(png, format="PNG")
        label = int(data["y_test"][index])
    return label, b"data:image/png;base64," + base64.b64encode(png.getvalue())


@dataclass
class Slowloris:
    """`connections` sockets from `source` to (host, port), each sending one byte per `every`
    seconds: of its headers (kind "headers"), or, after its headers and the first `prefix` bytes
    of a `length`-byte body sent at once (past apache's 16 kB read-ahead), of the rest ("body").
    Re-opens what the server closes, so the pressure stays on; counts what happened."""

    host: str
    port: int
    source: str
    kind: str = "headers"
    connections: int = 150
    every: float = 1.0
    length: int = 30_000
    prefix: int = 20_000
    opened: int = 0
    refused: int = 0  # the server closed it before it had sent anything of its own
    answered: dict = field(default_factory=dict)  # status line -> count (apache's 408, ...)
    most_open: int = 0
    cpu_s: float = 0.0  # the attacker's own CPU time (its thread's)

    def _open(self):
        sock = socket.socket()
        sock.settimeout(3)
        try:
            sock.bind((self.source, 0))
            sock.connect((self.host, self.port))
            head = f"POST /predict/ HTTP/1.1\r\nHost: {self.host}\r\n".encode()
            if self.kind == "body":
                head += f"Content-Length: {self.length}\r\nContent-Type: text/plain\r\n\r\n".encode()
                head += b"data:image/png;base64," + b"A" * (self.prefix - 22)
            sock.sendall(head)
        except OSError:
            sock.close()
            self.refused += 1
            return None
        sock.setblocking(False)
        self.opened += 1
        return sock

    def run(self, seconds, stop=None):
        started = time.thread_time()
        try:
            return self._run(seconds, stop)
        finally:
            self.cpu_s = round(self.cpu_s + time.thread_time() - started, 2)

    def _run(self, seconds, stop):
        selector = selectors.DefaultSelector()
        open_ = set()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            while len(open_) < self.connections and time.monotonic() < deadline:
                sock = self._open()
                if sock is None:
                    time.sleep(0.01)  # (a refusal: a moment before the next try)
                    if self.refused > self.opened + self.connections:
                        break
                    continue
                open_.add(sock)
                selector.register(sock, selectors.EVENT_READ)
            self.most_open = max(self.most_open, len(open_))
            tick = time.monotonic() + self.every
            while time.monotonic() < min(tick, deadline):
                for key, _ in selector.select(timeout=max(0.0, min(tick, deadline) - time.monotonic())):
                    self._closed(key.fileobj, selector, open_)
            for sock in list(open_):
                try:
                    sock.send(b"X" if self.kind == "body" else b"x")
                except OSError:
                    self._closed(sock, selector, open_)
        for sock in open_:
            selector.unregister(sock)
            sock.close()
        return self

    def _closed(self, sock, selector, open_):
        try:
            data = sock.recv(200)
        except OSError:
            data = b""
        status = data.split(b"\r\n", 1)[0].decode("latin-1") or "closed"
        self.answered[status] = self.answered.get(status, 0) + 1
        selector.unregister(sock)
        open_.discard(sock)
        sock.close()


@dataclass
class Steady:
    """A person drawing: one digit posted every `every` seconds from `source`, each on a new
    connection (as a browser's idle one would be), until stopped: (latency s, status, body)."""

    host: str
    port: int
    source: str
    body: bytes
    every: float = 0.25
    path: str = "/predict/"
    outcomes: list = field(default_factory=list)

    def post(self, timeout=30):
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout, source_address=(self.source, 0))
        started = time.monotonic()
        try:
            connection.request("POST", self.path, body=self.body, headers={"Content-Type": "text/plain"})
            response = connection.getresponse()
            outcome = (time.monotonic() - started, response.status, response.read().decode("utf-8", "replace"))
        except OSError as error:
            outcome = (time.monotonic() - started, None, f"{type(error).__name__}: {error}")
        finally:
            connection.close()
        self.outcomes.append(outcome)
        return outcome

    def run(self, stop):
        while not stop.is_set():
            self.post()
            stop.wait(self.every)
        return self


def p99(latencies):
    return float(np.percentile(latencies, 99)) if latencies else float("nan")


def under_attack(steady, attackers, seconds, quiet_seconds=0.0):
    """Run `steady` alone for `quiet_seconds`, then with `attackers` for `seconds`:
    (quiet outcomes, outcomes under attack). The attackers run in a process of their own (their
    counts copied back onto them): in this one their loops would hold the GIL the person's
    client waits for, and its latency would be the attacker's, not the server's."""
    stop = threading.Event()
    thread = threading.Thread(target=steady.run, args=(stop,), daemon=True)
    thread.start()
    time.sleep(quiet_seconds)
    quiet = len(steady.outcomes)
    spawn = multiprocessing.get_context("spawn")  # (not fork: this process has threads)
    results, sent = spawn.Pipe(duplex=False)
    child = spawn.Process(target=_attack, args=(attackers, seconds, sent), daemon=True)
    child.start()
    sent.close()
    try:
        done = results.recv() if results.poll(seconds + 60) else []
    except EOFError:
        done = []
    child.join(10)
    stop.set()
    thread.join(60)
    if not done:
        raise RuntimeError(f"the attackers' process sent nothing back (exit code {child.exitcode})")
    for attacker, counted in zip(attackers, done, strict=True):
        attacker.__dict__.update(counted.__dict__)
    return steady.outcomes[:quiet], steady.outcomes[quiet:]


def _attack(attackers, seconds, results):
    """The attackers' process: each in a thread for `seconds`, then their counts sent back."""
    threads = [threading.Thread(target=a.run, args=(seconds,), daemon=True) for a in attackers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    results.send(attackers)
    results.close()


def flood(host, port, source, body, count, path="/predict/"):
    """`count` POSTs as fast as one keep-alive connection goes: [(status, Retry-After, body)]."""
    connection = http.client.HTTPConnection(host, port, timeout=10, source_address=(source, 0))
    answers = []
    try:
        for _ in range(count):
            connection.request("POST", path, body=body, headers={"Content-Type": "text/plain"})
            response = connection.getresponse()
            answers.append((response.status, response.getheader("Retry-After"),
                            response.getheader("Content-Type"), response.read().decode("utf-8", "replace")))
    finally:
        connection.close()
    return answers


def flood_beside_a_person(host, port, body, count, then):
    """`count` bad drawings posted from 127.0.0.1 as fast as they go while a person at 127.0.0.22
    posts `body` every 0.2 s; then `then()`, the person still posting.
    (the flood's answers, the person's outcomes, what `then` returned)."""
    stop, person = threading.Event(), Steady(host, port, "127.0.0.22", body, every=0.2)
    thread = threading.Thread(target=person.run, args=(stop,), daemon=True)
    thread.start()
    try:  # from 127.0.0.1, the browser's own address
        answers = flood(host, port, "127.0.0.1", b"data:image/png;base64,!!", count)
        result = then()
    finally:
        stop.set()
        thread.join(30)
    return answers, person.outcomes, result


def refused_past_the_burst(answers, burst, window):
    """Assert the flood's answers: the bad drawings refused (400) until the burst is spent, 429 from
    then on, the last with Retry-After `window` and a JSON reason; returns that reason."""
    statuses = [a[0] for a in answers]
    first = statuses.index(429)
    assert 0 < first <= burst and set(statuses[:first]) == {400} and set(statuses[first:]) == {429}, statuses
    _, retry_after, content_type, reason = answers[-1]
    assert retry_after == str(window) and content_type == "application/json"
    return json.loads(reason)
