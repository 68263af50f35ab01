"""Drawing on the page's canvas with real pointer input, and reading what the page shows.

Used by the browser tests of the page served locally (tests/test_browser.py) and by
apache on the front-end test host (tests/test_frontend.py).
"""
import itertools
import math
import os

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ANSWER_TIMEOUT_MS = 20_000  # the page gives up after 10 s; the test waits a little longer
PAD = 280  # the canvas' logical size: stroke coordinates below are in these units


def arc(cx, cy, rx, ry, start, end, n=24):
    """Points along an ellipse arc; angles in degrees, 0 = right, 90 = down."""
    return [
        (cx + rx * math.cos(math.radians(start + (end - start) * i / n)),
         cy + ry * math.sin(math.radians(start + (end - start) * i / n)))
        for i in range(n + 1)
    ]  # fmt: skip


# Digits as people write them for MNIST: tall, upright, one or two strokes each.
STROKES = {
    0: [arc(140, 140, 58, 88, -90, 270, 36)],
    1: [[(150, 45), (145, 140), (140, 235)]],
    2: [arc(140, 95, 55, 50, 180, 380, 20) + [(85, 230), (205, 230)]],
    3: [arc(135, 92, 52, 45, 200, 450, 20) + arc(135, 182, 58, 50, -90, 150, 20)],
    4: [[(120, 45), (90, 165), (210, 165)], [(175, 95), (175, 240)]],
    5: [[(195, 55), (105, 55), (98, 130)] + arc(138, 178, 58, 52, -125, 150, 20)],
    6: [[(185, 50), (135, 85), (100, 150)] + arc(142, 185, 45, 48, 180, 540, 30)],
    7: [[(80, 55), (200, 55), (125, 235)]],
    8: [arc(140, 95, 45, 45, 90, 450, 30), arc(140, 185, 55, 50, -90, 270, 30)],
    9: [arc(135, 95, 50, 45, 0, 360, 30), [(185, 95), (175, 240)]],
}


def draw_with_mouse(page, strokes):
    box = page.locator("#pad").bounding_box()
    scale = box["width"] / PAD
    for stroke in strokes:
        x, y = stroke[0]
        page.mouse.move(box["x"] + x * scale, box["y"] + y * scale)
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x * scale, box["y"] + y * scale, steps=4)
        page.mouse.up()


def draw_with_touch(page, strokes):
    """Real touch input through the DevTools protocol: chromium turns it into pointer events."""
    cdp = page.context.new_cdp_session(page)
    box = page.locator("#pad").bounding_box()
    scale = box["width"] / PAD

    def touch(kind, point=None):
        points = [] if point is None else [{"x": box["x"] + point[0] * scale, "y": box["y"] + point[1] * scale}]
        cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": points})

    for stroke in strokes:
        touch("touchStart", stroke[0])
        for a, b in itertools.pairwise(stroke):
            for i in range(1, 5):
                touch("touchMove", (a[0] + (b[0] - a[0]) * i / 4, a[1] + (b[1] - a[1]) * i / 4))
        touch("touchEnd")
    cdp.detach()


def predict(page):
    """Click Predict and wait until the page shows an answer or an error."""
    page.get_by_role("button", name="Predict").click()
    return wait_for_answer(page)


def predict_seen(page):
    """predict(), with the back-end's answer as the browser got it: (response, what the page shows)."""
    with page.expect_response(lambda response: response.request.method == "POST") as answered:
        shown = predict(page)
    return answered.value, shown


def wait_for_answer(page):
    page.wait_for_function(
        # A function, not an expression: Playwright polls an expression with the page's eval,
        # which the page's Content-Security-Policy (no 'unsafe-eval') refuses.
        "() => ['ok', 'error'].some(k => document.getElementById('status').classList.contains(k))",
        timeout=ANSWER_TIMEOUT_MS,
    )
    return shown(page)


def shown(page):
    """What the page shows: digit, status (and its kind), and the ten bars."""
    return page.evaluate(
        """() => ({
            digit: document.getElementById('digit').textContent.trim(),
            status: document.getElementById('status').textContent.trim(),
            kind: document.getElementById('status').className,
            bars: [...document.querySelectorAll('#bars .bar')].map(li => ({
                label: li.querySelector('.bar-label').textContent.trim(),
                value: li.querySelector('.bar-value').textContent.trim(),
                probability: li.dataset.probability === undefined ? null : Number(li.dataset.probability),
                width: li.querySelector('.bar-fill').style.width,
                top: li.classList.contains('top'),
            })),
        })"""
    )


# Recorded from the first script on (an init script runs through DevTools, outside the page's
# policy): every Content-Security-Policy violation the document sees.
WATCH_POLICY = """
window.__policyViolations = [];
document.addEventListener('securitypolicyviolation', e => {
    window.__policyViolations.push(e.effectiveDirective + ' ' + (e.blockedURI || 'inline'));
}, true);
"""


def watch_policy(page):
    """Watch `page` for Content-Security-Policy violations: the list returned fills with the
    console's "violates the following Content Security Policy" errors; `violations(page)`
    gives the violation events the document saw."""
    console = []
    page.add_init_script(WATCH_POLICY)
    page.on("console", lambda m: console.append(m.text) if "Content Security Policy" in m.text else None)
    return console


def violations(page):
    return page.evaluate("window.__policyViolations")


def inline_code_is_refused(page):
    """Inline script and an inline style attribute, injected now: (ran, styled) for each; under
    the page's policy both are refused (and each is a violation the watch records)."""
    return page.evaluate(
        """() => {
            const script = document.createElement('script');
            script.textContent = 'window.__inlineRan = true;';
            document.body.appendChild(script);
            const probe = document.createElement('p');
            probe.setAttribute('style', 'margin-left: 123px');
            document.body.appendChild(probe);
            const styled = getComputedStyle(probe).marginLeft === '123px';
            probe.remove();
            return [window.__inlineRan === true, styled];
        }"""
    )
