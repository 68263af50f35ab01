"""GET /metrics: what the back-end is doing, in Prometheus' text format (issue 15).

The official prometheus_client. Under gunicorn each worker is a process with its own
counts: in multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set and emptied at each start
by gunicorn.conf.py, which also marks a dead worker's files) every worker writes its
values to files there and /metrics adds them up, so a count survives the worker that
made it. Without that variable (`python keras_flask.py`, tests) one process counts.

/metrics answers only requests from this host (loopback): it is read over SSH
(`fab metrics`), and apache on the front-end does not forward it either.
"""
import ipaddress
import os
import time

from flask import Blueprint, Response, abort, current_app, g, request

# Read by prometheus_client when it is imported: gunicorn.conf.py sets it first.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

from prometheus_client import (  # noqa: E402  (after the check above, on purpose)
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily  # noqa: E402
from prometheus_client.exposition import choose_encoder  # noqa: E402

REQUESTS = Counter("digits_http_requests_total", "HTTP requests answered, by route, method and status",
                   ["route", "method", "status"])
LATENCY = Histogram("digits_http_request_duration_seconds", "Time to answer a request, by route", ["route"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
PREDICTIONS = Counter("digits_predictions_total", "Digits the model answered", ["digit"])
CORRECTIONS = Counter("digits_corrections_total", "Corrections stored, by the model's answer and the right digit",
                      ["predicted", "true"])
CORRECTIONS_DROPPED = Counter("digits_corrections_dropped_total",
                              "Oldest corrections deleted to keep within backend.feedback_max_rows/_mb")
DECODE_FAILURES = Counter("digits_image_decode_failures_total", "Images /predict/ could not read, by reason",
                          ["reason"])
# A gauge of 1 labelled with the model: "livemax" keeps only live workers' values, so after a
# model swap the old model's line goes with the old workers.
MODEL = Gauge("digits_model_info", "The model each live worker serves (value 1)", ["sha256", "format"],
              multiprocess_mode="livemax")


def count_prediction(digit):
    PREDICTIONS.labels(digit=str(digit)).inc()


def count_refusal(error):
    """A /predict/ body that is not a readable drawing: 'blank' (422) or 'unreadable' (400)."""
    if request.endpoint == "predict":
        DECODE_FAILURES.labels(reason="blank" if error.status == 422 else "unreadable").inc()


def count_correction(row, dropped):
    predicted = "unknown" if row["predicted"] is None else str(row["predicted"])
    CORRECTIONS.labels(predicted=predicted, true=str(row["label"])).inc()
    if dropped:
        CORRECTIONS_DROPPED.inc(dropped)


def from_this_host():
    """Asked on the host itself: a loopback peer, and no proxy's X-Forwarded-For (in public mode
    apache on the same host forwards the internet's requests to gunicorn from 127.0.0.1)."""
    if request.headers.get("X-Forwarded-For") is not None:
        return False
    try:
        return ipaddress.ip_address(request.remote_addr or "").is_loopback
    except ValueError:  # a Unix socket, or no address at all
        return False


class StoredToday:
    """digits_corrections_today{date}: the corrections the store (Files/feedback.py) holds a count of
    for this host's local date, read from SQLite at each scrape. Unlike a counter here it survives a
    restart and counts what `pull-feedback --clear` deleted since: "today" means since midnight."""

    def __init__(self, store):
        self.store = store

    def collect(self):
        date, count = self.store.stored_on()
        family = GaugeMetricFamily("digits_corrections_today", "Corrections stored since local midnight on this host",
                                   labels=["date"])
        family.add_metric([date], count)
        yield family


class Process:
    """This process's own metrics (the default registry) as one collector of another registry."""

    def collect(self):
        return REGISTRY.collect()


def registry(store=None):
    collected = CollectorRegistry()
    if MULTIPROCESS:
        multiprocess.MultiProcessCollector(collected)
    else:
        collected.register(Process())
    if store is not None:
        collected.register(StoredToday(store))
    return collected


def instrument(app, model):
    """Count every request of `app` and add GET /metrics."""
    MODEL.labels(sha256=model.sha256, format=model.format).set(1)
    bp = Blueprint("metrics", __name__)

    @app.before_request
    def started():
        g.metrics_started = time.perf_counter()

    @app.after_request
    def answered(response):
        started_at = g.pop("metrics_started", None)
        # The rule, not the path: a scanner's thousand paths are one "unmatched" line.
        route = request.url_rule.rule if request.url_rule else "unmatched"
        REQUESTS.labels(route=route, method=request.method, status=str(response.status_code)).inc()
        if started_at is not None:
            LATENCY.labels(route=route).observe(time.perf_counter() - started_at)
        return response

    @bp.get("/metrics")
    def metrics():
        if not from_this_host():
            abort(403, "metrics are read on the back-end host only (fab metrics)")
        # The format the scraper asks for (Prometheus' Accept header), else text 0.0.4.
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return Response(encode(registry(current_app.extensions.get("feedback_store"))), content_type=content_type)

    app.register_blueprint(bp)
