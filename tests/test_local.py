"""`fab local` as a user runs it, and the task list both CLIs show."""
import re
import shutil
import signal
import subprocess
import time

import pytest
import requests

from tests.fixtures import ROOT
from tests.fixtures.web import free_port

TASKS = ["create-vpc", "launch", "status", "stop-worker", "start-worker", "destroy", "setup-worker", "train",
         "notebook", "setup-frontend", "setup-backend", "push-model", "deploy-backend", "deploy", "local",
         "metrics", "pull-feedback", "models", "rollback-model"]  # fmt: skip


@pytest.mark.parametrize("cli", ["fab", "invoke"])
def test_every_task_is_listed_with_one_line_help(cli):
    listing = subprocess.run([shutil.which(cli), "--list"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = {m.group(1): m.group(2) for m in re.finditer(r"^  ([\w-]+)\s{2,}(.*)$", listing, re.M)}
    for name in TASKS:
        assert name in lines, f"{cli} --list lacks {name}"
        assert len(lines[name].strip()) > 10, f"{name} has no help line"


def _sigint(disposition):
    """A child's start with SIGINT set to `disposition`, whatever this process inherited."""
    return lambda: signal.signal(signal.SIGINT, disposition)


@pytest.mark.parametrize(
    ("stop", "sigint_at_start"),
    [(signal.SIGINT, signal.SIG_DFL), (signal.SIGINT, signal.SIG_IGN), (signal.SIGTERM, signal.SIG_DFL)],
    # SIG_IGN: how a background job of a non-interactive shell starts (CI's, for one)
    ids=["ctrl-c", "ctrl-c-started-as-background-job", "kill"],
)
def test_fab_local_serves_the_page_and_the_back_end_until_stopped(trained_model, stop, sigint_at_start):
    port, backend_port = free_port(), free_port()
    command = [shutil.which("fab"), "local", "--model", str(trained_model / "cnn-mnist.keras"),
               "--port", str(port), "--backend-port", str(backend_port)]  # fmt: skip
    app = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           preexec_fn=_sigint(sigint_at_start))  # fmt: skip
    try:
        for line in app.stdout:
            if "The digit app is at" in line:
                break
        url = re.search(r"(http://\S+)", line).group(1)
        assert url == f"http://127.0.0.1:{port}/"
        page = requests.get(url, timeout=5)
        assert page.status_code == 200 and "<canvas" in page.text
        config = requests.get(url + "static/config.js", timeout=5).text
        assert f"http://127.0.0.1:{backend_port}" in config  # the page is pointed at this back-end
        assert requests.get(f"http://127.0.0.1:{backend_port}/health", timeout=5).json()["model_loaded"]
    finally:
        app.send_signal(stop)
        assert app.wait(30) == 0
    with pytest.raises(requests.ConnectionError):  # stopping it stopped both
        requests.get(f"http://127.0.0.1:{backend_port}/health", timeout=2)
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=2)


@pytest.mark.slow
def test_with_no_model_a_first_one_serves_then_the_full_one_replaces_it_with_no_failed_request(tmp_path):
    """No model yet: a brief first model serves the page, the full one trains in the background and is
    swapped in (gunicorn reloaded) under a client that never sees a failure; the next start reuses it."""
    import base64
    import json
    import os
    import threading

    from tests.fixtures import MNIST_NPZ

    artifacts = tmp_path / "artifacts"
    env = {**os.environ, "FABRIC_TRAIN_ARTIFACTS": str(artifacts), "FABRIC_TRAIN_DATA": str(MNIST_NPZ),
           # Tiny on purpose: the first model reads far less than the full one, so the swap must happen.
           "FABRIC_LOCAL_FIRST_EPOCHS": "1", "FABRIC_LOCAL_FIRST_LIMIT": "600",
           "FABRIC_TRAIN_EPOCHS": "2", "FABRIC_TRAIN_LIMIT": "6000"}
    port, backend_port = free_port(), free_port()
    command = [shutil.which("fab"), "local", "--port", str(port), "--backend-port", str(backend_port)]
    backend = f"http://127.0.0.1:{backend_port}"
    digit = "data:image/png;base64," + base64.b64encode((ROOT / "Files" / "9.png").read_bytes()).decode()
    answers, failures, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                reply = requests.post(backend + "/predict/", data=digit, timeout=10,
                                      headers={"Accept": "application/json"})
                (answers if reply.status_code == 200 else failures).append(reply.status_code)
            except requests.RequestException as error:
                failures.append(repr(error))
            time.sleep(0.05)  # a person's pace, near enough: the background training needs the cores

    app = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    printed = []
    try:
        for line in app.stdout:
            printed.append(line)
            if "The digit app is at" in line:
                break
        first = requests.get(backend + "/health", timeout=5).json()["model"]
        assert first["test_accuracy"] == json.loads((artifacts / "first" / "metrics.json").read_text())["test_accuracy"]
        assert not (artifacts / "cnn-mnist.keras").exists()  # the full model is still training
        worker = threading.Thread(target=client)
        worker.start()
        for line in app.stdout:
            printed.append(line)
            if "The full model is serving now" in line:
                break
        time.sleep(1)  # answers from the new workers too
        stop.set()
        worker.join(15)
        full = requests.get(backend + "/health", timeout=5).json()["model"]
    finally:
        stop.set()
        app.send_signal(signal.SIGINT)
        assert app.wait(30) == 0
    text = "".join(printed)
    assert "training a first one" in text and "full model, in the background: epoch 2/2" in text, text[-3000:]
    # The first model's training, in the foreground: the notebook's line for its one epoch, then the figure.
    assert len(re.findall(r"^\S.* - loss: [\d.]+ .*val_accuracy: [\d.]+", text, re.M)) == 1, text[-3000:]
    assert re.search(r"^test accuracy 0\.\d{4} after 1 epochs$", text, re.M)
    assert failures == [] and len(answers) > 10, (failures[:5], len(answers))
    assert full["sha256"] != first["sha256"]
    assert full["test_accuracy"] == json.loads((artifacts / "metrics.json").read_text())["test_accuracy"]
    assert full["test_accuracy"] > first["test_accuracy"]
    assert (artifacts / "cnn-mnist.keras").is_file() and (artifacts / "train.log").is_file()  # promoted

    again = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in again.stdout:
            assert "training" not in line, line  # a model already trained is reused at once
            if "The digit app is at" in line:
                break
        assert requests.get(backend + "/health", timeout=5).json()["model"]["sha256"] == full["sha256"]
    finally:
        again.send_signal(signal.SIGINT)
        assert again.wait(30) == 0
