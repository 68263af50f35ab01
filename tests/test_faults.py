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
import http.client
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

import pytest
from invoke.exceptions import Exit

from tasks import backend
from tasks.config import FILES
from tasks.hosts import Host
from tasks.remote import STAGE, Report, sha256_file
from tests.fixtures import cache_dir, context, free_port, wait_for
from tests.fixtures.load import CLIENTS, Load, agreed_digits, assert_never_wrong, post, tally
from tests.fixtures.processes import alive, children, processes
from tests.fixtures.ssh_cuts import Cut, CutMidway
from tests.fixtures.ssh_hosts import ADDRESSES, captured, forget_models

pytestmark = pytest.mark.slow

DIR = "digits-backend-faults"
SERVICE = "digits-backend-test-faults"  # "digits-backend-test-*": the ssh_hosts teardown stops it too
ANSWERS = 20 * CLIENTS  # right answers wanted before a fault and after it
DIGITS = 40  # distinct test images in the clients' rotation
LITE, KERAS = "cnn-mnist.tflite", "cnn-mnist.keras"


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
    cache = cache_dir(request, f"fault-models-{key}")
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
    here = Deployed(overrides, port, models, digests, agreed_digits(models.values(), DIGITS), ssh_hosts)
    backend.setup_backend(here.context())
    here.push("A")
    assert here.served() == digests["A"]
    for label, body in here.digits:  # the back-end reads them as the check here did
        outcome = post(ADDRESSES["backend"], here.port, label, body)
        assert outcome.ok, outcome
    yield here
    subprocess.run([f"/etc/init.d/{SERVICE}", "stop"], capture_output=True)


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
    workers = wait_for(lambda: len(children(master)) == 2 and children(master), "2 workers")  # after a reload
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

    with Load(ADDRESSES["backend"], deployed.port, deployed.digits) as load:
        load.wait_for_answers(ANSWERS, what="answers before the kill")
        killed_at = time.monotonic()
        os.kill(target, signal.SIGKILL)
        if victim == "worker":
            wait_for(lambda: not alive(processes(), target) and len(children(master)) == 2, "a new worker")
        elif victim == "master":
            wait_for(lambda: (whole() or (None, master))[1] != master, "a new master")
        else:
            wait_for(lambda: not alive(processes(), supervisor), "the supervisor to go")
            load.wait_for_answers(ANSWERS, since=time.monotonic(), what="answers from the unwatched gunicorn")
            status = subprocess.run([f"/etc/init.d/{SERVICE}", "status"], capture_output=True)
            assert status.returncode == 3, status  # not running: the service is its supervisor
            rerun = backend.setup_backend(deployed.context())  # the service is down: started again
        now_supervisor, now_master = wait_for(whole, "the service to be whole again", step=0.1)
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
    assert wait_for(gunicorns, "gunicorn to serve on")
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
    with Load(ADDRESSES["backend"], deployed.port, deployed.digits) as load:
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
        outcome = post(ADDRESSES["backend"], deployed.port, label, body)
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
