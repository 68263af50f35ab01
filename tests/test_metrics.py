"""GET /metrics (Files/metrics.py) under gunicorn: a known mix of requests, counted exactly,
read with prometheus_client's own text parser; and kept private (loopback only, not forwarded)."""
import base64
import collections
import hashlib
import io
import os
import re
import signal
import time

import numpy as np
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from keras_flask import create_app
from tasks import corrections
from tasks.frontend import PROXY_TEMPLATE
from tests.canvas import data_url, render
from tests.fixtures import MNIST_NPZ, wait_for
from tests.fixtures.web import Gunicorn


def blank_png():
    buffer = io.BytesIO()
    Image.new("RGBA", (280, 280), (0, 0, 0, 0)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def samples(text):
    """{(sample name, frozenset of labels): value} of every sample in a scrape."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def since(after, before):
    """The samples that grew between two scrapes, by how much."""
    grown = {key: value - before.get(key, 0.0) for key, value in after.items()}
    return {key: value for key, value in grown.items() if value}


def server_start_requests(scraped):
    return sum(value for (name, _), value in scraped.items() if name == "digits_http_requests_total")


def only(scraped, name):
    """{labels dict as a sorted tuple: value} of one sample name."""
    return {tuple(sorted(dict(labels).items())): value for (sample, labels), value in scraped.items()
            if sample == name}


def test_a_known_mix_of_requests_is_counted_exactly(trained_model, tmp_path):
    with np.load(MNIST_NPZ) as data:
        digits = data["x_test"][:6]
    server = Gunicorn(trained_model / "cnn-mnist.keras", tmp_path, workers=2)
    url = server.url
    try:
        session = requests.Session()
        # Counts from zero but for the start (Gunicorn() polls /health until the workers answer).
        baseline_text = session.get(url + "/metrics", timeout=10).text
        baseline = samples(baseline_text)
        json_accept = {"Accept": "application/json"}
        answered = [session.post(url + "/predict/", data=data_url(render(d)), headers=json_accept, timeout=10)
                    .json()["digit"] for d in digits[:3]]
        for _ in range(2):
            assert session.post(url + "/predict/", data=blank_png(), timeout=10).status_code == 422
        # A worker dies (its counts must not): SIGKILL, and the master starts another.
        before = set(server.workers())
        os.kill(min(before), signal.SIGKILL)
        wait_for(lambda: len(set(server.workers()) - before) == 1 and len(server.workers()) == 2, "a new worker")
        session = requests.Session()  # the old connection may have been the dead worker's
        answered += [session.post(url + "/predict/", data=data_url(render(d)), headers=json_accept, timeout=10)
                     .json()["digit"] for d in digits[3:]]
        for _ in range(3):
            assert session.post(url + "/predict/", data=b"data:image/png;base64,!!", timeout=10).status_code == 400
        for _ in range(4):
            assert session.get(url + "/health", timeout=10).status_code == 200
        pixels = base64.b64encode(bytes(784)).decode()
        for body in ({"label": 1, "predicted": 7, "input": pixels}, {"label": 1, "predicted": 7, "input": pixels},
                     {"label": 3, "input": pixels}):
            assert session.post(url + "/feedback", json=body, timeout=10).status_code == 201
        assert session.post(url + "/feedback", json={"label": 11, "input": pixels}, timeout=10).status_code == 400
        assert session.get(url + "/wp-login.php", timeout=10).status_code == 404

        first = session.get(url + "/metrics", timeout=10)
        assert first.status_code == 200 and first.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        scraped = since(samples(first.text), baseline)
        requests_seen = only(scraped, "digits_http_requests_total")
        expected = {("/predict/", "POST", "200"): 6, ("/predict/", "POST", "422"): 2,
                    ("/predict/", "POST", "400"): 3, ("/health", "GET", "200"): 4,
                    ("/feedback", "POST", "201"): 3, ("/feedback", "POST", "400"): 1,
                    ("unmatched", "GET", "404"): 1, ("/metrics", "GET", "200"): 1}  # (the baseline's)
        assert requests_seen == {(("method", m), ("route", r), ("status", s)): n for (r, m, s), n in expected.items()}

        latency = only(scraped, "digits_http_request_duration_seconds_count")
        assert latency == {(("route", "/predict/"),): 11.0, (("route", "/health"),): 4.0,
                           (("route", "/feedback"),): 4.0, (("route", "unmatched"),): 1.0,
                           (("route", "/metrics"),): 1.0}
        inf = only(scraped, "digits_http_request_duration_seconds_bucket")
        assert inf[(("le", "+Inf"), ("route", "/predict/"))] == 11.0
        assert only(scraped, "digits_predictions_total") == {
            (("digit", str(d)),): float(n) for d, n in collections.Counter(answered).items()}
        assert only(scraped, "digits_corrections_total") == {
            (("predicted", "7"), ("true", "1")): 2.0, (("predicted", "unknown"), ("true", "3")): 1.0}
        assert only(scraped, "digits_image_decode_failures_total") == {
            (("reason", "blank"),): 2.0, (("reason", "unreadable"),): 3.0}
        served = hashlib.sha256((trained_model / "cnn-mnist.tflite").read_bytes()).hexdigest()
        # One line per live worker (the killed one's is gone), each the served model.
        model_lines = only(samples(first.text), "digits_model_info")
        assert {dict(labels)["sha256"] for labels in model_lines} == {served}
        assert set(model_lines.values()) == {1.0}
        assert len(model_lines) == 1  # (livemax: one line per model, not per worker)

        # `fab metrics`' summary of the same two scrapes (tasks/corrections.py).
        figures, line = corrections.summarize(baseline_text, first.text, seconds=2.0)
        assert figures["requests"] == sum(requests_seen.values()) + server_start_requests(baseline)
        assert figures["requests_per_s"] == sum(requests_seen.values()) / 2.0
        assert (figures["errors_5xx"], figures["refused_4xx"]) == (0, 2 + 3 + 1 + 1)
        assert (figures["corrections"], figures["decode_failures"]) == (3, 5)
        assert figures["models"] == [served[:12]] and 0 < figures["p99_s"] <= 10
        # Corrections today: the store's count for the host's local date (a gauge read from SQLite).
        assert only(samples(first.text), "digits_corrections_today") == {(("date", time.strftime("%Y-%m-%d")),): 3.0}
        assert figures["corrections_today"] == 3 and ", 3 corrections today, " in line
        assert f"{sum(requests_seen.values()) / 2:.1f} req/s" in line

        # The scrape itself is counted in the next one.
        again = since(samples(session.get(url + "/metrics", timeout=10).text), samples(first.text))
        assert only(again, "digits_http_requests_total") == {
            (("method", "GET"), ("route", "/metrics"), ("status", "200")): 1.0}
    finally:
        server.stop()


def test_metrics_answer_only_this_host(trained_model, tmp_path):
    client = create_app(trained_model / "cnn-mnist.keras", state_dir=tmp_path).test_client()
    scraped = client.get("/metrics", environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert scraped.status_code == 200
    # One process (no gunicorn): its own counters, and the store's count of today's corrections.
    names = {name for name, _ in samples(scraped.get_data(as_text=True))}
    assert {"digits_model_info", "digits_corrections_today"} <= names
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "::1"}).status_code == 200
    for outside in ("192.168.0.12", "203.0.113.9"):  # the front-end's apache, or anyone (backend.mode public)
        refused = client.get("/metrics", environ_base={"REMOTE_ADDR": outside})
        assert refused.status_code == 403 and "fab metrics" in refused.get_json()["error"]
    # Public mode: apache on the same host forwards from 127.0.0.1, and says for whom.
    forwarded = client.get("/metrics", environ_base={"REMOTE_ADDR": "127.0.0.1"},
                           headers={"X-Forwarded-For": "203.0.113.9"})
    assert forwarded.status_code == 403


def test_apache_forwards_the_app_but_not_metrics():
    """The front-end's proxy forwards exactly /predict/, /health and /feedback: never /metrics."""
    text = PROXY_TEMPLATE.read_text()
    forwarded = re.findall(r'^\s*ProxyPass\s+"([^"]+)"', text, re.MULTILINE)
    assert sorted(forwarded) == ["/feedback", "/health", "/predict/"]
    assert not re.search(r"ProxyPassMatch|RewriteRule|metrics\"", text)
    location = re.search(r'<LocationMatch "([^"]+)">', text).group(1)
    assert re.match(location, "/feedback") and not re.match(location, "/metrics")
