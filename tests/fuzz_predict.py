#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris) of POST /predict/: no input may get a 5xx or crash the app.

    MODEL_PATH=<folder>/cnn-mnist.keras python3 tests/fuzz_predict.py -atheris_runs=200000 [CORPUS_DIR ...]
    python3 tests/fuzz_predict.py --make-seeds CORPUS_DIR      # a few valid and broken images to start from

Any libFuzzer flag works (-max_total_time=600, -max_len=65536, -rss_limit_mb=1024,
-timeout=10, -artifact_prefix=DIR/). A failing input is saved as crash-<sha1> (or
timeout-, oom-) and replays with `python3 tests/fuzz_predict.py crash-<sha1>`.

Only PIL is instrumented: coverage of its Python image parsers (PNG chunks, GIF blocks,
JPEG markers) guides the mutations. Not keras_flask: atheris 3.0.0 keeps the result of
every comparison it instruments alive, and there the results are numpy arrays (1 MB for
`a > 5` on a 1 MB array, each call): the fuzzer's RSS grew by 15 kB an input and its
-rss_limit_mb stopped it, while the same inputs without instrumentation hold at ~90 MB.
Nor numpy, Flask or LiteRT: their instrumentation would only slow things down.

The first byte of an input chooses how the rest is sent: raw bytes, a data URL, plain
base64, or JSON {"image": <data URL>}; the Content-Type; and whether JSON is asked for.
"""
import base64
import io
import json
import math
import os
import sys
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "Files"))

with atheris.instrument_imports(include=["PIL"]):
    from PIL import Image

    Image.init()  # PIL imports its format plugins on first use: do it now, instrumented

import keras_flask  # noqa: E402  (after PIL: it imports PIL, which must come instrumented)

CONTENT_TYPES = (None, "application/x-www-form-urlencoded; charset=UTF-8", "application/json", "text/plain",
                 "image/png", "multipart/form-data; boundary=x", "application/octet-stream", "")
SHAPES = ("raw", "data URL", "base64", "JSON")


def request_for(data: bytes):
    """(body, headers) for one fuzz input: its first byte picks the shape and the headers."""
    control, payload = (data[0], data[1:]) if data else (0, b"")
    shape = SHAPES[control % 4]
    headers = {"Accept": "application/json"} if control & 4 else {}
    content_type = CONTENT_TYPES[(control >> 3) % len(CONTENT_TYPES)]
    if content_type is not None:
        headers["Content-Type"] = content_type
    if shape == "data URL":
        payload = b"data:image/png;base64," + base64.b64encode(payload)
    elif shape == "base64":
        payload = base64.b64encode(payload)
    elif shape == "JSON":
        payload = json.dumps({"image": "data:image/png;base64," + base64.b64encode(payload).decode()}).encode()
    return payload, headers


def check(status, content_type, body):
    """The contract: a digit (200) or a JSON reason (4xx); never a 5xx."""
    if status >= 500:
        raise AssertionError(f"{status}: {body[:300]!r}")
    if status >= 400:
        reason = json.loads(body)["error"]
        if not (content_type.startswith("application/json") and isinstance(reason, str) and reason):
            raise AssertionError(f"{status} without a JSON reason: {body[:300]!r}")
    elif content_type.startswith("text/plain"):
        if body not in [str(digit).encode() for digit in range(10)]:
            raise AssertionError(f"not a digit: {body[:300]!r}")
    else:
        answer = json.loads(body)
        p = answer["probabilities"]
        if not (len(p) == 10 and all(math.isfinite(v) for v in p) and abs(sum(p) - 1) < 1e-3
                and answer["digit"] in range(10) and p[answer["digit"]] == max(p)):
            raise AssertionError(f"bad answer: {answer}")


def make_client():
    model = os.environ.get("MODEL_PATH") or keras_flask.DEFAULT_MODEL
    if not Path(model).exists():
        sys.exit(f"no model at {model}: set MODEL_PATH to a cnn-mnist.keras (its .tflite beside it is served)")
    return keras_flask.create_app(model).test_client()


CLIENT = None


def TestOneInput(data: bytes):  # the name atheris looks for
    body, headers = request_for(data)
    reply = CLIENT.post("/predict/", data=body, headers=headers)
    check(reply.status_code, reply.headers.get("Content-Type", ""), reply.get_data())


def make_seeds(folder):
    """Valid images (every accepted format, canvas-like modes) and a few broken ones, one per shape."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ink = Image.new("L", (28, 28), 0)
    ink.paste(255, (12, 5, 16, 23))  # a "1"
    images = {}
    for fmt, mode in (("PNG", "L"), ("PNG", "RGBA"), ("PNG", "P"), ("PNG", "1"), ("JPEG", "RGB"),
                      ("GIF", "P"), ("WEBP", "RGB")):
        buffer = io.BytesIO()
        image = ink.convert(mode)
        if mode == "RGBA":
            image.putalpha(ink)
        image.save(buffer, fmt)
        images[f"{fmt}-{mode}"] = buffer.getvalue()
    images["PNG-truncated"] = images["PNG-L"][:60]
    images["JPEG-truncated"] = images["JPEG-RGB"][:200]
    for number, (name, image) in enumerate(images.items()):
        (folder / f"{name}-{SHAPES[number % 4]}").write_bytes(bytes([number % 4]) + image)
    return len(images)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--make-seeds"]:
        print(f"{make_seeds(sys.argv[2])} seeds in {sys.argv[2]}")
        sys.exit(0)
    CLIENT = make_client()
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
