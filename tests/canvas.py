"""Digits as a person draws them on the page's canvas, made from MNIST test digits.

Each style is a way a canvas image reaches the back-end: the browser's default
transparent canvas, dark ink on white, light ink on dark, and a JPEG. Sizes and
positions vary like real drawings do. Used by the tests and by bench/accuracy.py.
"""
import base64
import io

import numpy as np
from PIL import Image, ImageFilter

STYLES = ("transparent", "white", "dark", "jpeg")
CANVAS = 280


def render(digit28, style="white", height=180, centre=(140, 140), stroke=0):
    """Encoded image bytes of an MNIST digit drawn `height` px tall at `centre` on a canvas.

    stroke > 0 thickens the ink, < 0 thins it (a wider or narrower pen).
    """
    ys, xs = np.nonzero(digit28 > 0)
    crop = Image.fromarray(digit28[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])
    width = max(1, round(crop.width * height / crop.height))
    ink = crop.resize((width, height), Image.Resampling.LANCZOS)
    if stroke:
        size = 2 * abs(stroke) + 1
        ink = ink.filter(ImageFilter.MaxFilter(size) if stroke > 0 else ImageFilter.MinFilter(size))
    layer = Image.new("L", (CANVAS, CANVAS), 0)
    layer.paste(ink, (centre[0] - width // 2, centre[1] - height // 2))
    level = np.asarray(layer)

    buffer = io.BytesIO()
    if style == "transparent":  # black ink whose alpha is the ink: the canvas default
        rgba = np.zeros((CANVAS, CANVAS, 4), np.uint8)
        rgba[..., 3] = level
        Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    elif style == "white":
        Image.fromarray(255 - level).convert("RGB").save(buffer, "PNG")
    elif style == "dark":
        Image.fromarray(level).convert("RGB").save(buffer, "PNG")
    elif style == "jpeg":
        Image.fromarray(255 - level).convert("RGB").save(buffer, "JPEG", quality=85)
    else:
        raise ValueError(f"unknown style {style!r}")
    return buffer.getvalue()


def data_url(image_bytes):
    kind = "jpeg" if image_bytes[:2] == b"\xff\xd8" else "png"
    return f"data:image/{kind};base64,{base64.b64encode(image_bytes).decode()}"


def canvas_set(x, y, seed=0):
    """(image bytes, label) pairs: every digit in a random style, size, place and pen."""
    rng = np.random.default_rng(seed)
    for digit, label in zip(x, y, strict=True):
        height = int(rng.integers(40, 240))
        half = height // 2 + 2
        centre = tuple(int(rng.integers(half, CANVAS - half)) for _ in range(2))
        style = STYLES[int(rng.integers(len(STYLES)))]
        stroke = int(rng.integers(-1, 3)) if height > 120 else 0
        yield render(digit, style, height, centre, stroke), int(label)
