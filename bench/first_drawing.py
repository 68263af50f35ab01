"""Time to first drawing: `fab local` with no model yet, from the command to the first digit read
right, then to the full model serving; the accuracy of each. The baseline (the guide's order, and
this project's before) is the page appearing only once the full model is trained.

    python bench/first_drawing.py [--data ../shared/data/mnist.npz]

Writes bench/results/first_drawing.json.
"""
import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import save_result
from tasks.config import DEFAULTS, FILES, ROOT
from tests.fixtures import free_port

DIGIT = "data:image/png;base64," + base64.b64encode((FILES / "9.png").read_bytes()).decode()


def read_right(backend):
    """True once the back-end reads the sample 9 as 9."""
    request = urllib.request.Request(backend + "/predict/", data=DIGIT.encode(), method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310  (loopback, http)
            return response.read().decode() == "9"
    except OSError:
        return False


def health(backend):
    with urllib.request.urlopen(backend + "/health", timeout=5) as response:  # noqa: S310  (loopback, http)
        return json.load(response)["model"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULTS["train"]["data"], help="local mnist.npz")
    args = parser.parse_args()
    artifacts = Path(tempfile.mkdtemp(prefix="first-drawing-"))
    port, backend_port = free_port(), free_port()
    backend = f"http://127.0.0.1:{backend_port}"
    env = {**os.environ, "FABRIC_TRAIN_ARTIFACTS": str(artifacts)}
    if args.data:
        env["FABRIC_TRAIN_DATA"] = str(args.data)
    started = time.monotonic()
    app = subprocess.Popen([shutil.which("fab"), "local", "--port", str(port), "--backend-port", str(backend_port)],  # noqa: S603
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in app.stdout:
            print(line, end="", flush=True)
            if "The digit app is at" in line:
                break
        while not read_right(backend):
            time.sleep(0.2)
        first_seconds, first = time.monotonic() - started, health(backend)
        print(f"[bench] first digit read right {first_seconds:.0f} s after `fab local`"
              f" (model {first['test_accuracy']:.2%} on MNIST test)", flush=True)
        for line in app.stdout:
            print(line, end="", flush=True)
            if "The full model is serving now" in line:
                break
        full_seconds, full = time.monotonic() - started, health(backend)
    finally:
        app.send_signal(signal.SIGINT)
        app.wait(60)
        shutil.rmtree(artifacts, ignore_errors=True)
    print(f"[bench] first digit read right after {first_seconds:.0f} s ({first['test_accuracy']:.2%});"
          f" the full model serving after {full_seconds:.0f} s ({full['test_accuracy']:.2%}):"
          f" the page comes {full_seconds / first_seconds:.1f}x sooner than when it waited for the full model")
    save_result("first_drawing", {"first_digit_seconds": round(first_seconds, 1),
                                  "first_test_accuracy": first["test_accuracy"],
                                  "full_model_seconds": round(full_seconds, 1),
                                  "full_test_accuracy": full["test_accuracy"],
                                  "speedup_vs_waiting_for_the_full_model": round(full_seconds / first_seconds, 2)})


if __name__ == "__main__":
    main()
