"""The Back-End over real SSH: the gunicorn service, model swaps, refusals, restarts.

The back-end serves the model the test worker trained (`backend_deployed`).
"""
import base64
import io
import json
import os
import pwd
import shutil
import signal
import sqlite3
import threading
import time
import urllib.request
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import numpy as np
import pytest
from invoke.exceptions import Exit
from PIL import Image

from tasks import backend, corrections, registry
from tasks.hosts import Host
from tasks.remote import service_log, sha256_file
from tests.fixtures import MNIST_NPZ, context
from tests.fixtures.ssh_hosts import captured

pytestmark = pytest.mark.slow


def health(scenario):
    with urllib.request.urlopen(f"{scenario.backend_url}/health", timeout=5) as response:
        return json.load(response)


def digit_request(scenario):
    """A POST of MNIST's first test image (a 7) as a canvas-like PNG data URL."""
    with np.load(MNIST_NPZ) as data:
        image = data["x_test"][0]
    png = io.BytesIO()
    Image.fromarray(image).resize((280, 280)).save(png, format="PNG")
    body = b"data:image/png;base64," + base64.b64encode(png.getvalue())
    return urllib.request.Request(f"{scenario.backend_url}/predict/", data=body,
                                  headers={"Accept": "application/json"}, method="POST")


def on_host(scenario):
    """The back-end's models folder, read directly (the test host is this machine)."""
    return Path(pwd.getpwnam("backend").pw_dir) / "digits-backend" / "models"


@pytest.fixture(scope="module")
def other_models(backend_deployed, tmp_path_factory):
    """Two more models: `new` (the worker's, quantised: other bytes, same contract),
    saved under the user's own names other-name.tflite + other-name.keras, and
    `wrong` (10 -> 5 outputs: loads, but breaks the contract)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    folder = tmp_path_factory.mktemp("models")
    model = keras.models.load_model(backend_deployed.artifacts / "cnn-mnist.keras", compile=False)
    wrong = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(5, activation="softmax")])
    for name, net, optimise in (("new", model, True), ("wrong", wrong, False)):
        converter = tf.lite.TFLiteConverter.from_keras_model(net)
        if optimise:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        (folder / name).mkdir()
        (folder / name / "cnn-mnist.tflite").write_bytes(converter.convert())
    (folder / "new" / "cnn-mnist.tflite").rename(folder / "new" / "other-name.tflite")
    shutil.copy(backend_deployed.artifacts / "cnn-mnist.keras", folder / "new" / "other-name.keras")
    return folder


def test_deployed_backend_serves_the_workers_model(backend_deployed):
    """The back-end host starts with no model (`e2e` forgets them): setup-backend installs
    the service and leaves it to push-model, which uploads, checks, starts and verifies."""
    service, port = "digits-backend-test-e2e", backend_deployed.port
    lite = sha256_file(backend_deployed.artifacts / "cnn-mnist.tflite")
    setup, printed = backend_deployed.results["setup-backend"]
    assert f"  ok: service {service} waits for a model: `fab push-model` starts it\n" in printed
    assert "/app/gunicorn.conf.py\n" in printed
    pushed, printed = backend_deployed.results["push-model"]
    for line in ("checked: checksums verified on arrival (cnn-mnist.keras, cnn-mnist.tflite)",
                 "checked: cnn-mnist.tflite loads and maps (1,28,28,1) to 10 probabilities",
                 f"changed: model {lite[:12]} swapped in (models/current -> {lite[:12]}, was none)",
                 f"changed: service {service} started",
                 f"checked: /health on port {port} serves model sha256 {lite[:12]}"):
        assert f"  {line}\n" in printed, line
    assert pushed["changed"] == 2 and pushed["checked"] == 3, pushed
    assert health(backend_deployed)["model"]["sha256"] == lite


def test_corrupt_or_wrong_shaped_model_is_refused(backend_deployed, other_models, tmp_path):
    c = backend_deployed.context()
    before = health(backend_deployed)["model"]["sha256"]
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "cnn-mnist.tflite").write_bytes(os.urandom(50_000))
    for folder in (corrupt, other_models / "wrong"):
        with pytest.raises(Exit) as refused:
            backend.push_model(c, model=str(folder))
        message = str(refused.value.message)
        assert "model refused" in message and "keeps serving" in message, message
        assert "backend (backend@127.0.0.4" in message and "re-run: fab push-model" in message
        assert health(backend_deployed)["model"]["sha256"] == before
    assert "(1, 5)" in message  # the wrong shape is named


def test_new_model_is_swapped_in_without_a_failed_request(backend_deployed, other_models):
    """Pushed under the user's own file names: served as cnn-mnist.* all the same."""
    c = backend_deployed.context()
    new = sha256_file(other_models / "new" / "other-name.tflite")
    stop, answers, failures = threading.Event(), [], []

    def poll():
        while not stop.is_set():
            try:
                with urllib.request.urlopen(digit_request(backend_deployed), timeout=15) as response:
                    answers.append(json.load(response))
            except Exception as error:  # any failed request fails the test
                failures.append(repr(error))

    client = threading.Thread(target=poll, daemon=True)
    client.start()
    try:
        time.sleep(1)
        result = backend.push_model(c, model=str(other_models / "new" / "other-name.tflite"))
        assert result["changed"] >= 1
        served_before = len(answers)
        time.sleep(2)
    finally:
        stop.set()
        client.join(20)
    assert not failures, failures[:3]
    assert served_before > 5 and len(answers) > served_before
    assert health(backend_deployed)["model"]["sha256"] == new
    assert answers[-1]["model"]["sha256"] == new and answers[0]["model"]["sha256"] != new
    assert {a["digit"] for a in answers} == {7}
    arrived = on_host(backend_deployed) / new[:12]
    assert sorted(p.name for p in arrived.iterdir()) == ["cnn-mnist.keras", "cnn-mnist.tflite"]
    assert sha256_file(arrived / "cnn-mnist.keras") == sha256_file(other_models / "new" / "other-name.keras")
    # Back to the worker's model (a rollback is a push like any other).
    assert backend.push_model(c)["changed"] >= 1
    assert health(backend_deployed)["model"]["sha256"] == sha256_file(backend_deployed.artifacts / "cnn-mnist.tflite")


def test_model_not_served_after_the_reload_is_rolled_back(backend_deployed, other_models, monkeypatch):
    """A model can pass --check and still not be served (simulated here: the wait for it
    gives up): the previous model is pointed at and served again, and the push fails."""
    c = backend_deployed.context()
    before = health(backend_deployed)["model"]["sha256"]
    new = sha256_file(other_models / "new" / "other-name.tflite")
    real = backend.wait_for_model
    monkeypatch.setattr(backend, "wait_for_model",
                        lambda c, cxn, paths, digest, *more: digest != new and real(c, cxn, paths, digest, *more))
    with pytest.raises(Exit) as error:
        backend.push_model(c, model=str(other_models / "new" / "other-name.tflite"))
    message = error.value.message
    assert (f"/health did not report model {new[:12]} within 90s of the reload: rolled back to model"
            f" {before[:12]}, which serves again; tail -n 30 /home/backend/digits-backend/backend.log:\n") in message
    assert os.readlink(on_host(backend_deployed) / "current") == before[:12]
    assert health(backend_deployed)["model"]["sha256"] == before


def test_killed_backend_comes_back(backend_deployed):
    service = backend_deployed.context().config.backend.service
    pidfile = Path(f"/run/{service}/gunicorn.pid")
    if not pidfile.exists():
        pytest.skip("the host runs systemd: its Restart=always is systemd's to test")
    master = int(pidfile.read_text())
    os.kill(master, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            answer = health(backend_deployed)
            if int(pidfile.read_text()) != master:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    else:
        pytest.fail(f"the back-end did not come back within 60s after its master {master} was killed")
    assert answer["status"] == "ok"
    with urllib.request.urlopen(digit_request(backend_deployed), timeout=15) as response:
        assert json.load(response)["digit"] == 7


def post_correction(scenario, label):
    body = json.dumps({"label": label, "predicted": (label + 1) % 10,
                       "input": base64.b64encode(bytes([label * 20]) * 784).decode()}).encode()
    request = urllib.request.Request(f"{scenario.backend_url}/feedback", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=15) as response:
        assert response.status == 201
        return json.load(response)["id"]


def test_corrections_are_pulled_and_metrics_read_over_ssh(backend_deployed, tmp_path):
    """The service writes its state folder (corrections and metrics); fab metrics and
    fab pull-feedback read them through SSH, and --clear deletes only what was pulled."""
    c = backend_deployed.context()
    posted = {post_correction(backend_deployed, label): label for label in (1, 2, 3)}
    result, printed = captured(corrections.metrics, c, interval=0.5)
    assert result["metrics"]["corrections"] >= 3 and result["metrics"]["errors_5xx"] == 0, printed
    assert "  checked: back-end 127.0.0.4: " in printed and " req/s, p99 <= " in printed
    today = result["metrics"]["corrections_today"]
    assert today >= 3 and f", {today} corrections today, " in printed

    result, printed = captured(corrections.pull_feedback, c, to=str(tmp_path))
    with np.load(tmp_path / "corrections.npz") as pulled:
        got = dict(zip(pulled["ids"].tolist(), pulled["y_train"].tolist(), strict=True))
        assert pulled["x_train"].shape[1:] == (28, 28)
    assert {i: got[i] for i in posted} == posted and result["new"] == len(got) >= 3
    assert (tmp_path / "corrections.png").stat().st_size > 0
    result, printed = captured(corrections.pull_feedback, c, to=str(tmp_path))
    assert result["new"] == 0 and "  ok: 0 new corrections since the last pull" in printed

    newer = post_correction(backend_deployed, 4)
    result, printed = captured(corrections.pull_feedback, c, to=str(tmp_path), clear=True)
    assert result["new"] == 1 and f"deleted on the back-end (ids up to {newer})" in printed
    database = on_host(backend_deployed).parent / "state" / "corrections.sqlite"
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT COUNT(*) FROM corrections").fetchone() == (0,)
    after = post_correction(backend_deployed, 5)  # ids go on growing: a pull's mark stays valid
    assert after > newer
    # "Corrections today" counts what was stored since midnight, deleted by the pull or not.
    assert captured(corrections.metrics, c, interval=0.5)[0]["metrics"]["corrections_today"] == today + 2


def test_push_from_worker_relays_what_the_worker_trained(backend_deployed):
    """The guide's `scp cnn-mnist` from the worker, relayed over SFTP: the same model, in place."""
    result, printed = captured(backend.push_model, backend_deployed.context(), from_worker=True)
    assert "fetched cnn-mnist.keras, cnn-mnist.tflite from the worker (worker@127.0.0.2" in printed
    assert result["changed"] == 0 and "in place" in printed


def test_accuracy_gate_registry_and_rollback(backend_deployed, other_models, tmp_path):
    """A model measured worse than the serving one is refused (then pushed with --force);
    fab models lists both; fab rollback-model serves the earlier one with no failed request."""
    c = backend_deployed.context()
    artifacts = backend_deployed.artifacts
    ours = sha256_file(artifacts / "cnn-mnist.tflite")
    assert health(backend_deployed)["model"]["sha256"] == ours
    serving = json.loads((artifacts / "metrics.json").read_text())["test_accuracy"]
    worse = tmp_path / "worse"
    worse.mkdir()
    shutil.copy(other_models / "new" / "other-name.tflite", worse / "cnn-mnist.tflite")
    shutil.copy(other_models / "new" / "other-name.keras", worse / "cnn-mnist.keras")
    (worse / "metrics.json").write_text(json.dumps({"test_accuracy": serving - 0.01, "feedback": {"corrections": 12},
                                                    "after": {"corrections_accuracy": 0.5}}))
    with pytest.raises(Exit) as refused:
        backend.push_model(c, model=str(worse))
    message = str(refused.value.message)
    assert f"accuracy gate: MNIST test accuracy {serving - 0.01:.2%} against the serving model's {serving:.2%}" \
           " (-1.00 points; model.max_regression 0.2): refused" in message and "--force" in message
    assert health(backend_deployed)["model"]["sha256"] == ours
    result, printed = captured(backend.push_model, c, model=str(worse), force=True)
    assert "  ok: accuracy gate overridden by --force: MNIST test accuracy" in printed
    new = sha256_file(worse / "cnn-mnist.tflite")
    assert health(backend_deployed)["model"]["sha256"] == new
    assert (artifacts / "registry" / new[:12] / "pushed.json").is_file()  # the local mirror

    result, printed = captured(registry.models, c)
    listed = {v["version"]: v for v in result["versions"]}
    assert listed[new[:12]]["serving"] and not listed[ours[:12]]["serving"]
    assert f"* {new[:12]}  sha256 {new[:16]}" in printed and "MNIST + 12 corrections" in printed
    assert f"  {ours[:12]}  sha256 {ours[:16]}" in printed and "MNIST only  MNIST " in printed
    assert "corrections 50.00%  (serving)" in printed

    stop, failures, answers = threading.Event(), [], []

    def poll():
        while not stop.is_set():
            try:
                with urllib.request.urlopen(digit_request(backend_deployed), timeout=15) as response:
                    answers.append(json.load(response)["model"]["sha256"])
            except Exception as error:  # any failed request fails the test
                failures.append(repr(error))

    client = threading.Thread(target=poll, daemon=True)
    client.start()
    try:
        result, printed = captured(registry.rollback_model, c)
        time.sleep(1)
    finally:
        stop.set()
        client.join(20)
    assert f"  changed: models/current -> {ours[:12]} (was {new[:12]})" in printed
    assert not failures, failures[:3]
    assert answers[0] == new and answers[-1] == ours
    assert health(backend_deployed)["model"]["sha256"] == ours


def test_deploy_backend_again_changes_nothing(backend_deployed):
    result = backend.deploy_backend(backend_deployed.context())
    assert result["changed"] == 0 and result["ok"] > 0, result


def rendered(home="/home/ubuntu", systemd=True, **backend_config):
    """The service files and backend.env for a host never opened: they are only rendered."""
    c = context(backend={"port": 5123, "workers": 3, "service": "digits-backend", **backend_config})
    cxn = Host("203.0.113.9", user="ubuntu")
    cxn.facts = {"home": PurePosixPath(home), "systemd": systemd}
    paths = backend.layout(c, cxn)
    files = {name: content.decode() for name, (content, mode) in backend.service_files(c, cxn, paths).items()}
    return c, paths, files


@pytest.mark.parametrize("systemd", [True, False])
def test_service_files_run_the_same_command_line(systemd):
    """Ubuntu's systemd unit and the no-systemd init script start the same gunicorn, with
    Files/gunicorn.conf.py in the app folder; port and workers come from backend.env."""
    c, paths, files = rendered(systemd=systemd)
    command = backend.command_line(c, paths)
    assert command == "/home/ubuntu/digits-backend/venv/bin/gunicorn -c gunicorn.conf.py"
    env = backend.environment(c, paths).decode().splitlines()
    assert {"HOST=0.0.0.0", "PORT=5123", "WORKERS=3",
            "MODEL_PATH=/home/ubuntu/digits-backend/models/current/cnn-mnist.keras",
            "STATE_DIR=/home/ubuntu/digits-backend/state", "FEEDBACK_MAX_ROWS=50000"} <= set(env)
    if systemd:
        unit = files["/etc/systemd/system/digits-backend.service"]
        for line in (f"ExecStart={command}", "User=ubuntu", "Restart=always", "ExecReload=/bin/kill -HUP $MAINPID",
                     "WorkingDirectory=/home/ubuntu/digits-backend/app",
                     "EnvironmentFile=/home/ubuntu/digits-backend/backend.env", "WantedBy=multi-user.target",
                     # read-only but for the corrections' database (Files/feedback.py)
                     "BindReadOnlyPaths=/home/ubuntu/digits-backend", "BindPaths=/home/ubuntu/digits-backend/state"):
            assert f"\n{line}\n" in unit, line
    else:
        script = files["/etc/init.d/digits-backend"]
        assert f"-- {command}\n" in script and "Provides:          digits-backend" in script
        assert '--chdir "$DIR/app"' in script and "\nDIR=/home/ubuntu/digits-backend\n" in script
        assert "/home/ubuntu/digits-backend/supervise.py" in files


def test_init_script_quotes_what_it_is_given():
    """A home with a space (or worse) stays one shell word in the init script."""
    c, paths, files = rendered(home="/home/o'brien x", systemd=False)
    script = files["/etc/init.d/digits-backend"]
    assert "\nDIR='/home/o'\"'\"'brien x/digits-backend'\n" in script
    assert "-- '/home/o'\"'\"'brien x/digits-backend/venv/bin/gunicorn' -c gunicorn.conf.py\n" in script


def test_unsafe_service_name_is_refused():
    c = context(backend={"service": "digits; rm -rf ~"})
    with pytest.raises(Exit) as error:
        backend.setup_backend(c)
    assert error.value.message == ("bad config: backend.service = 'digits; rm -rf ~': use only letters, digits,"
                                   " '.', '_' and '-' (it names files and a service on the host)")


def test_models_that_cannot_be_served_are_refused_before_connecting(tmp_path):
    """Nothing is reached (no inventory, no AWS): the refusals come first."""
    c = context(ssh={"hosts": {"backend": "nobody@127.0.0.1:1"}})
    (tmp_path / "my.h5").write_bytes(b"x")
    with pytest.raises(Exit) as error:
        backend.push_model(c, model=str(tmp_path / "my.h5"))
    assert error.value.message.startswith(f"cannot push {tmp_path / 'my.h5'}: push-model takes a .tflite or .keras")
    (tmp_path / "keras-only").mkdir()
    (tmp_path / "keras-only" / "cnn-mnist.keras").write_bytes(b"x")
    with pytest.raises(Exit) as error:
        backend.push_model(c, model=str(tmp_path / "keras-only"))
    message = error.value.message
    assert message.startswith(f"the model from {tmp_path / 'keras-only'} has no .tflite:"), message
    assert "re-run `fab train --force`" in message and "backend.keras_fallback: true" in message
    # With the fallback, it goes on (and here fails to reach the host, not to refuse).
    c = context(ssh={"hosts": {"backend": "nobody@127.0.0.1:1"}, "connect_timeout": 2},
                backend={"keras_fallback": True})
    with pytest.raises(Exit) as error:
        backend.push_model(c, model=str(tmp_path / "keras-only" / "cnn-mnist.keras"))
    assert error.value.message.startswith("cannot reach the backend (nobody@127.0.0.1:1)")


@pytest.mark.parametrize("systemd", [True, False])
def test_failures_show_the_log_where_it_is(systemd):
    """Under systemd gunicorn's output is in the journal; elsewhere in backend.log."""
    ran = []

    def run(command, **kwargs):
        ran.append(command)
        return SimpleNamespace(stdout="the last lines\n", stderr="", ok=True)

    cxn = SimpleNamespace(facts={"systemd": systemd}, run=run, sudo=run)
    shown = service_log(cxn, "digits-backend", PurePosixPath("/home/u/digits-backend/backend.log"))
    command = ("journalctl -u digits-backend -n 30 --no-pager" if systemd
               else "tail -n 30 /home/u/digits-backend/backend.log")
    assert shown == f"{command}:\nthe last lines"
    assert ran[0].startswith(command)


def test_backend_host_runs_without_tensorflow(backend_deployed):
    """The light path: LiteRT serves the .tflite; TensorFlow and Keras never reach the host."""
    venv = Path(pwd.getpwnam("backend").pw_dir) / "digits-backend" / "venv"
    installed = {p.name.split("-")[0].lower() for p in venv.glob("lib/python3*/site-packages/*.dist-info")}
    assert {"ai_edge_litert", "flask", "gunicorn"} <= installed
    assert not {"tensorflow", "tensorflow_cpu", "keras", "tf_keras"} & installed
    assert health(backend_deployed)["model"]["format"] == "tflite"
