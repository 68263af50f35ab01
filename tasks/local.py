"""The whole app on this machine: train if needed, serve the back-end and Files/.

No AWS, no SSH: the quickest way to see the guide's result, and what the
browser tests drive.
"""
import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from invoke import task
from invoke.exceptions import Exit

from .config import FILES, frontend_config_js

NOTEBOOK = FILES / "00-mnist-cnn.ipynb"
MODEL_NAME = "cnn-mnist.keras"


def train_here(output_dir, data=None, epochs=15, batch_size=128, limit=0, **more):
    """Run the training notebook headless on this machine (papermill), epochs shown live.

    `more`: other notebook parameters, e.g. feedback_path, base_model, fine_tune (issue 15)."""
    import papermill

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    parameters = {"epochs": epochs, "batch_size": batch_size, "output_dir": str(output_dir), "limit": limit,
                  **{name: str(value) if isinstance(value, Path) else value for name, value in more.items()}}
    if data:
        parameters["data_path"] = str(Path(data).resolve())
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(output_dir / "00-mnist-cnn.out.ipynb"),
        parameters=parameters,
        kernel_name="python3",
        stdout_file=sys.stdout,  # the notebook's output, per-epoch lines included, as it comes
        stderr_file=sys.stderr,
        progress_bar=False,
        cwd=str(FILES),
    )
    metrics = json.loads((output_dir / "metrics.json").read_text())
    print(f"test accuracy {metrics['test_accuracy']:.4f} after {metrics['epochs']} epochs")
    return output_dir / MODEL_NAME


class _FilesHandler(http.server.SimpleHTTPRequestHandler):
    """Serves Files/ like apache's /var/www/html, with a generated static/config.js."""

    config_js = b""

    def do_GET(self):
        if self.path.split("?")[0] == "/static/config.js":
            self.send_response(200)
            self.send_header("Content-Type", "text/javascript; charset=utf-8")
            self.send_header("Content-Length", str(len(self.config_js)))
            self.end_headers()
            self.wfile.write(self.config_js)
        else:
            super().do_GET()

    def log_message(self, *args):  # keep the terminal for the back-end's lines
        pass


class LocalApp:
    """The back-end under gunicorn and Files/ on a static server, both on loopback."""

    def __init__(self, model, host="127.0.0.1", port=8000, backend_port=5000, workers=2, state_dir=None):
        self.model = Path(model)
        # The corrections' database (POST /feedback); a fresh folder unless one is given.
        self._own_state = state_dir is None
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="digits-state-"))
        self.url = f"http://{host}:{port}/"
        self._backend_address = f"{host}:{backend_port}"
        self.backend_url = f"http://{self._backend_address}"
        handler = type("Handler", (_FilesHandler,), {"config_js": frontend_config_js(self.backend_url).encode()})
        self._static = http.server.ThreadingHTTPServer((host, port), functools.partial(handler, directory=str(FILES)))
        self._backend = subprocess.Popen(  # noqa: S603  (gunicorn_command: a fixed argv, no shell)
            gunicorn_command(host, backend_port, workers),
            cwd=FILES,
            env={**os.environ, "MODEL_PATH": str(self.model.resolve()), "STATE_DIR": str(self.state_dir)},
        )
        threading.Thread(target=self._static.serve_forever, daemon=True).start()

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._backend.poll() is not None:
                raise RuntimeError(f"the back-end exited with code {self._backend.returncode}")
            try:
                with urllib.request.urlopen(f"http://{self._backend_address}/health", timeout=2) as response:
                    return json.load(response)
            except OSError:  # refused, or accepted but not answering while workers load
                time.sleep(0.2)
        raise TimeoutError(f"the back-end did not answer on {self.backend_url}/health in {timeout}s")

    @property
    def running(self):
        return self._backend.poll() is None

    @property
    def backend_pid(self):
        """The gunicorn master's pid (its workers are its children)."""
        return self._backend.pid

    def stop(self):
        self._static.shutdown()
        self._static.server_close()
        self._backend.terminate()
        try:
            self._backend.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._backend.kill()
        if self._own_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self):
        self.wait_ready()
        return self

    def __exit__(self, *exc):
        self.stop()


def gunicorn_command(host, port, workers):
    """The back-end's server: gunicorn with Files/gunicorn.conf.py (run from Files/)."""
    if os.name == "nt":  # gunicorn is POSIX-only: Flask's threaded server on Windows
        return [sys.executable, "keras_flask.py", "--host", host, "--port", str(port)]
    return [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
            "--bind", f"{host}:{port}", "--workers", str(workers)]


@task(
    help={
        "quick": "train briefly (2 epochs on 20,000 images) when no model exists: a demo in about a minute",
        "model": "serve this model instead of <artifacts>/cnn-mnist.keras",
        "data": "local mnist.npz for training (default: config train.data, else Keras downloads it)",
        "port": "port of the page (default: config local.port)",
        "backend-port": "port of the back-end (default: config local.backend_port)",
    }
)
def local(c, quick=False, model=None, data=None, port=0, backend_port=0):
    """Run the whole app on this machine: train if needed, serve, print the URL."""
    model = Path(model or Path(c.config.train.artifacts) / MODEL_NAME)
    if not model.exists():
        print(f"no model at {model}: training one{' (quick)' if quick else ''}")
        epochs, limit = (2, 20000) if quick else (c.config.train.epochs, c.config.train.limit)
        model = train_here(model.parent, data or c.config.train.data, epochs, c.config.train.batch_size, limit)
    app = LocalApp(model, port=port or c.config.local.port, backend_port=backend_port or c.config.local.backend_port,
                   state_dir=model.parent / "state")  # the corrections stay beside the model
    # `kill` (SIGTERM) stops it as cleanly as Ctrl-C: the back-end goes down with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with app:
        print(f"\nThe digit app is at {app.url}  (back-end {app.backend_url}; Ctrl-C stops both)\n", flush=True)
        try:
            while app.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("stopping")
            return
    raise Exit("the back-end stopped on its own: its log is above; run `fab local` again")
