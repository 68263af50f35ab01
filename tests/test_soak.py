"""Soak: 32 clients send valid and hostile requests to the real gunicorn back-end for a while.

The back-end is what `fab local` runs (LocalApp: gunicorn, 2 sync workers, the brief
model). Each client draws its own MNIST digits, ones the model reads right when asked
one at a time, and checks every answer against what that request sent: no answer may
leak between concurrent requests. Hostile requests must get their 4xx and JSON reason.
After a warm-up, the workers' RSS is read from /proc; at the end it must not have grown
like a leak, and no worker may have died and been replaced.

SOAK_SECONDS (default 20) sets how long it runs; nothing here asserts speed.
"""
import collections
import concurrent.futures
import io
import os
import random
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from keras_flask import MAX_BODY_BYTES
from tests.canvas import STYLES, data_url, render
from tests.fixtures import MNIST_NPZ
from tests.test_hostile_input import children, gif_frame_declaring, png_declaring, scan_bomb

CLIENTS = 32
SECONDS = float(os.environ.get("SOAK_SECONDS", "20"))
WARM_UP_SECONDS = 4
DIGITS_PER_CLIENT = 4
# A worker's RSS may settle a little higher after the warm-up (allocator arenas, caches),
# not by this much: with 16 kB leaked a request (tried on purpose), each worker grew by
# 35 MB in 20 s at ~250 requests a second on 2 shared cores. Longer runs (SOAK_SECONDS)
# catch smaller leaks.
LEAK_MB = 32


def encoded(image, fmt="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def hostile_requests():
    """(name, body, headers, status, words in the reason): the invalid requests the clients mix in."""
    digit = encoded(Image.fromarray(np.pad(np.full((120, 24), 255, np.uint8), 80)))
    form = {"Content-Type": "application/x-www-form-urlencoded; charset=UTF-8"}
    return [
        ("not base64", b"data:image/png;base64,$$$not-base64$$$", form, 400, "not valid base64"),
        ("truncated PNG", data_url(digit[: len(digit) // 2]).encode(), form, 400, "corrupt or truncated"),
        ("declares 4097x300", data_url(png_declaring(4097, 300, 8, 6)).encode(), form, 400, "4097x300"),
        ("declares 65535x65535", data_url(png_declaring(65535, 65535, 8, 6)).encode(), form, 400, "over 4096x4096"),
        ("GIF frame bomb", data_url(gif_frame_declaring(65535, 65535)).encode(), form, 400, "over 4096x4096"),
        ("blank canvas", data_url(encoded(Image.new("RGBA", (280, 280)))).encode(), form, 422, "no digit drawn"),
        ("BMP", data_url(encoded(Image.new("RGB", (64, 64)), "BMP")).encode(), form, 400, "not an image"),
        ("JPEG scan bomb", data_url(scan_bomb(400, side=64)).encode(), form, 400, "scans"),
        ("JSON wrong type", b'{"image": 5}', {"Content-Type": "application/json"}, 400, "JSON body must be"),
        ("deep JSON", b'{"image":' + b"[" * 50_000, {"Content-Type": "application/json"}, 400, "JSON body must be"),
        ("over the limit", b"data:image/png;base64," + b"A" * MAX_BODY_BYTES, form, 413, "KiB limit"),
        ("empty", b"", {}, 400, "empty body"),
        # Made per request:
        ("random bytes", lambda rng: rng.randbytes(rng.randint(1, 2048)), {}, 400, ""),
        ("a bomb of a new size", lambda rng: data_url(png_declaring(5000, rng.randint(4097, 6710))).encode(),
         form, 400, "5000x"),  # PIL warns about each of these: nothing may pile up
    ]


@pytest.fixture(scope="module")
def known_digits(session_app):
    """(data URL, label) of MNIST test digits, drawn in every canvas style, that the model reads right."""
    with np.load(MNIST_NPZ) as data:
        x, y = data["x_test"][:200], data["y_test"][:200]
    backend_url = session_app.alive().backend_url
    session = requests.Session()
    known = []
    for index, (digit, label) in enumerate(zip(x, y, strict=True)):
        url = data_url(render(digit, STYLES[index % len(STYLES)], 120 + index % 5 * 20))
        if session.post(backend_url + "/predict/", data=url, timeout=10).text == str(label):
            known.append((url, int(label)))
    assert len(known) >= CLIENTS * DIGITS_PER_CLIENT, f"only {len(known)}/200 read right"
    assert len({label for _, label in known}) == 10
    return known


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


class Client:
    """One of the concurrent clients: its own connection, digits and random choices; it records what went wrong."""

    def __init__(self, number, url, digits, hostile):
        self.number, self.url, self.digits, self.hostile = number, url, digits, hostile
        self.random = random.Random(number)
        self.session = requests.Session()
        self.counts = collections.Counter()
        self.failures = []

    def one(self):
        if self.random.random() < 0.6:
            self.valid()
        else:
            self.invalid()

    def valid(self):
        url, label = self.random.choice(self.digits)
        how = self.random.choice(["text", "json-accept", "json-body"])
        if how == "json-body":
            reply = self.session.post(self.url, json={"image": url}, timeout=60)
        else:
            headers = {"Accept": "application/json"} if how == "json-accept" else {}
            reply = self.session.post(self.url, data=url, headers=headers, timeout=60)
        self.counts["valid"] += 1
        if reply.status_code != 200:
            return self.fail(f"valid ({label}, {how}) got {reply.status_code}: {reply.text[:200]}")
        digit = reply.text if how == "text" else str(reply.json()["digit"])
        if digit != str(label):
            self.fail(f"sent a {label} ({how}), answered {digit}")

    def invalid(self):
        name, body, headers, status, reason = self.random.choice(self.hostile)
        if callable(body):
            body = body(self.random)
        reply = self.session.post(self.url, data=body, headers=headers, timeout=60)
        self.counts["invalid"] += 1
        try:
            error = reply.json()["error"]
        except (ValueError, KeyError, TypeError):
            error = None
        if reply.status_code != status or not error or reason not in error:
            self.fail(f"{name}: expected {status} '{reason}', got {reply.status_code}: {reply.text[:200]}")

    def fail(self, what):
        self.counts["failures"] += 1
        if len(self.failures) < 5:
            self.failures.append(f"client {self.number}: {what}")

    def run_until(self, deadline, start):
        start.wait()
        while time.monotonic() < deadline:
            try:
                self.one()
            except (requests.RequestException, ValueError) as error:  # no answer, or not the answer's format
                self.counts["errors"] += 1
                self.fail(f"{type(error).__name__}: {error}")


def run_clients(clients, seconds):
    start = threading.Barrier(len(clients))
    deadline = time.monotonic() + seconds
    with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
        for future in [pool.submit(client.run_until, deadline, start) for client in clients]:
            future.result()
    return sum((client.counts for client in clients), collections.Counter())


def test_soak_32_clients_mixed_requests(local_app, backend_url, known_digits, capsys):
    master = local_app.backend_pid  # the gunicorn master
    workers = children(master)
    assert len(workers) == 2
    hostile = hostile_requests()
    clients = [Client(n, backend_url + "/predict/", known_digits[n::CLIENTS], hostile) for n in range(CLIENTS)]

    warm = run_clients(clients, WARM_UP_SECONDS)
    before = {pid: rss_mb(pid) for pid in [master, *workers]}
    started = time.monotonic()
    total = run_clients(clients, SECONDS) - warm
    elapsed = time.monotonic() - started
    after = {pid: rss_mb(pid) for pid in [master, *workers]}

    requests_sent = total["valid"] + total["invalid"]
    failures = [failure for client in clients for failure in client.failures]
    with capsys.disabled():
        print(f"\n[soak] {CLIENTS} clients, {elapsed:.1f} s after a {WARM_UP_SECONDS} s warm-up "
              f"({warm['valid'] + warm['invalid']} requests): {requests_sent} requests, {total['valid']} valid, "
              f"{total['invalid']} invalid, {total['failures']} failures ({total['errors']} without an answer), "
              f"{requests_sent / elapsed:.0f} requests/s")
        rss = [f"{'master' if pid == master else 'worker'} {pid}: {before[pid]:.1f} -> {after[pid]:.1f}"
               for pid in before]
        print(f"[soak] RSS MB before -> after: {', '.join(rss)}")
        for failure in failures:
            print(f"[soak] {failure}")

    assert total["failures"] == 0, failures
    assert all(client.counts["valid"] and client.counts["invalid"] for client in clients)  # everyone took part
    assert children(master) == workers, "a worker died (crash, timeout or out of memory) and was replaced"
    for pid in before:
        assert after[pid] - before[pid] < LEAK_MB, f"RSS of {pid} grew from {before[pid]:.1f} to {after[pid]:.1f} MB"
    digits = requests.post(backend_url + "/predict/", data=known_digits[0][0], timeout=10).text
    assert digits == str(known_digits[0][1])  # and it still serves
