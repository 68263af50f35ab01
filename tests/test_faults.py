"""Fault tolerance with real processes: nothing a client sees breaks.

- gunicorn's master, one of its workers, or the supervisor SIGKILLed under load: the
  service comes back whole; clients see dropped connections only between the kill
  and the first answer after it, never a wrong digit, a 5xx or any other error;
  `service stop` stops a gunicorn whose supervisor is gone;
- a model pushed and pushed back under load: no failed and no wrong answer, and
  each answer's model checksum switches over once each way;
- the SSH connection cut in the middle of push-model (mid-upload; during a remote
  command) and of setup-backend (mid-upload): a clear error naming the host, the
  step and the task to re-run; the re-run converges to the state of an
  uninterrupted run, and one more changes nothing. Errors that only look like a
  dropped connection are not called one.

One back-end of its own (folder, service, port) on the test host `backend`, with
three models of the same contract and different bytes; 8 concurrent clients post
MNIST test digits that all three models read right (checked first), and compare
each answer with the digit they sent. Run with -s to see the figures.
"""
import base64
import http.client
import io
import json
import os
import pwd
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from invoke.exceptions import Exit
from PIL import Image

from tasks import backend
from tasks.config import FILES
from tasks.hosts import Host
from tasks.remote import STAGE, Report, sha256_file
from tests.fixtures import MNIST_NPZ, context, free_port, wait_for
from tests.fixtures.ssh_hosts import ADDRESSES, captured, forget_models

pytestmark = pytest.mark.slow

DIR = "digits-backend-faults"
SERVICE = "digits-backend-test-faults"  # "digits-backend-test-*": the ssh_hosts teardown stops it too
CLIENTS = 8
ANSWERS = 20 * CLIENTS  # right answers wanted before a fault and after it
DIGITS = 40  # distinct test images in the clients' rotation
SAFETY = 120  # seconds: only a bound against hanging, never a claim about speed
LITE, KERAS = "cnn-mnist.tflite", "cnn-mnist.keras"


# --- Processes on the test host (this machine) ---------------------------------


@dataclass
class Proc:
    pid: int
    ppid: int
    pgrp: int
    uid: int
    state: str
    comm: str
    cmdline: str


def processes():
    """pid -> Proc of every process now (those that vanish meanwhile are left out)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        uid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("Uid:"))
        table[int(entry.name)] = Proc(int(entry.name), int(fields[1]), int(fields[2]), uid, fields[0],
                                      stat[stat.index("(") + 1:stat.rindex(")")], cmdline)
    return table


def alive(table, pid):
    return pid in table and table[pid].state not in "ZX"


def children(pid, table=None):
    table = table or processes()
    return sorted(p.pid for p in table.values() if p.ppid == pid and alive(table, p.pid))


def descendants(pid, table):
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p.pid for p in table.values() if p.ppid == parent]
        found += kids
        todo += kids
    return found


def wait_until(predicate, what, timeout=SAFETY, step=0.05):
    return wait_for(predicate, what, timeout, step)


# --- Models and digits ------------------------------------------------------------

EXPORT = textwrap.dedent("""
    import os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras, tensorflow as tf
    model = keras.models.load_model(sys.argv[1], compile=False)
    for kind, out in zip(("int8", "float16"), sys.argv[2:]):
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if kind == "float16":
            converter.target_spec.supported_types = [tf.float16]
        with open(out + ".part", "wb") as stream:
            stream.write(converter.convert())
        os.replace(out + ".part", out)
""")


@pytest.fixture(scope="module")
def models(trained_model, request):
    """{"A", "B", "C"}: folders of cnn-mnist.keras + .tflite. A is the trained model; B and C
    hold its .keras and a re-export of it (dynamic-range int8, float16): other bytes and
    checksums, the same contract. Cached beside the trained model."""
    key = sha256_file(trained_model / LITE)[:16]
    cache = Path(request.config.cache.mkdir(f"fault-models-{key}"))
    folders = {"A": Path(trained_model), "B": cache / "B", "C": cache / "C"}
    if not all((folders[name] / LITE).is_file() for name in "BC"):
        for name in "BC":
            folders[name].mkdir(exist_ok=True)
        done = subprocess.run([sys.executable, "-c", EXPORT, str(trained_model / KERAS),
                               str(folders["B"] / LITE), str(folders["C"] / LITE)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    for name in "BC":
        if not (folders[name] / KERAS).is_file():
            (folders[name] / KERAS).write_bytes((trained_model / KERAS).read_bytes())
    digests = {name: sha256_file(folder / LITE) for name, folder in folders.items()}
    assert len(set(digests.values())) == 3, digests
    return folders


def canvas_body(image):
    """A 28x28 MNIST image as the page posts a drawing: a 280x280 PNG data URL."""
    png = io.BytesIO()
    Image.fromarray(image).resize((280, 280)).save(png, format="PNG")
    return b"data:image/png;base64," + base64.b64encode(png.getvalue())


def known_digits(models, count=DIGITS):
    """[(label, body)]: MNIST test images that every model reads right, through the
    back-end's own preprocessing and LiteRT (keras_flask), checked here first."""
    from keras_flask import DigitModel, image_bytes_from_body, preprocess

    readers = [DigitModel(folder / LITE) for folder in models.values()]
    with np.load(MNIST_NPZ) as data:
        images, labels = data["x_test"][:400], data["y_test"][:400]
    chosen, each = [], count // 10  # as many of each digit
    for image, label in zip(images, labels, strict=True):
        if sum(known == label for known, _ in chosen) == each:
            continue
        body = canvas_body(image)
        digit = preprocess(image_bytes_from_body(body))
        if all(int(reader.probabilities(digit)[0].argmax()) == int(label) for reader in readers):
            chosen.append((int(label), body))
        if len(chosen) == count:
            break
    assert len(chosen) == count and {label for label, _ in chosen} == set(range(10)), len(chosen)
    return chosen


# --- The back-end under test -------------------------------------------------------


@dataclass
class Deployed:
    overrides: dict
    port: int
    models: dict  # name -> local folder
    digests: dict  # name -> sha256 of the served .tflite
    digits: list  # [(label, body)]
    ssh_hosts: object
    base: Path = field(default_factory=lambda: Path(pwd.getpwnam("backend").pw_dir) / DIR)

    def context(self):
        return context(**self.overrides)

    def push(self, name):
        return backend.push_model(self.context(), model=str(self.models[name]))

    def health(self):
        connection = http.client.HTTPConnection(ADDRESSES["backend"], self.port, timeout=10)
        try:
            connection.request("GET", "/health")
            return json.loads(connection.getresponse().read())
        finally:
            connection.close()

    def served(self):
        return self.health()["model"]["sha256"]

    def pidfile(self, name):
        return Path(f"/run/{SERVICE}/{name}.pid")


@pytest.fixture(scope="module")
def deployed(ssh_hosts, models):
    """setup-backend then push-model A on the `backend` test user: a folder, service and port
    of its own; the chosen digits are checked on it once more."""
    port = free_port("0.0.0.0")
    overrides = ssh_hosts.config(backend={"dir": DIR, "service": SERVICE, "port": port, "workers": 2})
    forget_models("backend", DIR, SERVICE)  # as a fresh host: no model, no service (the venv is kept)
    digests = {name: sha256_file(folder / LITE) for name, folder in models.items()}
    here = Deployed(overrides, port, models, digests, known_digits(models), ssh_hosts)
    backend.setup_backend(here.context())
    here.push("A")
    assert here.served() == digests["A"]
    for label, body in here.digits:  # the back-end reads them as the check here did
        outcome = post(here.port, label, body)
        assert outcome.ok, outcome
    yield here
    subprocess.run([f"/etc/init.d/{SERVICE}", "stop"], capture_output=True)


# --- Clients -------------------------------------------------------------------------


@dataclass
class Outcome:
    expected: int
    start: float
    end: float = 0.0
    status: int = None
    digit: int = None
    sha256: str = None
    error: str = None  # exception class and message, when there was no HTTP answer
    dropped: bool = False  # the error is the connection's: refused, reset, cut short

    @property
    def ok(self):
        return self.error is None and self.status == 200 and self.digit == self.expected


def post(port, label, body, timeout=30):
    """One POST /predict/ on a new connection (as each fetch of the page): an Outcome."""
    outcome = Outcome(expected=label, start=time.monotonic())
    connection = http.client.HTTPConnection(ADDRESSES["backend"], port, timeout=timeout)
    try:
        connection.request("POST", "/predict/", body=body, headers={"Accept": "application/json"})
        response = connection.getresponse()
        data = response.read()
        outcome.status = response.status
        if response.status == 200:
            answer = json.loads(data)
            outcome.digit, outcome.sha256 = answer["digit"], answer["model"]["sha256"]
    except (ConnectionError, http.client.IncompleteRead) as error:  # refused, reset, closed early
        outcome.error, outcome.dropped = f"{type(error).__name__}: {error}", True
    except Exception as error:  # a timeout, garbage: never allowed
        outcome.error = f"{type(error).__name__}: {error}"
    finally:
        connection.close()
        outcome.end = time.monotonic()
    return outcome


class Load:
    """CLIENTS threads posting known digits back to back until stopped; every Outcome kept."""

    def __init__(self, deployed, clients=CLIENTS):
        self.deployed, self.clients = deployed, clients
        self.outcomes, self.stop = [], threading.Event()
        self.threads = [threading.Thread(target=self.client, args=(index,), daemon=True) for index in range(clients)]

    def client(self, index):
        digits = self.deployed.digits
        turn = index
        while not self.stop.is_set():
            label, body = digits[turn % len(digits)]
            outcome = post(self.deployed.port, label, body)
            self.outcomes.append(outcome)
            turn += self.clients
            if outcome.dropped:
                time.sleep(0.02)  # as a client retrying: not a busy loop while nothing listens

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *error):
        self.stop.set()
        for thread in self.threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in self.threads), "a client hung"

    def answered(self, since=float("-inf")):
        return [o for o in list(self.outcomes) if o.ok and o.start >= since]

    def wait_for_answers(self, count, since=float("-inf"), what="answers"):
        return wait_until(lambda: len(self.answered(since)) >= count, f"{count} {what}")


def tally(outcomes):
    """The figures: tried, answered right, dropped connections (by kind), wrong digits, non-200s, others."""
    kinds = {}
    for o in outcomes:
        if o.dropped:
            name = o.error.split(":")[0]
            kinds[name] = kinds.get(name, 0) + 1
    return {"tried": len(outcomes), "answered": sum(o.ok for o in outcomes),
            "dropped": sum(o.dropped for o in outcomes), "dropped_by_kind": kinds,
            "wrong_digit": sum(o.status == 200 and o.digit != o.expected for o in outcomes),
            "http_errors": sum(o.status is not None and o.status != 200 for o in outcomes),
            "other_errors": sum(o.error is not None and not o.dropped for o in outcomes)}


def assert_never_wrong(outcomes):
    """No wrong digit, no non-200 answer (a 5xx above all), no error but a dropped connection."""
    wrong = [o for o in outcomes if o.status == 200 and o.digit != o.expected]
    bad = [o for o in outcomes if o.status is not None and o.status != 200]
    other = [o for o in outcomes if o.error is not None and not o.dropped]
    assert not wrong, wrong[:3]
    assert not bad, bad[:3]
    assert not other, other[:3]


# --- 1. A back-end process killed under load ------------------------------------------


def gunicorns(table=None):
    """pids of this back-end's gunicorn processes (master and workers), running now."""
    table = table or processes()
    program = f"{DIR}/venv/bin/gunicorn -c"  # not the supervisor, whose arguments name it too
    return sorted(p.pid for p in table.values()
                  if program in p.cmdline and "supervise.py" not in p.cmdline and alive(table, p.pid))


@pytest.mark.parametrize("victim", ["master", "worker", "supervisor"])
def test_killed_backend_process_under_load(deployed, victim):
    """SIGKILL gunicorn's master (the supervisor restarts it), one worker (the master
    replaces it) or the supervisor (gunicorn serves on; re-running setup-backend starts
    the service again, which replaces the unwatched gunicorn) while 8 clients post digits:
    dropped connections (refused, reset) only in the restart window, from the kill to the
    first answer after it; never a wrong digit, a 5xx or any other error; then the service
    is whole again (a supervisor, its master, 2 workers, nothing else)."""
    pidfile, supervised = deployed.pidfile("gunicorn"), deployed.pidfile("supervisor")
    if not pidfile.exists():
        pytest.skip("the host runs systemd: its Restart=always is systemd's to test")
    if deployed.served() != deployed.digests["A"]:
        deployed.push("A")
    supervisor, master = int(supervised.read_text()), int(pidfile.read_text())
    workers = wait_until(lambda: len(children(master)) == 2 and children(master), "2 workers")  # after a reload
    assert processes()[master].ppid == supervisor and gunicorns() == sorted([master, *workers])
    target = {"master": master, "worker": workers[0], "supervisor": supervisor}[victim]
    rerun = None

    def whole():
        """(supervisor, master) once the service is a supervisor, its master and 2 workers, only."""
        table = processes()
        try:
            boss, now = int(supervised.read_text()), int(pidfile.read_text())
        except (OSError, ValueError):
            return None
        if alive(table, boss) and alive(table, now) and table[now].ppid == boss:
            kids = children(now, table)
            if len(kids) == 2 and gunicorns(table) == sorted([now, *kids]):
                return boss, now
        return None

    with Load(deployed) as load:
        load.wait_for_answers(ANSWERS, what="answers before the kill")
        killed_at = time.monotonic()
        os.kill(target, signal.SIGKILL)
        if victim == "worker":
            wait_until(lambda: not alive(processes(), target) and len(children(master)) == 2, "a new worker")
        elif victim == "master":
            wait_until(lambda: (whole() or (None, master))[1] != master, "a new master")
        else:
            wait_until(lambda: not alive(processes(), supervisor), "the supervisor to go")
            load.wait_for_answers(ANSWERS, since=time.monotonic(), what="answers from the unwatched gunicorn")
            status = subprocess.run([f"/etc/init.d/{SERVICE}", "status"], capture_output=True)
            assert status.returncode == 3, status  # not running: the service is its supervisor
            rerun = backend.setup_backend(deployed.context())  # the service is down: started again
        now_supervisor, now_master = wait_until(whole, "the service to be whole again", step=0.1)
        settled = time.monotonic()
        load.wait_for_answers(ANSWERS, since=settled, what="answers after the restart")
    outcomes = load.outcomes
    figures = tally(outcomes)
    errors = [o for o in outcomes if o.error is not None]
    # The restart window: from the kill to the first answer to a request sent after it (after
    # the first dropped connection, if any: in the moment before the supervisor stops them,
    # the dead master's workers may still answer a request or two, before the outage).
    outage = min((o.end for o in errors if o.end >= killed_at), default=killed_at)
    back = min(o.end for o in outcomes if o.ok and o.start >= outage)
    outside = [o for o in errors if o.end < killed_at or o.start > back]
    print(f"\n[{victim} SIGKILLed under load, {CLIENTS} clients] restart window {back - killed_at:.3f}s"
          f" (kill -> first answer after the outage; the outage itself {back - outage:.3f}s);"
          f" whole again after {settled - killed_at:.3f}s;"
          f" answered between the kill and the outage: {sum(o.ok and killed_at <= o.start < outage for o in outcomes)};"
          f" {figures}", flush=True)
    assert_never_wrong(outcomes)
    assert not outside, (f"dropped outside the restart window [0, {back - killed_at:.3f}s] (times from the kill):",
                         [(round(o.start - killed_at, 3), round(o.end - killed_at, 3), o.error) for o in outside[:5]])
    assert len([o for o in outcomes if o.ok and o.end < killed_at]) >= ANSWERS
    assert len([o for o in outcomes if o.ok and o.start > back]) >= ANSWERS
    assert (now_supervisor == supervisor) == (victim != "supervisor")
    assert (now_master == master) == (victim == "worker")
    if victim == "supervisor":
        assert rerun["changed"] == 1, rerun  # "service ... started"; nothing else to do
    assert deployed.served() == deployed.digests["A"]


def test_service_stop_stops_an_unwatched_gunicorn(deployed):
    """`service stop` with the supervisor gone (SIGKILLed) still stops gunicorn, which
    runs in a process group of its own; `service start` (setup-backend) brings all back."""
    if not deployed.pidfile("gunicorn").exists():
        pytest.skip("the host runs systemd")
    os.kill(int(deployed.pidfile("supervisor").read_text()), signal.SIGKILL)
    assert wait_until(gunicorns, "gunicorn to serve on")
    stopped = subprocess.run([f"/etc/init.d/{SERVICE}", "stop"], capture_output=True, text=True)
    assert stopped.returncode == 0, stopped
    assert gunicorns() == [] and not deployed.pidfile("gunicorn").exists()
    assert backend.setup_backend(deployed.context())["changed"] == 1
    assert len(gunicorns()) == 3 and deployed.served() == deployed.digests["A"]


# --- 2. Model swap under load ----------------------------------------------------------------


def test_model_swap_under_load(deployed):
    """push-model B, then A again, while 8 clients post digits: every request answered with
    the right digit; each answer names its model, and the switch-over happens once each way."""
    a, b = deployed.digests["A"], deployed.digests["B"]
    if deployed.served() != a:
        deployed.push("A")
    with Load(deployed) as load:
        load.wait_for_answers(ANSWERS, what="answers before the push")
        to_b = time.monotonic()
        pushed_b = deployed.push("B")
        on_b = time.monotonic()
        load.wait_for_answers(ANSWERS, since=on_b, what="answers from model B")
        to_a = time.monotonic()
        pushed_a = deployed.push("A")
        on_a = time.monotonic()
        load.wait_for_answers(ANSWERS, since=on_a, what="answers from model A again")
    outcomes = sorted(load.outcomes, key=lambda o: o.start)
    figures = tally(outcomes)
    served = {"A": sum(o.sha256 == a for o in outcomes), "B": sum(o.sha256 == b for o in outcomes)}
    print(f"\n[model swap A -> B -> A under load, {CLIENTS} clients] {figures}; answers by model {served};"
          f" pushes took {on_b - to_b:.1f}s and {on_a - to_a:.1f}s", flush=True)
    assert pushed_b["changed"] >= 1 and pushed_a["changed"] >= 1, (pushed_b, pushed_a)
    assert_never_wrong(outcomes)
    assert figures["answered"] == figures["tried"], [o for o in outcomes if not o.ok][:3]
    assert {o.sha256 for o in outcomes} == {a, b}
    assert all(o.sha256 == a for o in outcomes if o.end < to_b)
    assert all(o.sha256 == b for o in outcomes if o.start > on_b and o.end < to_a)
    assert all(o.sha256 == a for o in outcomes if o.start > on_a)
    for start, until, old, new in ((to_b, to_a, a, b), (to_a, float("inf"), b, a)):
        # Once one answer came from the new model, no request sent later (until the next push)
        # reaches the old one: the switch-over is clean, no back and forth.
        switched = min(o.end for o in outcomes if o.start >= start and o.sha256 == new)
        late = [o for o in outcomes if switched < o.start < until and o.sha256 == old]
        assert not late, (f"answered by the old model {old[:12]} after the switch (times from it):",
                          [(round(o.start - switched, 3), round(o.end - switched, 3)) for o in late[:5]])
    assert deployed.served() == a


# --- 3. The SSH connection cut in the middle of a task --------------------------------------


def sshd_sessions(ssh_hosts, user):
    """This test session's sshd processes that serve `user` (as `pkill -u USER sshd`, but
    only under this run's sshd: other runs' connections are left alone)."""
    master = int((ssh_hosts.log.parent / "sshd.pid").read_text())
    table = processes()
    uid = pwd.getpwnam(user).pw_uid
    return [pid for pid in descendants(master, table) if table[pid].comm == "sshd" and table[pid].uid == uid]


class Cut(threading.Thread):
    """Once `trigger()` holds, SIGKILL the sshd session processes of the user `backend`."""

    def __init__(self, ssh_hosts, trigger):
        super().__init__(daemon=True)
        self.ssh_hosts, self.trigger = ssh_hosts, trigger
        self.killed, self.done, self.stop = [], threading.Event(), threading.Event()

    def run(self):
        deadline = time.monotonic() + SAFETY
        while not self.stop.is_set() and time.monotonic() < deadline:
            if self.trigger():
                for pid in sshd_sessions(self.ssh_hosts, "backend"):
                    try:
                        os.kill(pid, signal.SIGKILL)
                        self.killed.append(pid)
                    except ProcessLookupError:
                        pass
                break
            time.sleep(0.01)
        self.done.set()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *error):
        self.stop.set()
        self.join(30)


class CutMidway(io.FileIO):
    """A local file whose upload stalls after `after` bytes until the connection is cut,
    so that the cut falls in the middle of the transfer."""

    def __init__(self, path, after, reached, cut, cxn):
        super().__init__(path, "rb")
        self.after, self.reached, self.cut, self.cxn, self.sent = after, reached, cut, cxn, 0

    def read(self, size=-1):
        data = super().read(size)
        self.sent += len(data)
        if self.sent >= self.after and not self.reached.is_set():
            self.reached.set()
            assert self.cut.done.wait(SAFETY)
            wait_until(lambda: not self.cxn.transport.is_active(), "paramiko to see the connection drop")
        return data


def models_state(deployed):
    """What the back-end's models folder holds: {name: link target, or {file: sha256}}."""
    state = {}
    for entry in sorted((deployed.base / "models").iterdir()):
        if entry.is_symlink():
            state[entry.name] = ("->", os.readlink(entry))
        elif entry.is_dir():
            state[entry.name] = {f.name: sha256_file(f) for f in sorted(entry.iterdir())}
        else:
            state[entry.name] = sha256_file(entry)
    return state


def test_ssh_cut_mid_push_then_rerun_converges(deployed, monkeypatch):
    """push-model C, its SSH connection killed on the host mid-upload, then again during the
    remote check of the model: each time a clear error (host, step, re-run) and A still
    served; the re-run ends as an uninterrupted push would, and one more changes nothing."""
    c = deployed.context()
    if deployed.served() != deployed.digests["A"]:
        deployed.push("A")
    version = deployed.digests["C"][:12]
    models = deployed.base / "models"
    incoming = models / f".incoming-{version}"
    before = models_state(deployed)
    assert version not in before and before["current"] == ("->", deployed.digests["A"][:12]), before
    where = f"FAILED [push-model] on the backend (backend@{ADDRESSES['backend']}:{deployed.ssh_hosts.port}):"
    size = (deployed.models["C"] / KERAS).stat().st_size

    # 1. Mid-upload: after 512 KiB of the .keras went out.
    reached, real_put = threading.Event(), Host.put

    def put(cxn, local, remote=None, *args, **kwargs):
        if ".incoming-" in str(remote) and str(local).endswith(KERAS) and not reached.is_set():
            local = CutMidway(local, 512 * 1024, reached, cut, cxn)
        return real_put(cxn, local, remote, *args, **kwargs)

    monkeypatch.setattr(Host, "put", put)
    with Cut(deployed.ssh_hosts, reached.is_set) as cut:
        with pytest.raises(Exit) as failed:
            captured(backend.push_model, c, model=str(deployed.models["C"]))
    monkeypatch.undo()
    message = failed.value.message
    print(f"\n[cut mid-upload] killed sshd {cut.killed}:\n{message}", flush=True)
    assert cut.killed, "no sshd session process of `backend` was found to kill"
    assert message.startswith(f"{where} the SSH connection was lost while uploading {incoming / KERAS} ("), message
    assert message.endswith("\n  re-run: fab push-model"), message
    assert "Traceback" not in message
    left = incoming / KERAS
    assert left.is_file() and 0 < left.stat().st_size < size  # really cut half-way
    assert deployed.served() == deployed.digests["A"] and models_state(deployed).get(version) is None
    assert os.readlink(models / "current") == deployed.digests["A"][:12]

    # 2. During a remote command: `keras_flask.py --check` of the uploaded model.
    def checking():
        return any(p.uid == pwd.getpwnam("backend").pw_uid and f"{DIR}/app/keras_flask.py --check" in p.cmdline
                   for p in processes().values())

    with Cut(deployed.ssh_hosts, checking) as cut:
        with pytest.raises(Exit) as failed:
            captured(backend.push_model, c, model=str(deployed.models["C"]))
    message = failed.value.message
    print(f"\n[cut during a remote command] killed sshd {cut.killed}:\n{message}", flush=True)
    assert cut.killed
    assert message.startswith(f"{where} the SSH connection was lost while running `"), message
    assert f"/app/keras_flask.py --check {incoming / LITE}`" in message.splitlines()[0], message
    assert message.endswith("\n  re-run: fab push-model"), message
    assert deployed.served() == deployed.digests["A"] and os.readlink(models / "current") == deployed.digests["A"][:12]

    # 3. The re-run: the end state of an uninterrupted push, nothing left over or twice.
    result, printed = captured(backend.push_model, c, model=str(deployed.models["C"]))
    assert result["changed"] >= 2, result  # uploaded and swapped in, reloaded
    expected = {**before, version: {KERAS: sha256_file(deployed.models["C"] / KERAS),
                                    LITE: deployed.digests["C"]}, "current": ("->", version)}
    assert models_state(deployed) == expected  # no .incoming-*, no .current.new, one folder for C
    assert deployed.served() == deployed.digests["C"]
    for label, body in deployed.digits[:10]:
        outcome = post(deployed.port, label, body)
        assert outcome.ok and outcome.sha256 == deployed.digests["C"], outcome
    # 4. Once more: nothing to do.
    again, printed = captured(backend.push_model, c, model=str(deployed.models["C"]))
    assert again["changed"] == 0 and f"ok: model {version} in place" in printed, (again, printed)
    assert models_state(deployed) == expected


def test_ssh_cut_mid_setup_then_rerun_converges(deployed, monkeypatch):
    """setup-backend, its SSH connection killed while it uploads keras_flask.py to its
    staging file: a clear error, the app file untouched; the re-run moves the whole file
    into place, leaves no staging file, reloads; one more run changes nothing."""
    c = deployed.context()
    app = deployed.base / "app" / "keras_flask.py"
    digest = sha256_file(FILES / "keras_flask.py")
    with app.open("a") as stream:  # as an older version: setup-backend uploads it again
        stream.write("# an older version\n")
    older = sha256_file(app)
    stage = Path(pwd.getpwnam("backend").pw_dir) / STAGE / f"keras_flask.py.{digest[:12]}"
    where = f"FAILED [setup-backend] on the backend (backend@{ADDRESSES['backend']}:{deployed.ssh_hosts.port}):"
    reached, real_put = threading.Event(), Host.put

    def put(cxn, local, remote=None, *args, **kwargs):
        if str(remote) == str(stage) and not reached.is_set():
            local = CutMidway(local, 1, reached, cut, cxn)
        return real_put(cxn, local, remote, *args, **kwargs)

    monkeypatch.setattr(Host, "put", put)
    with Cut(deployed.ssh_hosts, reached.is_set) as cut:
        with pytest.raises(Exit) as failed:
            captured(backend.setup_backend, c)
    monkeypatch.undo()
    message = failed.value.message
    print(f"\n[cut mid-upload, setup-backend] killed sshd {cut.killed}:\n{message}", flush=True)
    assert cut.killed
    assert message.startswith(f"{where} the SSH connection was lost while uploading {stage} ("), message
    assert message.endswith("\n  re-run: fab setup-backend"), message
    assert sha256_file(app) == older  # never half a file in place: the stage is moved only when whole
    served = deployed.served()
    result, printed = captured(backend.setup_backend, c)
    assert result["changed"] >= 2 and f"changed: {app}\n" in printed and "reloaded" in printed, result
    assert sha256_file(app) == digest and not stage.exists()
    assert deployed.served() == served
    again = backend.setup_backend(c)
    assert again["changed"] == 0, again


def test_failures_on_a_live_connection_are_not_called_lost(deployed, tmp_path):
    """What only looks like a dropped connection keeps its own error: a local file that
    is not there (an OSError), a remote command killed by a signal (no exit status)."""
    c = deployed.context()
    with pytest.raises(FileNotFoundError):
        with Report(c, "probe", "backend") as r:
            r.cxn.put(str(tmp_path / "missing"), f"{tmp_path}/missing")
    with Report(c, "probe", "backend") as r:
        killed = r.cxn.run("kill -KILL $$", hide=True, warn=True)
        assert killed.exited == -1 and r.cxn.transport.is_active()
        assert r.cxn.run("echo alive", hide=True).stdout == "alive\n"
    with pytest.raises(Exit) as failed:
        with Report(c, "probe", "backend") as r:
            r.cxn.run("echo out; exit 3", hide=True)
    where = f"backend (backend@{ADDRESSES['backend']}:{deployed.ssh_hosts.port})"
    assert failed.value.message == (f"FAILED [probe] on the {where}: "
                                    f"`echo out; exit 3` exited 3\nout\n  re-run: fab probe")
