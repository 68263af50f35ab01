"""The page in a real browser: Playwright drives Debian's chromium on Files/ served
on loopback (`local_app`: the static server with its generated static/config.js,
and the back-end under gunicorn with a briefly trained model).

Digits are drawn with real pointer input (mouse strokes, and touch through the
DevTools protocol), the page posts to the real back-end, and the tests read what
a person sees. Only the "back-end unreachable" cases point the page elsewhere.
"""
import base64
import re
import socket
import struct

import pytest

from tests.drawing import (
    ANSWER_TIMEOUT_MS,
    PAD,
    STROKES,
    draw_with_mouse,
    draw_with_touch,
    predict,
    shown,
    wait_for_answer,
)

pytestmark = pytest.mark.browser

# --- fixtures: one chromium for the session, a fresh context per test ---------


def _new_page(chromium, **context_options):
    context = chromium.new_context(**context_options)
    page = context.new_page()
    page.set_default_timeout(ANSWER_TIMEOUT_MS)
    errors = []  # uncaught exceptions in the page: none allowed
    page.on("pageerror", lambda error: errors.append(error))
    return context, page, errors


@pytest.fixture
def page(chromium):
    """A desktop-sized page on a 2x screen (the canvas' backing store is 560x560)."""
    context, page, errors = _new_page(chromium, viewport={"width": 900, "height": 760}, device_scale_factor=2)
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
def phone(chromium):
    """A phone-sized touch page on a 3x screen."""
    context, page, errors = _new_page(
        chromium, viewport={"width": 375, "height": 740}, device_scale_factor=3, is_mobile=True, has_touch=True
    )
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
def closed_port():
    """A loopback port that refuses connections: bound (so no one else takes it), not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def silent_port():
    """A loopback port that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


# --- helpers -----------------------------------------------------------------


def open_app(page, local_app, config_js=None):
    """Load the page; config_js replaces the served static/config.js when given."""
    if config_js is not None:
        page.route(
            "**/static/config.js",
            lambda route: route.fulfill(status=200, content_type="text/javascript", body=config_js),
        )
    page.goto(local_app.url)
    page.wait_for_function("window.DigitsApp && window.DigitsApp.ready === true")
    return page


def config_js(backend_url, **extra):
    fields = {"backendUrl": "null" if backend_url is None else f'"{backend_url}"'}
    fields.update({key: str(value) for key, value in extra.items()})
    return "window.DIGITS_CONFIG = {" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "};"


def ink_pixels(page):
    """How many pixels of the canvas' backing store are not white paper."""
    return page.evaluate(
        """() => {
            const c = document.getElementById('pad');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 0; i < d.length; i += 4) if (d[i] < 250 || d[i + 1] < 250 || d[i + 2] < 250) n++;
            return n;
        }"""
    )


def png_size(data_url):
    assert data_url.startswith("data:image/png;base64,"), data_url[:40]
    png = base64.b64decode(data_url.split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", png[16:24])


def assert_prediction(view, expected):
    assert view["kind"] == "message ok", view["status"]
    assert view["digit"] == str(expected), f"drew {expected}, the page shows {view['digit']}: {view['status']}"
    assert f"Predicted digit: {expected}" in view["status"]
    bars = view["bars"]
    assert [bar["label"] for bar in bars] == [str(d) for d in range(10)]
    probabilities = [bar["probability"] for bar in bars]
    assert None not in probabilities
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-3)
    assert max(probabilities) == probabilities[expected]
    assert [bar["top"] for bar in bars] == [d == expected for d in range(10)]
    percents = [float(bar["value"].rstrip("%")) for bar in bars]
    assert all(re.fullmatch(r"\d{1,3}\.\d%", bar["value"]) for bar in bars), [b["value"] for b in bars]
    assert sum(percents) == pytest.approx(100, abs=0.6)  # ten values rounded to 0.1
    assert max(percents) == percents[expected]
    for bar, p in zip(bars, probabilities, strict=True):
        assert float(bar["width"].rstrip("%")) == pytest.approx(100 * p, abs=0.01)


def assert_no_result(view):
    assert view["digit"] == "?"
    assert len(view["bars"]) == 10
    assert all(bar["probability"] is None and not bar["top"] for bar in view["bars"])
    assert all(bar["value"] == "\u2013" for bar in view["bars"])


# --- tests -------------------------------------------------------------------


def test_drawn_digits_are_recognised(page, local_app):
    """Each digit 0-9 drawn with the mouse is read back, with ten bars that add up to 100%."""
    posts = []
    page.on("request", lambda r: posts.append(r) if r.method == "POST" else None)
    open_app(page, local_app)
    for digit, strokes in STROKES.items():
        page.get_by_role("button", name="Clear").click()
        draw_with_mouse(page, strokes)
        with page.expect_response(lambda r: r.request.method == "POST") as answer:
            view = predict(page)
        assert answer.value.status == 200
        assert answer.value.json()["digit"] == digit
        assert_prediction(view, digit)

    assert len(posts) == len(STROKES)
    for request in posts:
        assert request.url == local_app.backend_url + "/predict/"
        assert request.headers["accept"] == "application/json"
        assert request.headers["content-type"].startswith("text/plain")  # a simple CORS request
        assert png_size(request.post_data) == (PAD, PAD)  # 280x280 whatever the pixel ratio


def test_touch_drawing_on_a_phone(phone, local_app):
    """A finger draws on the phone layout: the page does not scroll, the digit is read."""
    open_app(phone, local_app)
    box = phone.locator("#pad").bounding_box()
    assert box["width"] == pytest.approx(PAD, abs=1) and box["x"] >= 0 and box["x"] + box["width"] <= 375
    assert phone.eval_on_selector("#pad", "c => getComputedStyle(c).touchAction") == "none"
    draw_with_touch(phone, STROKES[7])
    assert phone.evaluate("window.scrollY") == 0
    assert ink_pixels(phone) > 0
    assert_prediction(predict(phone), 7)


def test_clear_resets_canvas_and_result(page, local_app):
    """Clear (here from the keyboard) blanks the canvas and removes the last answer."""
    open_app(page, local_app)
    assert ink_pixels(page) == 0
    draw_with_mouse(page, STROKES[1])
    assert ink_pixels(page) > 1000
    page.get_by_role("button", name="Predict").focus()
    page.keyboard.press("Enter")
    assert_prediction(wait_for_answer(page), 1)

    page.keyboard.press("Tab")  # Predict -> Clear
    assert page.evaluate("document.activeElement.id") == "clear"
    page.keyboard.press("Space")
    assert ink_pixels(page) == 0
    view = shown(page)
    assert_no_result(view)
    assert view["status"] == "Draw a digit to start."
    assert "error" not in view["kind"] and "ok" not in view["kind"]


def test_blank_canvas_says_no_digit_drawn(page, local_app):
    """Predict on an empty canvas: the back-end's 422 "no digit drawn" is shown, no stale answer."""
    open_app(page, local_app)
    draw_with_mouse(page, STROKES[4])
    assert_prediction(predict(page), 4)
    page.get_by_role("button", name="Clear").click()
    with page.expect_response(lambda r: r.request.method == "POST") as answer:
        view = predict(page)
    assert answer.value.status == 422
    assert answer.value.json() == {"error": "no digit drawn"}
    assert "error" in view["kind"]
    assert "no digit drawn" in view["status"].lower()
    assert_no_result(view)


def test_unreachable_back_end_is_explained(page, local_app, closed_port):
    """A back-end address where nothing listens: a clear message, and the page keeps working."""
    backend = f"http://127.0.0.1:{closed_port}"
    open_app(page, local_app, config_js(backend))
    assert page.inner_text("#backend") == backend
    draw_with_mouse(page, STROKES[7])
    view = predict(page)
    assert "error" in view["kind"]
    assert view["status"].startswith(f"Cannot reach the back-end at {backend}")
    assert_no_result(view)
    # Still usable: another try gives the same clear answer, Clear empties everything.
    assert predict(page)["status"] == view["status"]
    page.get_by_role("button", name="Clear").click()
    assert_no_result(shown(page))
    assert ink_pixels(page) == 0


def test_silent_back_end_times_out(page, local_app, silent_port):
    """A back-end that accepts the connection and never answers: the page gives up and says so."""
    backend = f"http://127.0.0.1:{silent_port}"
    open_app(page, local_app, config_js(backend, timeoutMs=1500))
    draw_with_mouse(page, STROKES[1])
    view = predict(page)
    assert "error" in view["kind"]
    assert view["status"] == f"The back-end at {backend} did not answer within 2 s. Try again."
    assert_no_result(view)


def test_served_config_points_the_page_at_the_back_end(page, local_app):
    """The generated static/config.js decides where predictions go (not port 5000)."""
    requests = []
    page.on("request", lambda r: requests.append(r.url) if r.method == "POST" else None)
    open_app(page, local_app)
    assert not local_app.backend_url.endswith(":5000")
    assert page.inner_text("#backend") == local_app.backend_url
    draw_with_mouse(page, STROKES[0])
    assert_prediction(predict(page), 0)
    assert requests == [local_app.backend_url + "/predict/"]


def test_backend_url_override_is_honoured(page, local_app):
    """A backendUrl written differently (trailing slash) still reaches the same /predict/."""
    requests = []
    page.on("request", lambda r: requests.append(r.url) if r.method == "POST" else None)
    open_app(page, local_app, config_js(local_app.backend_url + "/"))
    draw_with_mouse(page, STROKES[3])
    assert_prediction(predict(page), 3)
    assert requests == [local_app.backend_url + "/predict/"]


def test_default_config_uses_the_page_host_port_5000(page, local_app):
    """backendUrl null (the committed config.js): the page's own host, port 5000.

    The request is observed and refused by the browser itself, so whatever runs on
    this machine's port 5000 is never touched.
    """
    seen = []

    def refuse(route):
        seen.append(route.request.url)
        route.abort("connectionrefused")

    page.route(re.compile(r"^https?://[^/]+:5000/"), refuse)
    open_app(page, local_app, config_js(None))
    host = re.match(r"http://([^:/]+)", local_app.url).group(1)
    assert page.inner_text("#backend") == f"http://{host}:5000"
    draw_with_mouse(page, STROKES[1])
    view = predict(page)
    assert seen == [f"http://{host}:5000/predict/"] * 2  # a network error: asked once more
    assert view["status"].startswith(f"Cannot reach the back-end at http://{host}:5000")


class Answers:
    """Playwright's route on one back-end URL: the n-th request gets answers[n] (an HTTP status,
    "abort" for a network error, "hold" for no answer at all), the ones after go to the real
    back-end; each request's time is kept (Python's clock, when the route saw it)."""

    def __init__(self, page, url, *answers):
        self.answers, self.times, self.held = list(answers), [], []
        page.route(url, self.answer)

    def answer(self, route):
        import time

        self.times.append(time.monotonic())
        what = self.answers.pop(0) if self.answers else None
        if what is None:
            route.continue_()
        elif what == "abort":
            route.abort("connectionreset")
        elif what == "hold":
            self.held.append(route)  # never answered: the page gives up on it
        else:  # a balancer's page, or the back-end's JSON reason for a 4xx
            body, kind = (("<html>Bad Gateway</html>", "text/html") if what >= 500 else
                          ('{"error": "not a drawing"}', "application/json"))
            route.fulfill(status=what, body=body, content_type=kind,
                          headers={"Access-Control-Allow-Origin": "*"})


def test_a_failed_prediction_is_asked_once_more(page, local_app):
    """A 502 (the balancer's answer when a back-end died with the request), a network error, or
    no answer within half of timeoutMs: the page asks once more after its pause, and shows the digit."""
    open_app(page, local_app, config_js(local_app.backend_url, timeoutMs=6000))
    pause = page.evaluate("DigitsApp.RETRY_PAUSE_MS")
    assert 300 <= pause <= 500
    for failure, digit in (502, 7), ("abort", 1), ("hold", 4):
        page.get_by_role("button", name="Clear").click()
        page.unroute(local_app.backend_url + "/predict/")
        tries = Answers(page, local_app.backend_url + "/predict/", failure)
        draw_with_mouse(page, STROKES[digit])
        assert_prediction(predict(page), digit)
        assert len(tries.times) == 2, failure
        # The 502 or the reset was delivered after the route saw the first; the pause came after it.
        assert tries.times[1] - tries.times[0] >= pause / 1000, failure


def test_a_prediction_failed_twice_says_so(page, local_app):
    """Two failures in a row: no third try, a clear message, no stale answer."""
    open_app(page, local_app)
    draw_with_mouse(page, STROKES[2])
    tries = Answers(page, local_app.backend_url + "/predict/", 503, 504, 200)
    view = predict(page)
    assert view["status"] == "The back-end failed (HTTP 504)."
    assert "error" in view["kind"]
    assert_no_result(view)
    page.wait_for_timeout(1000)  # more than the pause: nothing more is sent
    assert len(tries.times) == 2 and tries.answers == [200]


def test_a_refused_drawing_is_not_asked_again(page, local_app):
    """A 400 or a 422 is about the drawing: shown at once, never retried."""
    open_app(page, local_app)
    draw_with_mouse(page, STROKES[5])
    for status in 400, 422:
        page.unroute(local_app.backend_url + "/predict/")
        tries = Answers(page, local_app.backend_url + "/predict/", status)
        view = predict(page)
        assert view["status"] == "Not a drawing." and "error" in view["kind"], status
        page.wait_for_timeout(1000)  # more than the pause
        assert len(tries.times) == 1, status


def test_a_correction_is_never_sent_twice(page, local_app):
    """/feedback stores a row per request: a 502 or a network error on it is shown, not retried."""
    open_app(page, local_app)
    draw_with_mouse(page, STROKES[7])
    predicted = int(predict(page)["digit"])
    for failure in 502, "abort":
        page.unroute(local_app.backend_url + "/feedback")
        tries = Answers(page, local_app.backend_url + "/feedback", failure)
        page.locator(f'#correct button[data-digit="{(predicted + 1) % 10}"]').click()
        page.wait_for_function("() => document.getElementById('correct-status').classList.contains('error')")
        assert "The correction was not saved" in page.inner_text("#correct-status")
        page.wait_for_timeout(1000)  # more than the pause
        assert len(tries.times) == 1, failure


def test_answers_of_every_kind_are_read(page, local_app):
    """app.js' reading of replies, run in the browser: the guide's plain-text digit, JSON, errors."""
    open_app(page, local_app)
    read = page.evaluate(
        """() => {
            const r = (status, type, text) => DigitsApp.interpretReply(status, type, text);
            const m = (status, type, text) => DigitsApp.errorMessage(r(status, type, text));
            return {
                plain: r(200, 'text/plain', '7\\n'),
                json: r(200, 'application/json', JSON.stringify({digit: 2, probabilities: [0,0,1,0,0,0,0,0,0,0]})),
                noBars: r(200, 'application/json', JSON.stringify({digit: 2, probabilities: [1, 2]})),
                noDigit: r(200, 'application/json', '{"probabilities": []}'),
                garbage: r(200, 'text/html', '<html>proxy</html>'),
                blank: m(422, 'application/json', '{"error": "no digit drawn"}'),
                tooBig: m(413, 'application/json', '{"error": "Request Entity Too Large"}'),
                crashed: m(502, 'text/html', '<html>Bad Gateway</html>'),
                failed: m(500, 'application/json', '{"error": "model failed"}'),
            };
        }"""
    )
    assert read["plain"] == {"digit": 7, "probabilities": None}
    assert read["json"]["digit"] == 2 and read["json"]["probabilities"][2] == 1
    assert read["noBars"]["digit"] == 2 and read["noBars"]["probabilities"] is None
    assert "error" in read["noDigit"] and "error" in read["garbage"]
    assert read["blank"] == "No digit drawn."
    assert read["tooBig"] == "Request Entity Too Large."
    assert read["crashed"] == "The back-end failed (HTTP 502)."
    assert read["failed"] == "The back-end failed (HTTP 500): model failed."


def test_committed_config_is_the_same_host_default():
    """The repository's static/config.js is the default that deploy tasks overwrite."""
    from tasks.config import FILES

    text = (FILES / "static" / "config.js").read_text()
    assert re.search(r"window\.DIGITS_CONFIG\s*=\s*\{\s*backendUrl:\s*null\s*\}", text)
    page = (FILES / "index.html").read_text()
    assert page.index('src="static/config.js"') < page.index('src="static/app.js"')
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere


def test_the_readme_screenshot_is_the_page_reading_a_digit(page, local_app, tmp_path):
    """The README's picture is made here: a 3 drawn and read. `UPDATE_SCREENSHOT=1` writes it into
    docs/img/page.png; otherwise the fresh one must have the committed one's size."""
    import os
    from pathlib import Path

    open_app(page, local_app)
    draw_with_mouse(page, STROKES[3])
    assert_prediction(predict(page), 3)
    committed = Path(__file__).parent.parent / "docs" / "img" / "page.png"
    made = committed if os.environ.get("UPDATE_SCREENSHOT") else tmp_path / "page.png"
    page.screenshot(path=made, animations="disabled")  # the bars at their final width
    size = struct.unpack(">II", made.read_bytes()[16:24])
    assert size == (900 * 2, 760 * 2)  # the fixture's viewport on a 2x screen
    assert struct.unpack(">II", committed.read_bytes()[16:24]) == size
