"""gunicorn's settings for the back-end: `gunicorn -c gunicorn.conf.py` in this folder.

One place for the service on the back-end host, `fab local` and the benchmarks.
Environment: HOST (0.0.0.0), PORT (5000), WORKERS (2), MODEL_PATH, CORS_ORIGINS, ACCESS_LOG, LOG_LEVEL,
STATE_DIR (corrections and metrics; ./state), FEEDBACK_MAX_ROWS, FEEDBACK_MAX_MB.
"""
import os
import shutil

wsgi_app = "keras_flask:create_app()"  # the app factory: the model loads once per worker
bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '5000')}"
workers = int(os.environ.get("WORKERS", "2"))
# Sync workers: a prediction is ~2 ms of CPU, never I/O-bound. Threaded workers keep
# keep-alive clients pinned to one process and can leave a core idle; bench/serving.py
# measured p99 11-12 ms with sync against 21-26 ms with gthread at 8 clients on 2 cores.
worker_class = "sync"
timeout = 30  # a worker stuck this long is restarted
graceful_timeout = 20  # on reload (a new model), in-flight requests get this long to finish
# One line per request on the service's log; `fab local` turns it off (ACCESS_LOG=""): the
# terminal is for what a person must read.
accesslog = os.environ.get("ACCESS_LOG", "-") or None
loglevel = os.environ.get("LOG_LEVEL", "info")
# gunicorn 27's control socket (~/.gunicorn/gunicorn.ctl) is one more way to drive the service,
# and nothing here uses it: the service is reloaded by signals (systemd's ExecReload, fab local).
control_socket_disable = True

# /metrics (Files/metrics.py) in prometheus_client's multiprocess mode: each worker writes its
# counts to files here, read together by /metrics. Set before any worker imports the app
# (prometheus_client reads it on import); emptied when gunicorn starts, since counts from an
# earlier run would add to this one's.
metrics_dir = os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR", os.path.join(os.environ.get("STATE_DIR") or "state", "metrics"))


def on_starting(server):
    shutil.rmtree(metrics_dir, ignore_errors=True)
    os.makedirs(metrics_dir, mode=0o700)


def child_exit(server, worker):
    """A worker is gone (finished, killed, replaced on reload): drop its live-only gauges."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, metrics_dir)
