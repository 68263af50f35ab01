"""The Back-End over real SSH: the gunicorn service, model swaps, refusals, restarts.

The back-end serves the model the test worker trained (`backend_deployed`).
"""
import base64
import io
import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from invoke.exceptions import Exit
from PIL import Image

from tasks import backend
from tasks.remote import sha256_file
from tests.conftest import MNIST_NPZ

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


@pytest.fixture(scope="module")
def other_models(backend_deployed, tmp_path_factory):
    """Two more models: `new` (the worker's, quantised: other bytes, same contract)
    and `wrong` (10 -> 5 outputs: loads, but breaks the contract)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    folder = tmp_path_factory.mktemp("models")
    model = keras.models.load_model(backend_deployed.artifacts / "cnn-mnist.keras", compile=False)
    wrong = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(5, activation="softmax")])
    for name, net, optimise in (("new", model, True), ("wrong", wrong, False)):
        converter = tf.lite.TFLiteConverter.from_keras_model(net)
        if optimise:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        (folder / name).mkdir()
        (folder / name / "cnn-mnist.tflite").write_bytes(converter.convert())
    return folder


def test_deployed_backend_serves_the_workers_model(backend_deployed):
    setup, printed = backend_deployed.results["setup-backend"]
    assert "waits for a model" in printed or "running" in printed or "started" in printed
    pushed, printed = backend_deployed.results["push-model"]
    assert "checksums verified on arrival" in printed or pushed["changed"] == 0
    assert health(backend_deployed)["model"]["sha256"] == sha256_file(backend_deployed.artifacts / "cnn-mnist.tflite")


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
    c = backend_deployed.context()
    new = sha256_file(other_models / "new" / "cnn-mnist.tflite")
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
        result = backend.push_model(c, model=str(other_models / "new"))
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
    # Back to the worker's model (a rollback is a push like any other).
    assert backend.push_model(c)["changed"] >= 1
    assert health(backend_deployed)["model"]["sha256"] == sha256_file(backend_deployed.artifacts / "cnn-mnist.tflite")


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


def test_push_from_worker_relays_what_the_worker_trained(backend_deployed):
    """The guide's `scp cnn-mnist` from the worker, relayed over SFTP: the same model, in place."""
    from tests.fixtures.ssh_hosts import captured

    result, printed = captured(backend.push_model, backend_deployed.context(), from_worker=True)
    assert "fetched cnn-mnist.keras, cnn-mnist.tflite from the worker (worker@127.0.0.2" in printed
    assert result["changed"] == 0 and "in place" in printed


@pytest.mark.parametrize("systemd", [True, False])
def test_service_files_run_the_same_command_line(systemd):
    """Ubuntu's systemd unit and the no-systemd init script start the same gunicorn."""
    from pathlib import PurePosixPath

    from tasks.hosts import Host
    from tests.fixtures.ssh_hosts import context

    c = context(backend={"port": 5123, "workers": 3, "service": "digits-backend"})
    cxn = Host("203.0.113.9", user="ubuntu")  # never opened: the files are only rendered
    cxn.facts = {"home": PurePosixPath("/home/ubuntu"), "systemd": systemd}
    paths = backend.layout(c, cxn)
    files = {name: content.decode() for name, (content, mode) in backend.service_files(c, cxn, paths).items()}
    command = backend.command_line(c, paths)
    assert command.startswith("/home/ubuntu/digits-backend/venv/bin/gunicorn --workers 3 --bind 0.0.0.0:5123")
    assert command.endswith("'keras_flask:create_app()'")
    if systemd:
        unit = files["/etc/systemd/system/digits-backend.service"]
        for line in (f"ExecStart={command}", "User=ubuntu", "Restart=always", "ExecReload=/bin/kill -HUP $MAINPID",
                     "EnvironmentFile=/home/ubuntu/digits-backend/backend.env", "WantedBy=multi-user.target"):
            assert f"\n{line}\n" in unit, line
    else:
        script = files["/etc/init.d/digits-backend"]
        assert f"-- {command}\n" in script and "Provides:          digits-backend" in script
        assert "/home/ubuntu/digits-backend/supervise.py" in files
