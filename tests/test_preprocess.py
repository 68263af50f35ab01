"""Files/keras_flask.py's preprocessing: a canvas drawing becomes an MNIST-like digit.

MNIST digits were made by fitting the ink into 20x20 and centring its mass in
28x28, so a drawing of an MNIST digit, in any style, size or place, must come
back close to the original digit.
"""
import base64
import io

import numpy as np
import pytest
from PIL import Image

from keras_flask import BadInput, NoDigit, image_bytes_from_body, preprocess
from tests.canvas import STYLES, data_url, render
from tests.fixtures import MNIST_NPZ

PLACES = {
    "large, centred": (220, (140, 140)),
    "small, top-right": (40, (250, 30)),
    "small, bottom-left": (36, (25, 255)),
    "medium, off-centre": (120, (190, 90)),
}


@pytest.fixture(scope="module")
def digits():
    with np.load(MNIST_NPZ) as data:
        return data["x_test"][:40], data["y_test"][:40]


def similarity(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("place", PLACES)
def test_drawn_digit_comes_back_like_mnist(digits, style, place):
    height, centre = PLACES[place]
    scores = [similarity(preprocess(render(d, style, height, centre)), d / 255.0) for d in digits[0]]
    assert np.mean(scores) > 0.95, scores
    assert min(scores) > (0.55 if height < 50 else 0.7)  # a 36-px drawing loses detail


@pytest.mark.parametrize("style", STYLES)
def test_output_is_mnist_shaped(digits, style):
    out = preprocess(render(digits[0][3], style, 60, (60, 200)))
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.max() > 0.9
    ys, xs = np.nonzero(out > 0.2)
    assert ys.max() - ys.min() < 21 and xs.max() - xs.min() < 21  # fitted into 20x20
    cy, cx = (np.indices(out.shape) * out).reshape(2, -1).sum(axis=1) / out.sum()
    assert abs(cy - 14) < 1.0 and abs(cx - 14) < 1.0  # centred by mass, like MNIST


def test_light_and_dark_ink_give_the_same_digit(digits):
    on_white = preprocess(render(digits[0][5], "white"))
    on_black = preprocess(render(digits[0][5], "dark"))
    on_nothing = preprocess(render(digits[0][5], "transparent"))
    assert np.abs(on_white - on_black).max() < 0.02
    assert np.abs(on_white - on_nothing).max() < 0.02


@pytest.mark.parametrize("mode, colour", [("RGB", "white"), ("RGB", "black"), ("RGBA", (0, 0, 0, 0))])
def test_blank_canvas_is_no_digit(mode, colour):
    buffer = io.BytesIO()
    Image.new(mode, (280, 280), colour).save(buffer, "PNG")
    with pytest.raises(NoDigit, match="no digit drawn"):
        preprocess(buffer.getvalue())


def test_data_url_and_plain_base64_and_form_encoding_decode_alike(digits):
    png = render(digits[0][0], "white")
    url = data_url(png)
    assert image_bytes_from_body(url.encode()) == png
    assert image_bytes_from_body(url.split(",", 1)[1].encode()) == png
    assert image_bytes_from_body(url.replace("+", "%2B").replace("/", "%2F").encode()) == png


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"", "empty body"),
        (b"data:image/png,notbase64", "not a base64 data URL"),
        (b"data:image/png;base64,***", "not valid base64"),
        (b"data:image/png;base64," + base64.b64encode(b"hello, not an image"), "not an image"),
    ],
)
def test_unreadable_bodies_say_why(body, reason):
    with pytest.raises(BadInput, match=reason):
        preprocess(image_bytes_from_body(body))
