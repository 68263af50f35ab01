"""`fab local` as a user runs it, and the task list both CLIs show."""
import re
import shutil
import signal
import subprocess

import pytest
import requests

from tests.conftest import ROOT
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


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_fab_local_serves_the_page_and_the_back_end_until_stopped(trained_model, stop):
    port, backend_port = free_port(), free_port()
    command = [shutil.which("fab"), "local", "--model", str(trained_model / "cnn-mnist.keras"),
               "--port", str(port), "--backend-port", str(backend_port)]  # fmt: skip
    app = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
def test_training_here_shows_each_epoch_as_it_runs(tmp_path, capsys):
    from tasks.local import train_here
    from tests.conftest import MNIST_NPZ

    model = train_here(tmp_path, MNIST_NPZ, epochs=2, limit=1200)
    printed = capsys.readouterr().out
    epoch_lines = re.findall(r"^\S.* - loss: [\d.]+ .*val_accuracy: [\d.]+", printed, re.M)
    assert len(epoch_lines) == 2, printed[-3000:]  # one line per epoch, as the notebook ran
    assert re.search(r"^test accuracy 0\.\d{4} after 2 epochs$", printed, re.M)
    assert model == tmp_path / "cnn-mnist.keras" and model.is_file()
