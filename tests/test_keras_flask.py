"""Files/keras_flask.py through a real gunicorn on loopback, with a model the notebook trained."""
import base64
import concurrent.futures
import hashlib
import io
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from PIL import Image

from keras_flask import MAX_BODY_BYTES, DigitModel
from tests.canvas import canvas_set, data_url, render
from tests.fixtures import MNIST_NPZ, ROOT
from tests.fixtures.web import free_port

JSON = {"Accept": "application/json"}
FORM = {"Content-Type": "application/x-www-form-urlencoded; charset=UTF-8"}  # what jQuery sends


@pytest.fixture(scope="module")
def mnist_test():
    with np.load(MNIST_NPZ) as data:
        return data["x_test"], data["y_test"]


@pytest.fixture
def post(backend_url):
    session = requests.Session()
    yield lambda body, **kw: session.post(backend_url + "/predict/", data=body, timeout=10, **kw)
    session.close()


def png(image):
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_guide_protocol_form_encoded_data_url_gets_plain_digit(post, mnist_test):
    x, y = mnist_test
    reply = post(data_url(render(x[0], "transparent")), headers=FORM)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    assert reply.text == str(y[0])


def test_json_answer_when_asked(post, mnist_test):
    x, y = mnist_test
    reply = post(data_url(render(x[1], "white")), headers=JSON)
    body = reply.json()
    assert body["digit"] == y[1]
    assert len(body["probabilities"]) == 10 and abs(sum(body["probabilities"]) - 1) < 1e-3
    assert body["probabilities"][body["digit"]] == max(body["probabilities"]) == body["confidence"]


def test_json_body_gets_json(post, mnist_test):
    x, y = mnist_test
    reply = post(None, json={"image": data_url(render(x[2], "dark"))})
    assert reply.status_code == 200 and reply.json()["digit"] == y[2]


def test_reads_drawings_in_every_style(post, mnist_test):
    x, y = mnist_test
    samples = list(canvas_set(x[:60], y[:60], seed=1))
    right = sum(post(data_url(image), headers=JSON).json()["digit"] == label for image, label in samples)
    assert right >= 54, f"{right}/60 canvas-style digits read right"  # a briefly trained model


def test_health_reports_the_served_file(backend_url, trained_model):
    health = requests.get(backend_url + "/health", timeout=5).json()
    assert health["status"] == "ok" and health["model_loaded"] is True and health["version"]
    assert health["model"]["format"] == "tflite"  # preferred over the .keras beside it
    served = (trained_model / "cnn-mnist.tflite").read_bytes()
    assert health["model"]["sha256"] == hashlib.sha256(served).hexdigest()


def test_cors_allows_any_origin_by_default(post, mnist_test):
    reply = post(data_url(render(mnist_test[0][0])), headers={"Origin": "http://198.51.100.7"})
    assert reply.headers["Access-Control-Allow-Origin"] == "*"


def test_cors_allows_only_configured_origins(trained_model, mnist_test):
    from keras_flask import create_app

    client = create_app(trained_model / "cnn-mnist.keras", cors_origins="http://203.0.113.5").test_client()
    body = data_url(render(mnist_test[0][0]))
    allowed = client.post("/predict/", data=body, headers={"Origin": "http://203.0.113.5"})
    other = client.post("/predict/", data=body, headers={"Origin": "http://198.51.100.7"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "http://203.0.113.5"
    assert "Access-Control-Allow-Origin" not in other.headers


def huge_png():
    """A 20000x20000 1-bit PNG: tiny on the wire, 400 million pixels decoded."""
    return png(Image.new("1", (20000, 20000), 0))


@pytest.mark.parametrize(
    "body, status, reason",
    [
        (b"", 400, "empty body"),
        (b"data:image/png;base64,$$$not-base64$$$", 400, "not valid base64"),
        (b"data:image/png;base64," + base64.b64encode(b"GIF? no, plain text"), 400, "not an image"),
        (data_url(png(Image.new("RGB", (1, 1), "white"))).encode(), 400, "1x1"),
        ("huge", 400, "over 4096x4096 pixels"),  # PIL's guard: beyond twice the pixels of the side check
        (b"data:image/png;base64," + b"A" * (MAX_BODY_BYTES + 10), 413, "KiB limit"),
        (data_url(png(Image.new("RGBA", (280, 280), (0, 0, 0, 0)))).encode(), 422, "no digit drawn"),
        (b'{"picture": 1}', 400, "JSON body must be"),
    ],
    ids=["empty", "not-base64", "not-image", "1x1", "20000x20000", "too-large", "blank", "bad-json"],
)
def test_bad_input_gets_json_4xx_and_server_keeps_serving(post, backend_url, mnist_test, body, status, reason):
    if body == "huge":
        body = data_url(huge_png()).encode()
    reply = post(body, headers=FORM)
    assert reply.status_code == status
    assert reason in reply.json()["error"]
    x, y = mnist_test
    assert post(data_url(render(x[0])), headers=FORM).text == str(y[0])  # still serving


def test_wrong_method_gets_json_405(backend_url):
    reply = requests.get(backend_url + "/predict/", timeout=5)
    assert reply.status_code == 405 and "error" in reply.json()


def test_32_parallel_clients_each_get_their_own_answer(backend_url, mnist_test):
    x, y = mnist_test
    images = [data_url(render(x[i], "transparent", 160)) for i in range(32)]

    def ask(image):
        return requests.post(backend_url + "/predict/", data=image, headers=JSON, timeout=30).json()["digit"]

    serial = [ask(image) for image in images]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        parallel = list(pool.map(ask, images * 3))
    assert parallel == serial * 3  # no answer leaks between concurrent requests
    assert sum(d == label for d, label in zip(serial, y[:32], strict=True)) >= 30


def test_keras_and_tflite_agree(trained_model, mnist_test):
    x = mnist_test[0][:500, ..., None].astype(np.float32) / 255.0
    lite = DigitModel(trained_model / "cnn-mnist.keras")
    full = DigitModel(trained_model / "cnn-mnist.keras", prefer_lite=False)
    assert (lite.format, full.format) == ("tflite", "keras")
    p_lite, p_full = lite.probabilities(x), full.probabilities(x)
    assert (p_lite.argmax(1) == p_full.argmax(1)).all()
    assert np.abs(p_lite - p_full).max() < 1e-4


def test_command_line_serves_keras_only_model_and_checks_files(tmp_path, trained_model, mnist_test):
    shutil.copy(trained_model / "cnn-mnist.keras", tmp_path)  # no .tflite: the Keras fallback
    port = free_port()
    script = ROOT / "Files" / "keras_flask.py"
    server = subprocess.Popen([sys.executable, script, "--model", tmp_path / "cnn-mnist.keras", "--port", str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                health = requests.get(url + "/health", timeout=1).json()
                break
            except requests.ConnectionError:
                assert server.poll() is None, "keras_flask.py exited"
                time.sleep(0.2)
        assert health["model"]["format"] == "keras"
        x, y = mnist_test
        assert requests.post(url + "/predict/", data=data_url(render(x[7])), timeout=10).text == str(y[7])
    finally:
        server.terminate()
        server.wait(10)

    corrupt = tmp_path / "corrupt.tflite"
    corrupt.write_bytes(b"TFL3" + b"\0" * 100)
    check = subprocess.run([sys.executable, script, "--check", corrupt], capture_output=True, text=True)
    assert check.returncode != 0 and "refused" in check.stderr
    good = subprocess.run([sys.executable, script, "--check", trained_model / "cnn-mnist.tflite"],
                          capture_output=True, text=True)
    assert good.returncode == 0 and "sha256=" in good.stdout
