"""Accuracy benchmark, through HTTP: the guide's back-end against ours, same model.

    python bench/accuracy.py [--model artifacts/cnn-mnist.keras] [--count 2000]

Two sets, posted as the page posts them: MNIST test digits drawn large and
centred on a white canvas, and canvas-style digits (tests/canvas.py: small,
off-centre, bolder or finer pens, on transparent, white and dark canvases, PNG
and JPEG). Writes bench/results/accuracy.json.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import requests

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "Files")]
from bench.common import ensure_model, save_result  # noqa: E402
from bench.serving import start  # noqa: E402
from tasks.config import FILES  # noqa: E402
from tasks.local import gunicorn_command  # noqa: E402
from tests.canvas import canvas_set, data_url, render  # noqa: E402
from tests.fixtures import MNIST_NPZ, free_port  # noqa: E402


def accuracy(url, samples):
    with requests.Session() as session:
        answers = [session.post(url, data=data_url(image), timeout=30).text.strip() for image, _ in samples]
    return round(float(np.mean([answer == str(label) for answer, (_, label) in zip(answers, samples, strict=True)])), 4)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--count", type=int, default=2000, help="images per set (the first N test images)")
    args = parser.parse_args()
    model = ensure_model(args.model)
    with np.load(MNIST_NPZ) as data:
        x, y = data["x_test"][: args.count], data["y_test"][: args.count]
    sets = {
        "mnist_on_white_canvas": [(render(d, "white", 200), int(label)) for d, label in zip(x, y, strict=True)],
        "canvas_style": list(canvas_set(x, y, seed=7)),
    }
    work = Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    probe = sets["mnist_on_white_canvas"][0]
    results = {}
    guide_command = [sys.executable, str(Path(__file__).with_name("guide_backend.py")),
                     "--model", str(model), "--port", "{port}"]  # fmt: skip
    for name, command, cwd, env in [
        ("guide", guide_command, work, {}),
        ("ours", gunicorn_command("127.0.0.1", "{port}", 2), FILES, {"MODEL_PATH": str(model.resolve())}),
    ]:
        port = free_port()
        url = f"http://127.0.0.1:{port}/predict/"
        command = [part.replace("{port}", str(port)) for part in command]
        server, _ = start(command, cwd, url, data_url(probe[0]), str(probe[1]), env)
        try:
            results[name] = {set_name: accuracy(url, samples) for set_name, samples in sets.items()}
        finally:
            server.terminate()
            server.wait(20)
        print(f"{name:>6}: " + ", ".join(f"{k} {v:.2%}" for k, v in results[name].items()), flush=True)
    save_result("accuracy", {"count": args.count, **results})


if __name__ == "__main__":
    main()
