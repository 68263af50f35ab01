"""gunicorn's settings for the back-end: `gunicorn -c gunicorn.conf.py` in this folder.

One place for the service on the back-end host, `fab local` and the benchmarks.
Environment: HOST (0.0.0.0), PORT (5000), WORKERS (2), MODEL_PATH, CORS_ORIGINS.
"""
import os

wsgi_app = "keras_flask:create_app()"  # the app factory: the model loads once per worker
bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '5000')}"
workers = int(os.environ.get("WORKERS", "2"))
# Sync workers: a prediction is ~2 ms of CPU, never I/O-bound. Threaded workers keep
# keep-alive clients pinned to one process and can leave a core idle; bench/serving.py
# measured p99 11-12 ms with sync against 21-26 ms with gthread at 8 clients on 2 cores.
worker_class = "sync"
timeout = 30  # a worker stuck this long is restarted
graceful_timeout = 20  # on reload (a new model), in-flight requests get this long to finish
accesslog = "-"
