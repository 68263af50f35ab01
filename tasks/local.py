"""The whole app on this machine: train if needed, serve the back-end and Files/.

No AWS, no SSH: the quickest way to see the guide's result, and what the
browser tests drive.
"""
import functools
import hashlib
import http.server
import json
import os
import re
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
        extra_arguments=["--IPKernelApp.log_level=ERROR"],  # not its warning about TCP on loopback, each run
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

    def __init__(self, model, host="127.0.0.1", port=8000, backend_port=5000, workers=2, state_dir=None, log=None):
        """`log`: a file for the back-end's output (the tests'), instead of this terminal."""
        self.model = Path(model)
        self.log = Path(log) if log else None
        # The corrections' database (POST /feedback); a fresh folder unless one is given.
        self._own_state = state_dir is None
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="digits-state-"))
        self.url = f"http://{host}:{port}/"
        self._backend_address = f"{host}:{backend_port}"
        self.backend_url = f"http://{self._backend_address}"
        handler = type("Handler", (_FilesHandler,), {"config_js": frontend_config_js(self.backend_url).encode()})
        self._static = http.server.ThreadingHTTPServer((host, port), functools.partial(handler, directory=str(FILES)))
        output = open(self.log, "ab") if self.log else None  # the child has its own copy once started
        self._backend = subprocess.Popen(  # noqa: S603  (gunicorn_command: a fixed argv, no shell)
            gunicorn_command(host, backend_port, workers),
            cwd=FILES, stdout=output, stderr=subprocess.STDOUT if output else None,
            # MODEL_PATH not resolve()d: a swap repoints a link on the way.
            env={**os.environ, "MODEL_PATH": str(self.model.absolute()), "STATE_DIR": str(self.state_dir),
                 "ACCESS_LOG": "", "LOG_LEVEL": "warning"},  # the terminal: the URL and what goes wrong
        )
        if output:
            output.close()
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

    def wait_for_model(self, model, timeout=120):
        """Until /health reports `model` (its .tflite when there is one: what the back-end serves)."""
        served = model.with_suffix(".tflite") if model.with_suffix(".tflite").exists() else model
        expected = hashlib.sha256(served.read_bytes()).hexdigest()
        deadline = time.monotonic() + timeout
        while self.wait_ready()["model"]["sha256"] != expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the back-end did not load {served} within {timeout}s")
            time.sleep(0.2)

    @property
    def running(self):
        return self._backend.poll() is None

    def exit_report(self, lines=30):
        """How the back-end ended: its exit status, and the end of its log when it has one."""
        tail = self.log.read_text(errors="replace").splitlines()[-lines:] if self.log and self.log.exists() else []
        return "\n".join([f"the back-end exited with code {self._backend.poll()}", *tail])

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


class BackgroundTraining:
    """The full model, trained by the notebook (papermill) in a child process while a first one
    serves. Its output goes to <output_dir>/train.log; the terminal gets one line per epoch."""

    EPOCH = re.compile(r"Epoch (\d+)/(\d+)")
    VALIDATION = re.compile(r"val_accuracy: ([\d.]+)")

    def __init__(self, output_dir, data, epochs, batch_size, limit):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        parameters = {"epochs": epochs, "batch_size": batch_size, "limit": limit,
                      "output_dir": str(self.output_dir.resolve())}
        if data:
            parameters["data_path"] = str(Path(data).resolve())
        command = [sys.executable, "-m", "papermill", str(NOTEBOOK), str(self.output_dir / "00-mnist-cnn.out.ipynb"),
                   "--cwd", str(FILES), "--kernel", "python3", "--log-output", "--no-progress-bar"]
        for name, value in parameters.items():
            command += ["-p", name, str(value)]
        # Its own session: Ctrl-C in the terminal reaches `fab local`, which stops it.
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,  # noqa: S603
                                        start_new_session=True)
        self.started = time.monotonic()
        self._reader = threading.Thread(target=self._follow, daemon=True)
        self._reader.start()

    def _follow(self):
        epoch = total = 0
        with open(self.output_dir / "train.log", "w") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                found = self.EPOCH.search(line)
                if found:
                    epoch, total = int(found[1]), int(found[2])
                score = self.VALIDATION.search(line)
                if score and epoch:
                    left = (time.monotonic() - self.started) / epoch * (total - epoch)
                    print(f"  full model, in the background: epoch {epoch}/{total}, validation"
                          f" {float(score[1]):.2%}, about {left / 60:.0f} min left", flush=True)

    def finished(self):
        """None while training; else the metrics of the finished model (an error if it failed)."""
        if self.process.poll() is None:
            return None
        self._reader.join(5)
        if self.process.returncode != 0:
            raise RuntimeError(f"the full model's training failed (exit {self.process.returncode}):"
                               f" see {self.output_dir / 'train.log'}")
        return json.loads((self.output_dir / "metrics.json").read_text())

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def point(link, target):
    """Point the symlink `link` at `target` (relative to its folder) atomically: the back-end's
    MODEL_PATH goes through it, so a model swap is a rename and a graceful reload."""
    new = link.with_name(link.name + ".new")
    new.unlink(missing_ok=True)
    os.symlink(target, new)
    os.replace(new, link)


def promote(trained, artifacts):
    """Move a finished run's files into train.artifacts (where push-model and the next `fab local` look)."""
    for path in Path(trained).iterdir():
        if path.is_file():
            os.replace(path, Path(artifacts) / path.name)


def first_model(c, artifacts, data):
    """The model the page starts with: a brief run of the notebook (reused when one is there)."""
    folder = artifacts / "first"
    if not (folder / MODEL_NAME).exists():
        epochs, limit = c.config.local.first_epochs, c.config.local.first_limit
        print(f"no model at {artifacts / MODEL_NAME}: training a first one ({epochs} epochs), the page"
              " comes up as soon as it is ready", flush=True)
        train_here(folder, data, epochs, c.config.train.batch_size, limit)
    return folder


@task(
    help={
        "quick": "with no model yet, serve the first (brief) model only: do not train the full one meanwhile",
        "model": "serve this model instead of <artifacts>/cnn-mnist.keras",
        "data": "local mnist.npz for training (default: config train.data, else Keras downloads it)",
        "port": "port of the page (default: config local.port)",
        "backend-port": "port of the back-end (default: config local.backend_port)",
    }
)
def local(c, quick=False, model=None, data=None, port=0, backend_port=0):
    """Run the whole app on this machine: train if needed, serve, print the URL."""
    artifacts = Path(c.config.train.artifacts)
    data = data or c.config.train.data
    training = None
    if model or (artifacts / MODEL_NAME).exists():  # a model already trained is served at once
        model = Path(model or artifacts / MODEL_NAME)
    else:
        first = first_model(c, artifacts, data)
        if os.name == "nt":  # no symlinks for everyone, no gunicorn reload: the first model, directly
            model = first / MODEL_NAME
        else:
            point(artifacts / "serving", first.name)
            model = artifacts / "serving" / MODEL_NAME
        if not quick:
            training = BackgroundTraining(artifacts / "full", data, c.config.train.epochs,
                                          c.config.train.batch_size, c.config.train.limit)
    app = LocalApp(model, port=port or c.config.local.port, backend_port=backend_port or c.config.local.backend_port,
                   state_dir=artifacts / "state")  # the corrections stay with the models
    # `kill` (SIGTERM) stops it as cleanly as Ctrl-C: the back-end goes down with it. Ctrl-C is
    # handled explicitly too: started as a background job of a non-interactive shell, a process
    # inherits SIGINT ignored, and Python then installs no handler of its own.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with app:
            health = app.wait_ready()
            served = health["model"].get("test_accuracy")
            print(f"\nThe digit app is at {app.url}  (back-end {app.backend_url}; model"
                  f" {served:.2%} on MNIST test; Ctrl-C stops it)\n" if served is not None else
                  f"\nThe digit app is at {app.url}  (back-end {app.backend_url}; Ctrl-C stops it)\n", flush=True)
            while app.running:
                if training and training.process.poll() is not None:
                    try:
                        swap_in(app, training, artifacts, served)
                    except (RuntimeError, OSError) as error:  # the first model keeps serving
                        print(f"{error}; the first model keeps serving", flush=True)
                    training = None
                time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping")
        return
    finally:
        if training:
            training.stop()
    raise Exit("the back-end stopped on its own: its log is above; run `fab local` again")


def swap_in(app, training, artifacts, served):
    """The full model replaces the first when it is at least as good: files moved into the
    artifacts, the serving link repointed, gunicorn reloaded (no failed request)."""
    better = training.finished()["test_accuracy"]
    if served is not None and better < served:
        print(f"the full model reads {better:.2%} of MNIST test, the first {served:.2%}: keeping the first;"
              f" the full one is in {training.output_dir}", flush=True)
        return
    promote(training.output_dir, artifacts)
    if os.name == "nt":
        print(f"the full model ({better:.2%} on MNIST test) is in {artifacts}: restart `fab local` to serve it")
        return
    point(artifacts / "serving", ".")
    os.kill(app.backend_pid, signal.SIGHUP)  # gunicorn: new workers load it, the old ones finish
    app.wait_for_model(artifacts / MODEL_NAME)
    print(f"\nThe full model is serving now: {better:.2%} on MNIST test (the first: "
          f"{'?' if served is None else f'{served:.2%}'}). Still at {app.url}\n", flush=True)
