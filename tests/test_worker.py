"""The Working Machine over real SSH: setup-worker, train (brief, dataset uploaded), notebook."""
import json
import threading
import time
import urllib.request

import pytest

from tasks import hosts, worker
from tests.fixtures import free_port
from tests.fixtures.ssh_hosts import captured

pytestmark = pytest.mark.slow


def test_train_brings_back_model_metrics_and_plots(worker_trained):
    setup, _ = worker_trained.results["setup-worker"]
    assert setup["role"] == "worker"
    result, printed = worker_trained.results["train"]
    assert result["changed"] >= 1
    for name in ("cnn-mnist.keras", "cnn-mnist.tflite", "metrics.json", "training_curves.png",
                 "confusion_matrix.png"):
        assert (worker_trained.artifacts / name).stat().st_size > 0, name
    metrics = json.loads((worker_trained.artifacts / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.8
    # Progress came through while it ran: the notebook's per-epoch lines, then the accuracy.
    assert "val_accuracy" in printed.split("test accuracy:")[0]
    assert "dataset uploaded to /home/worker/mnist/data/mnist.npz\n" in printed
    assert f"test accuracy: {metrics['test_accuracy']:.4f}" in printed


def test_second_run_changes_nothing(worker_trained):
    c = worker_trained.context()
    assert worker.setup_worker(c)["changed"] == 0
    result, printed = captured(worker.train, c)
    assert result["changed"] == 0
    assert "--force to train again" in printed


def test_notebook_is_reached_through_an_ssh_tunnel(worker_trained):
    """Jupyter listens on the worker's localhost only; the tunnel brings it to ours."""
    c = worker_trained.context()
    local = free_port()
    errors = []
    thread = threading.Thread(target=_catch, args=(errors, worker.notebook, c), daemon=True,
                              kwargs={"port": local, "seconds": 120})
    thread.start()
    try:
        status = None
        deadline = time.monotonic() + 90
        while status is None and time.monotonic() < deadline and thread.is_alive():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{local}/api/status?token={token(c)}",
                                            timeout=5) as response:
                    status = json.load(response)
            except (OSError, IndexError):
                time.sleep(1)
        assert not errors, errors
        assert status is not None and "started" in status, status
        # Not on the worker's own address: only the tunnel reaches it.
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.2:{c.config.worker.jupyter_port}/api/status", timeout=3)
    finally:
        stopped = worker.notebook(c, stop=True)
        thread.join(30)
    assert stopped["changed"] == 1
    assert not thread.is_alive(), "the tunnel stays open after Jupyter stopped"


def token(c):
    """The token of the worker's Jupyter, as `jupyter server list` gives it there."""
    cxn = hosts.connect(c, "worker")
    try:
        return worker.jupyter_servers(cxn, worker.layout(c, cxn))[0]["token"]
    finally:
        cxn.close()


def _catch(errors, call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except BaseException as error:  # shown by the test, not lost in the thread
        errors.append(error)


def test_train_with_feedback_uploads_the_corrections_and_reports_them(worker_trained, tmp_path):
    """`fab train --with-feedback --fine-tune` on the worker: the pulled corrections and the current model go up,
    the notebook trains on MNIST plus them and reports accuracy on MNIST and on the held-out ones."""
    import numpy as np

    from tasks import corrections
    from tests.fixtures import MNIST_NPZ

    with np.load(MNIST_NPZ) as data:  # "corrections": MNIST test digits, as pull-feedback writes them
        images, labels = data["x_test"][:60], data["y_test"][:60]
    corrections.save(tmp_path / "corrections.npz", {
        "ids": np.arange(1, 61, dtype=np.int64), "created": np.zeros(60), "x_train": images,
        "y_train": labels.astype(np.uint8), "predicted": np.full(60, -1, np.int8),
        "model_sha256": np.array([""] * 60, "<U64")})
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    for name in ("cnn-mnist.keras", "metrics.json"):  # the current model: "before" is measured on it
        (artifacts / name).write_bytes((worker_trained.artifacts / name).read_bytes())
    c = worker_trained.context()
    c.config.train.feedback = str(tmp_path)
    result, printed = captured(worker.train, c, epochs=1, limit=1200, artifacts=str(artifacts), with_feedback=True,
                               fine_tune=True)  # from the current model: one brief epoch keeps it a model
    assert result["changed"] >= 2, printed
    assert "corrections.npz uploaded to /home/worker/mnist/data/feedback_path.npz" in printed
    assert "cnn-mnist.keras uploaded to /home/worker/mnist/data/base_model.keras" in printed
    metrics = json.loads((artifacts / "metrics.json").read_text())
    assert metrics["fine_tuned"] is True
    feedback = metrics["feedback"]
    assert feedback["corrections"] == 60 and 0 < feedback["held_out"] < 60, feedback
    assert feedback["trained_on"] == 60 - feedback["held_out"]
    for figure in ("before", "after"):  # both models, on MNIST's test set and on the held-out corrections
        assert metrics[figure]["mnist_test_accuracy"] > 0.5 and 0.0 <= metrics[figure]["corrections_accuracy"] <= 1.0
    served = json.loads((worker_trained.artifacts / "metrics.json").read_text())["test_accuracy"]
    assert abs(metrics["before"]["mnist_test_accuracy"] - served) < 1e-3  # "before" is the current model
