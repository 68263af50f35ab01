"""Where one /predict/ request's time goes: base64, image decode, preprocessing, inference, and
the rest (Flask, JSON, the WSGI layer), in this process, on the canvas-style PNG bench/serving.py
posts. The next gain is where the biggest share is.

    python bench/request_time.py [--model artifacts/cnn-mnist.keras] [--requests 2000]

Writes bench/results/request_time.json. (gunicorn's own share, and the client's, are what
bench/serving.py measures on top of this.)
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "Files")]
import keras_flask  # noqa: E402
from bench.common import ensure_model, save_result  # noqa: E402
from tests.canvas import data_url, render  # noqa: E402
from tests.fixtures import MNIST_NPZ  # noqa: E402


def per_call_ms(function, count):
    started = time.perf_counter()
    for _ in range(count):
        function()
    return (time.perf_counter() - started) * 1000 / count


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    model_path = ensure_model(args.model)
    with np.load(MNIST_NPZ) as data:
        digit = data["x_test"][0]
    body = data_url(render(digit, style="transparent")).encode()  # what the page's canvas posts
    image = keras_flask.image_bytes_from_body(body)
    ink = keras_flask.ink_from_image(image)
    batch = keras_flask.mnist_like(ink)[None, ..., None]
    model = keras_flask.DigitModel(model_path)
    app = keras_flask.create_app(str(model_path)).test_client()
    n = args.requests
    stages = {
        "base64": per_call_ms(lambda: keras_flask.image_bytes_from_body(body), n),
        "decode": per_call_ms(lambda: keras_flask.ink_from_image(image), n),
        "preprocess": per_call_ms(lambda: keras_flask.mnist_like(ink), n),
        "inference": per_call_ms(lambda: model.probabilities(batch), n),
    }
    headers = {"Accept": "application/json"}
    total = per_call_ms(lambda: app.post("/predict/", data=body, headers=headers), n)
    stages["framework"] = max(0.0, total - sum(stages.values()))
    print(f"one request, {n} times, in-process: {total:.3f} ms ({1000 / total:.0f} requests/s on one core)")
    for name, ms in stages.items():
        print(f"  {name:<11} {ms:7.3f} ms  {ms / total:6.1%}")
    save_result("request_time", {"requests": n, "total_ms": round(total, 4),
                                 "stages_ms": {k: round(v, 4) for k, v in stages.items()},
                                 "requests_per_s_one_core": round(1000 / total, 1)})


if __name__ == "__main__":
    main()
