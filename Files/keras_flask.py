"""The back-end of the digit app (guide: "Back-End Python Server").

    python keras_flask.py --model cnn-mnist.keras --port 5000      # development
    gunicorn --bind 0.0.0.0:5000 'keras_flask:create_app()'         # production
    python keras_flask.py --check cnn-mnist.tflite                  # validate a model file

POST /predict/ takes the canvas data URL as the raw body (the guide's protocol,
whatever the Content-Type) and answers the digit as plain text; it answers JSON
when asked (`Accept: application/json`, or a JSON body {"image": "<data URL>"}).
GET /health reports the loaded model and its checksum. POST /feedback stores a
correction (Files/feedback.py); GET /metrics, from the host only (Files/metrics.py).

The model contract: input (N, 28, 28, 1) float32 in [0, 1], white digit on black
like MNIST; output 10 softmax probabilities. A `.tflite` file beside the `.keras`
one is preferred: LiteRT serves it without TensorFlow on the host.
"""
import argparse
import base64
import binascii
import contextlib
import gc
import hashlib
import io
import json
import os
import struct
import sys
import tempfile
import threading
import time
import urllib.parse
import warnings
from pathlib import Path

import numpy as np
from flask import Flask, jsonify, request
from flask_cors import CORS
from PIL import Image
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

import feedback
import metrics

VERSION = "1.0.0"
HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "cnn-mnist.keras"
MAX_BODY_BYTES = 2 * 1024 * 1024  # a 280x280 canvas PNG is 5-30 kB
MIN_SIDE, MAX_SIDE = 8, 4096  # pixels; checked from the header, before decoding
INK_THRESHOLD = 0.2  # ink level (0..1) that counts as drawn, above JPEG noise
# PIL's own guard stays on, at the most this app decodes: it is the only check on what PIL
# allocates while opening. Fuzzing found a 200-byte GIF whose first frame declares a
# 65280x63713 disposal area: with the guard off, Image.open() filled 4 GB for it.
Image.MAX_IMAGE_PIXELS = MAX_SIDE * MAX_SIDE  # PIL warns above this and refuses above twice this
# Its warning is about images the side check refuses anyway, and Python's default action
# remembers each distinct message: bombs of ever new sizes grew the worker, and its log.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# What a canvas (toDataURL) or a phone sends. PIL's other decoders only add attack
# surface: fuzzing made the PPM and IM ones raise ValueError, and EPS runs Ghostscript.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP")
# A progressive JPEG has about 10 scans, and each scan decodes the whole image again:
# 300 repeated scans (10 kB) of a 4096x4096 JPEG took 3 s, so a 2 MB body outlasts
# gunicorn's timeout and the worker is killed mid-request.
MAX_JPEG_SCANS = 100
# PIL's guard; its warning too, should a later filter make it an error.
BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
# What PIL raises on hostile bytes. Besides OSError, fuzzing found ValueError (a broken
# header, a PNG text chunk inflating past PIL's limit) and SyntaxError (a PNG whose data
# runs into garbage, from load()); PIL's plugins also use EOFError and struct.error.
DECODE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, struct.error, *BOMB_ERRORS)


class BadInput(ValueError):
    """The request cannot be read as a digit image (answered 400)."""

    status = 400


class NoDigit(BadInput):
    """The image is readable but blank (answered 422)."""

    status = 422


# --- Decoding ---------------------------------------------------------------


def image_bytes_from_body(body: bytes) -> bytes:
    """The image inside a data URL or plain base64 body, decoded in memory."""
    body = body.strip()
    if not body:
        raise BadInput("empty body: POST the canvas data URL (data:image/png;base64,...)")
    if b"%" in body:  # a client that form-encoded the data URL
        body = urllib.parse.unquote_to_bytes(body)
    if body.startswith(b"data:"):
        header, comma, body = body.partition(b",")
        if not comma or not header.endswith(b";base64"):
            raise BadInput("not a base64 data URL (expected data:image/png;base64,...)")
    try:
        return base64.b64decode(b"".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadInput("body is not valid base64") from None


def open_image(data: bytes) -> Image.Image:
    """The image in `data`, its header read and checked; nothing is decoded yet.

    Decoding costs memory and time in proportion to what the header declares, not to
    the size of the body: a 73 kB PNG can declare 4096x4096 RGBA (64 MB decoded).
    """
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except BOMB_ERRORS:
        raise BadInput(f"image has over {MAX_SIDE}x{MAX_SIDE} pixels: each side must be "
                       f"{MIN_SIDE} to {MAX_SIDE} pixels") from None
    except DECODE_ERRORS:
        raise BadInput("body is not an image (PNG, JPEG, GIF or WebP expected)") from None
    width, height = image.size
    if min(width, height) < MIN_SIDE or max(width, height) > MAX_SIDE:
        raise BadInput(f"image is {width}x{height}: each side must be {MIN_SIDE} to {MAX_SIDE} pixels")
    # 0xFFDA (start of scan) only appears as a marker: entropy-coded data escapes 0xFF.
    scans = data.count(b"\xff\xda") if data.startswith(b"\xff\xd8") else 0
    if scans > MAX_JPEG_SCANS:
        raise BadInput(f"JPEG has {scans} scans: at most {MAX_JPEG_SCANS} are decoded")
    return image


def ink_from_image(data: bytes) -> np.ndarray:
    """A uint8 map of ink (255 = ink, 0 = background) from image bytes, any polarity."""
    image = open_image(data)
    try:
        image.load()
        if image.mode.startswith("I;16"):  # a 16-bit grey PNG: convert("L") would clip it at 255
            image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
        if "transparency" in image.info:
            image = image.convert("RGBA")
        if "A" in image.getbands():
            alpha = np.asarray(image.getchannel("A"))
            if alpha.min() < 250:
                # A canvas is transparent by default: whatever was painted is ink.
                return alpha
        image = image.convert("L")  # and the decoded original goes: up to 64 MB
        gray = np.asarray(image)
    except DECODE_ERRORS:
        raise BadInput("image data is corrupt or truncated") from None

    # The border tells the background: MNIST is light ink on dark, so invert
    # dark-on-light drawings, then stretch so that the background is 0.
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = int(np.median(border))
    levels = np.arange(256)
    if background > 127:
        levels, background = 255 - levels, 255 - background
    # One lookup per pixel: int32 arithmetic on a 4096x4096 image peaked at 190 MB.
    table = np.clip((levels - background) * 255 // (255 - background), 0, 255).astype(np.uint8)
    return table[gray]


def mnist_like(ink: np.ndarray) -> np.ndarray:
    """Crop the ink, fit it into 20x20 keeping its aspect ratio, centre its mass in 28x28.

    This is how the MNIST digits were made, so drawings small, large or
    off-centre look to the model like what it was trained on.
    """
    drawn = ink > INK_THRESHOLD * 255
    rows, cols = np.flatnonzero(drawn.any(axis=1)), np.flatnonzero(drawn.any(axis=0))
    if rows.size == 0:
        raise NoDigit("no digit drawn")
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = crop.shape
    scale = 20.0 / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    patch = np.asarray(Image.fromarray(crop).resize(size, resample), dtype=np.float32) / 255.0

    ys, xs = np.indices(patch.shape)
    total = patch.sum()
    if total == 0:  # hairlines across a wide image average away when shrunk (found by fuzzing)
        raise NoDigit("the drawing is too faint or thin to read")
    cy, cx = (ys * patch).sum() / total, (xs * patch).sum() / total
    top = int(np.clip(round(14 - cy), 0, 28 - patch.shape[0]))
    left = int(np.clip(round(14 - cx), 0, 28 - patch.shape[1]))
    digit = np.zeros((28, 28), dtype=np.float32)
    digit[top : top + patch.shape[0], left : left + patch.shape[1]] = patch
    return digit


def preprocess(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes of a drawing -> (28, 28) float32 in [0, 1], like an MNIST digit."""
    return mnist_like(ink_from_image(data))


# --- The model ---------------------------------------------------------------


def resolve_model_path(path) -> Path:
    """The file to serve: a .tflite beside a .keras path wins (no TensorFlow needed)."""
    path = Path(path)
    lite = path.with_suffix(".tflite")
    if path.suffix == ".keras" and lite.exists():
        return lite
    return path


XNNPACK_NOTICE = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."


@contextlib.contextmanager
def _native_stderr_without(noise):
    """What C++ code writes to stderr (fd 2, which Python's redirections miss) meanwhile, minus the
    lines that start with `noise`: LiteRT announces its CPU delegate on every load, no setting stops it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines()
                    if line.strip() and not line.startswith(noise)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


class DigitModel:
    """A loaded model file: `probabilities(batch)` maps (N, 28, 28, 1) to (N, 10)."""

    def __init__(self, path, prefer_lite=True):
        self.path = resolve_model_path(path) if prefer_lite else Path(path)
        try:
            content = self.path.read_bytes()
        except OSError as error:
            raise RuntimeError(f"cannot read model {self.path}: {error.strerror}") from None
        self.sha256 = hashlib.sha256(content).hexdigest()
        self.format = "tflite" if self.path.suffix == ".tflite" else "keras"
        self.loaded_at = time.time()
        self._lock = threading.Lock()  # a LiteRT interpreter is not thread-safe
        if self.format == "tflite":
            self._run = self._tflite_runner(content)
        else:
            self._run = self._keras_runner()

    def _tflite_runner(self, content):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:  # the operator's machine may have TensorFlow instead
            from tensorflow.lite import Interpreter
        with _native_stderr_without(XNNPACK_NOTICE):  # printed by every worker at every load
            interpreter = Interpreter(model_content=content, num_threads=1)
            interpreter.allocate_tensors()
        source = interpreter.get_input_details()[0]
        target = interpreter.get_output_details()[0]["index"]

        def run(batch):
            results = []
            with self._lock:
                for image in batch:  # the graph is built for a batch of one
                    interpreter.set_tensor(source["index"], image[None].astype(source["dtype"]))
                    interpreter.invoke()
                    results.append(interpreter.get_tensor(target)[0].copy())
            return np.stack(results)

        return run

    def _keras_runner(self):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras

        model = keras.models.load_model(self.path, compile=False)
        # A direct call skips predict()'s per-call dataset and callback set-up.
        return lambda batch: np.asarray(model(batch, training=False))

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return self._run(np.asarray(batch, dtype=np.float32).reshape(-1, 28, 28, 1))

    def check(self):
        """Raise ValueError unless the model keeps the contract (10 probabilities)."""
        out = self.probabilities(np.zeros((1, 28, 28, 1), dtype=np.float32))
        if out.shape != (1, 10):
            raise ValueError(f"model output shape is {out.shape}, expected (1, 10)")
        if not np.isfinite(out).all() or abs(float(out.sum()) - 1.0) > 1e-3:
            raise ValueError("model output is not 10 softmax probabilities")

    def describe(self) -> dict:
        return {"path": str(self.path), "format": self.format, "sha256": self.sha256, "loaded_at": self.loaded_at,
                "test_accuracy": self.test_accuracy()}

    def test_accuracy(self):
        """MNIST test accuracy from the notebook's metrics.json beside the model, if it is there."""
        try:
            return float(json.loads((self.path.parent / "metrics.json").read_text())["test_accuracy"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


# --- The web app -------------------------------------------------------------


def _cors_origins(value):
    if value is None:
        value = os.environ.get("CORS_ORIGINS", "*")
    if isinstance(value, str):
        value = [origin.strip() for origin in value.split(",") if origin.strip()]
    return "*" if not value or "*" in value else value


def _wants_json() -> bool:
    return any(mime == "application/json" for mime, quality in request.accept_mimetypes if quality > 0)


def checked_image(body: bytes) -> bytes:
    """The image bytes inside a data URL, their header checked (format, sides) like /predict/'s."""
    data = image_bytes_from_body(body)
    open_image(data)
    return data


def add_feedback(app, state_dir=None):
    """POST /feedback (Files/feedback.py): corrections from the page, stored in SQLite."""
    store = feedback.store_from_environment(state_dir)
    app.extensions["feedback_store"] = store
    app.register_blueprint(feedback.blueprint(store, checked_image, preprocess, on_stored=metrics.count_correction,
                                              per_minute=feedback.per_minute_from_environment()))


def create_app(model_path=None, cors_origins=None, state_dir=None) -> Flask:
    """The Flask app: the model is loaded once, here, not per request."""
    app = Flask(__name__)
    # One byte more than the limit: Werkzeug cuts a chunked body (no Content-Length) at
    # MAX_CONTENT_LENGTH without a word, so only reading past the limit tells it was longer.
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES + 1
    model = DigitModel(model_path or os.environ.get("MODEL_PATH") or DEFAULT_MODEL)
    model.check()
    app.extensions["digit_model"] = model
    metrics.instrument(app, model)  # Files/metrics.py: GET /metrics, every request counted
    origins = _cors_origins(cors_origins)
    CORS(app, origins=origins, send_wildcard=origins == "*")

    @app.errorhandler(BadInput)
    def bad_input(error):
        metrics.count_refusal(error)
        return jsonify(error=str(error)), error.status

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(error):
        return jsonify(error=f"body is over the {MAX_BODY_BYTES // 1024} KiB limit"), 413

    @app.errorhandler(HTTPException)
    def http_error(error):
        return jsonify(error=error.description or error.name), error.code

    @app.post("/predict/", strict_slashes=False)
    def predict():
        started = time.perf_counter()
        body = request.get_data(cache=False)  # raw: old pages post it form-encoded
        if len(body) > MAX_BODY_BYTES:
            raise RequestEntityTooLarge()
        as_json = _wants_json()
        if body[:1] == b"{":
            try:
                body = json.loads(body)["image"].encode()
            # RecursionError: deeply nested JSON (found by fuzzing; it was a 500)
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                raise BadInput('JSON body must be {"image": "<data URL>"}') from None
            as_json = True
        digit_image = preprocess(image_bytes_from_body(body))
        probabilities = model.probabilities(digit_image)[0]
        digit = int(probabilities.argmax())
        metrics.count_prediction(digit)
        if not as_json:
            return str(digit), 200, {"Content-Type": "text/plain; charset=utf-8"}
        return jsonify(
            digit=digit,
            probabilities=[round(float(p), 6) for p in probabilities],
            confidence=round(float(probabilities[digit]), 6),
            model={"format": model.format, "sha256": model.sha256},
            # What the model saw, for a correction (POST /feedback): 28x28 uint8, base64.
            input=base64.b64encode(np.rint(digit_image * 255).astype(np.uint8).tobytes()).decode(),
            ms=round((time.perf_counter() - started) * 1000, 2),
        )

    @app.get("/health")
    def health():
        return jsonify(status="ok", model_loaded=True, model=model.describe(), version=VERSION)

    add_feedback(app, state_dir)

    # Everything loaded so far lives as long as the process: keep the garbage
    # collector from scanning it again and again (fewer pauses on the request path).
    gc.collect()
    gc.freeze()
    return app


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("MODEL_PATH", str(DEFAULT_MODEL)))
    parser.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "5000")))
    parser.add_argument("--cors-origins", default=None, help="comma-separated origins, or *")
    parser.add_argument("--check", metavar="MODEL", help="validate a model file and exit")
    args = parser.parse_args(argv)
    if args.check:
        try:
            model = DigitModel(args.check, prefer_lite=False)
            model.check()
        except Exception as error:  # any failure to load means: refuse this file
            print(f"refused {args.check}: {error}", file=sys.stderr)
            return 1
        print(f"ok {model.path} {model.format} sha256={model.sha256}")
        return 0
    app = create_app(args.model, args.cors_origins)
    app.run(host=args.host, port=args.port, threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
