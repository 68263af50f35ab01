"""The whole chain over real SSH, seen in a real browser: the page apache serves on
the front-end host, the prediction from the gunicorn back-end, the worker's model.
Then a second full run changes nothing."""
import json
import math
import time
import urllib.error
import urllib.request

import pytest
from invoke.exceptions import Exit

from tasks import backend, frontend, worker
from tasks.remote import sha256_file
from tests.attack import (
    Slowloris,
    Steady,
    flood_beside_a_person,
    mnist_digit,
    p99,
    refused_past_the_burst,
    under_attack,
)
from tests.drawing import (
    STROKES,
    draw_with_mouse,
    inline_code_is_refused,
    predict,
    predict_seen,
    violations,
    watch_policy,
)
from tests.fixtures import free_port
from tests.fixtures.ssh_hosts import ADDRESSES, captured

pytestmark = [pytest.mark.slow, pytest.mark.browser]
PAGE = f"http://{ADDRESSES['frontend']}/"
# (functions, not expressions: Playwright polls an expression with eval, which the page's CSP refuses)
READY = "() => window.DigitsApp && window.DigitsApp.ready === true"


def test_apache_serves_the_page_and_forwards_to_the_backend(frontend_deployed):
    """backend.mode proxied (the default): the page calls its own origin, which forwards
    /predict/ and /health to the back-end's private address."""
    result, printed = frontend_deployed.results["setup-frontend"]
    page = PAGE.rstrip("/")
    # Checked on the host, then from here as the browser will: page, config.js, then the back-end.
    for line in (f"changed: /etc/apache2/conf-available/digits-backend-proxy.conf -> back-end"
                 f" 127.0.0.4:{frontend_deployed.port}",
                 f"checked: the page answers on port 80: {page}",
                 f"checked: the page answers from here: {page}/",
                 f"checked: {page}/static/config.js names the back-end / (the page's own origin)",
                 f"checked: the back-end answers through the page's origin: {page}/health"):
        assert f"  {line}\n" in printed, (line, printed)
    with urllib.request.urlopen(PAGE + "static/config.js", timeout=5) as response:
        assert 'backendUrl: "/"' in response.read().decode()
    with urllib.request.urlopen(PAGE + "health", timeout=5) as response:
        forwarded = json.load(response)
    with urllib.request.urlopen(f"{frontend_deployed.backend_url}/health", timeout=5) as response:
        assert forwarded["model"]["sha256"] == json.load(response)["model"]["sha256"]
    # The back-end's own JSON errors come through apache unchanged (4xx, a reason).
    request = urllib.request.Request(PAGE + "predict/", data=b"data:image/png;base64,!!", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 400 and "error" in json.load(refused.value)
    # A body over the back-end's 2 MiB limit: refused by apache before forwarding, with JSON.
    for _ in range(5):  # (forwarded, it would race the back-end's early 413 into a 502 now and then)
        request = urllib.request.Request(PAGE + "predict/", data=b"x" * (3 << 20), method="POST")
        with pytest.raises(urllib.error.HTTPError) as too_big:
            urllib.request.urlopen(request, timeout=10)
        assert too_big.value.code == 413 and too_big.value.headers["Content-Type"] == "application/json"
        assert json.load(too_big.value)["error"].startswith("request body over 2 MiB")


def test_drawn_digit_is_predicted_by_the_workers_model(frontend_deployed, chromium):
    context = chromium.new_context(viewport={"width": 900, "height": 760}, device_scale_factor=2)
    page = context.new_page()
    page.set_default_timeout(20_000)
    posts = []
    page.on("response", lambda r: posts.append(r) if r.request.method == "POST" else None)
    refused_in_console = watch_policy(page)
    try:
        page.goto(PAGE)
        page.wait_for_function(READY)
        seen = {}
        for digit in (1, 7, 0):
            page.get_by_role("button", name="Clear").click()
            draw_with_mouse(page, STROKES[digit])
            seen[digit] = predict(page)["digit"]
        # The page did all that under its Content-Security-Policy, which it breaks nowhere ...
        assert violations(page) == [] and refused_in_console == []
        # ... and which holds: inline script and style are refused, and so is another origin.
        assert inline_code_is_refused(page) == [False, False]
        page.evaluate("fetch('http://127.0.0.2:9/').catch(() => null)")
        page.wait_for_function("() => window.__policyViolations.length >= 3")
        refused = violations(page)
    finally:
        context.close()
    assert seen == {1: "1", 7: "7", 0: "0"}
    assert sorted(refused) == ["connect-src http://127.0.0.2:9/", "script-src-elem inline", "style-src-attr inline"]
    assert any("violates the following Content Security Policy" in line for line in refused_in_console)
    # Each answer came through the page's own origin from the back-end host, whose /health
    # names the model the worker trained.
    assert [p.url for p in posts] == [f"{PAGE}predict/"] * 3
    assert all(p.status == 200 for p in posts)
    with urllib.request.urlopen(f"{frontend_deployed.backend_url}/health", timeout=5) as response:
        served = json.load(response)["model"]["sha256"]
    assert served == sha256_file(frontend_deployed.artifacts / "cnn-mnist.tflite")


POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'{};"
          " base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def answer(url, data=None, headers=None):
    """(status, headers) of a request through apache, error answers included."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.headers


def test_every_answer_carries_the_security_headers(frontend_deployed):
    """The page, its files, the back-end's answers forwarded, apache's own errors: each locks
    the page down. config.js is asked for again each time; the other files are revalidated."""
    result, printed = frontend_deployed.results["setup-frontend"]
    assert "  checked: the page carries its Content-Security-Policy (connect-src 'self')\n" in printed
    for path, data, status in (("", None, 200), ("static/app.js", None, 200), ("static/config.js", None, 200),
                               ("health", None, 200), ("predict/", b"data:image/png;base64,!!", 400),
                               ("no-such-page", None, 404), ("predict/", b"x" * (3 << 20), 413)):
        got, headers = answer(PAGE + path, data)
        assert got == status, (path, got)
        assert headers["Content-Security-Policy"] == POLICY.format(""), path
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert headers["X-Frame-Options"] == "DENY" and headers["Referrer-Policy"] == "no-referrer", path
        assert "camera=()" in headers["Permissions-Policy"] and "microphone=()" in headers["Permissions-Policy"]
    _, config = answer(PAGE + "static/config.js")
    assert config["Cache-Control"] == "no-cache" and config["ETag"]
    assert answer(PAGE + "static/config.js", headers={"If-None-Match": config["ETag"]})[0] == 304
    _, script = answer(PAGE + "static/app.js")
    assert script["Cache-Control"] is None and script["ETag"] and script["Last-Modified"]
    assert answer(PAGE + "static/app.js", headers={"If-None-Match": script["ETag"]})[0] == 304
    assert answer(PAGE + "static/app.js", headers={"If-Modified-Since": script["Last-Modified"]})[0] == 304


def test_second_full_run_changes_nothing(frontend_deployed):
    c = frontend_deployed.context()
    results = [task(c) for task in (worker.setup_worker, worker.train, backend.setup_backend,
                                    backend.push_model, frontend.setup_frontend)]
    assert [r["changed"] for r in results] == [0, 0, 0, 0, 0], results
    assert all(r["ok"] > 0 for r in results)


def test_deploy_from_the_inventory_skips_aws_and_changes_nothing(frontend_deployed):
    from tasks import deploy

    result, printed = captured(deploy.deploy, frontend_deployed.context())
    for step in ("create-vpc", "launch"):
        assert f"== {step}: skipped (hosts come from the inventory, ssh.hosts)" in printed
    assert "TASK [create-vpc]" not in printed  # AWS is never asked when every host is given
    assert result["changed"] == 0 and result["ok"] > 0
    assert result["url"] == PAGE
    assert f"DEPLOYED: ok={result['ok']} changed=0 checked={result['checked']}\n  the app: {PAGE}" in printed


def test_public_mode_page_calls_the_backend_itself(frontend_deployed, chromium):
    """The guide's way, still there: config.js names the back-end, whose CORS lets the page
    in; apache forwards nothing. Then back to the default."""
    c = frontend_deployed.context(backend={"mode": "public"})
    page, backend_url = PAGE.rstrip("/"), frontend_deployed.backend_url
    try:
        _, printed = captured(frontend.setup_frontend, c)
        assert "  changed: /etc/apache2/conf-available/digits-backend-proxy.conf removed" in printed
        assert f"  checked: the back-end answers the page's origin: {backend_url}/health allows {page}\n" in printed
        with urllib.request.urlopen(PAGE + "static/config.js", timeout=5) as response:
            assert f'backendUrl: "{backend_url}"' in response.read().decode()
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(PAGE + "health", timeout=5)
        assert missing.value.code == 404
        # The page may call the back-end's origin, and only it: a digit drawn is read from there.
        assert answer(PAGE)[1]["Content-Security-Policy"] == POLICY.format(f" {backend_url}")
        assert f"carries its Content-Security-Policy (connect-src 'self' {backend_url})\n" in printed
        context = chromium.new_context(viewport={"width": 900, "height": 760})
        page = context.new_page()
        page.set_default_timeout(20_000)
        refused_in_console = watch_policy(page)
        try:
            page.goto(PAGE)
            page.wait_for_function(READY)
            draw_with_mouse(page, STROKES[7])
            with page.expect_response(lambda r: r.request.method == "POST") as posted:
                assert predict(page)["digit"] == "7"
            assert posted.value.url == f"{backend_url}/predict/" and posted.value.status == 200
            assert violations(page) == [] and refused_in_console == []
        finally:
            context.close()
    finally:
        result = frontend.setup_frontend(frontend_deployed.context())
    assert result["changed"] >= 2  # the forwarding and config.js, back
    with urllib.request.urlopen(PAGE + "health", timeout=5) as response:
        assert json.load(response)["status"] == "ok"


def test_backend_down_is_named_and_the_page_gets_json(frontend_deployed):
    """Forwarding to a port where nothing answers: setup-frontend says so, and the page
    still gets JSON it can show (apache's 503, not its HTML)."""
    c = frontend_deployed.context(backend={"port": free_port("0.0.0.0")})
    try:
        with pytest.raises(Exit) as failed:
            frontend.setup_frontend(c)
        assert f"{PAGE}health does not reach the back-end through apache: 503" in failed.value.message
        request = urllib.request.Request(PAGE + "predict/", data=b"data:image/png;base64,", method="POST")
        with pytest.raises(urllib.error.HTTPError) as down:
            urllib.request.urlopen(request, timeout=5)
        assert down.value.code == 503 and down.value.headers["Content-Type"] == "application/json"
        assert "not answering" in json.load(down.value)["error"]
    finally:
        frontend.setup_frontend(frontend_deployed.context())


# --- slow and abusive clients, against apache on port 80 (proxied and private mode's edge) -------

ATTACK_SECONDS = 12  # bench/edge.py runs the same attack for 30 s, with the figures


def test_slow_clients_hold_no_worker(frontend_deployed):
    """Hundreds of connections sending their headers or their body a byte a second, while a
    person keeps drawing: every one of the person's digits is read. One address holds at most
    frontend.max_connections_per_ip of apache's threads; bodies are read in full by apache
    before the back-end (two gunicorn workers) sees them; headers that dribble get a 408."""
    label, body = mnist_digit(0)
    host, per_ip = ADDRESSES["frontend"], frontend_deployed.context().config.frontend.max_connections_per_ip
    steady = Steady(host, 80, "127.0.0.33", body)
    headers = Slowloris(host, 80, "127.0.0.31", "headers", connections=150)
    bodies = Slowloris(host, 80, "127.0.0.32", "body", connections=150)
    quiet, attacked = under_attack(steady, [headers, bodies], ATTACK_SECONDS, quiet_seconds=1.5)
    print(f"\n[edge] slowloris {ATTACK_SECONDS}s: headers {headers}\n  bodies {bodies}\n  person: {len(quiet)} quiet"
          f" p99 {p99([o[0] for o in quiet]):.3f}s, {len(attacked)} under attack p99"
          f" {p99([o[0] for o in attacked]):.3f}s", flush=True)
    failed = [o for o in quiet + attacked if o[1] != 200 or o[2].strip() != str(label)]
    assert not failed, failed[:5]
    assert len(attacked) >= ATTACK_SECONDS * 2  # answered all along, not once at the end
    # The attack was real and the edge held it: connections past the per-address limit were
    # turned away at once, and headers still incomplete after 10 s were cut with a 408.
    for attacker in (headers, bodies):
        assert attacker.opened >= 150 and sum(attacker.answered.values()) >= 150 - per_ip, attacker
    assert headers.answered.get("HTTP/1.1 408 Request Timeout", 0) >= per_ip // 2, headers.answered


def test_a_flood_gets_429_the_page_says_so_and_another_address_is_served(frontend_deployed, chromium):
    """One address posting as fast as it can: its first rate_burst requests are answered, then
    429 with Retry-After and a JSON reason, which the page shows; a person at another address
    is served meanwhile; the flooder is served again once Retry-After has passed."""
    settings = frontend_deployed.context().config.frontend
    burst, window = settings.rate_burst, math.ceil(settings.rate_burst / settings.rate_limit)
    label, body = mnist_digit(0)
    host = ADDRESSES["frontend"]
    context = chromium.new_context(viewport={"width": 900, "height": 760})
    page = context.new_page()
    page.set_default_timeout(20_000)
    try:
        page.goto(PAGE)  # (the page and its files: not counted, only /predict/ is)
        page.wait_for_function(READY)
        draw_with_mouse(page, STROKES[7])
        answers, outcomes, (refused, shown) = flood_beside_a_person(host, 80, body, 3 * burst,
                                                                    lambda: predict_seen(page))
        reason = refused_past_the_burst(answers, burst, window)
        assert reason == {"error": "too many requests from your address: wait a few seconds and try again"}
        assert refused.status == 429 and "error" in shown["kind"]
        assert shown["status"] == "Too many requests from your address: wait a few seconds and try again."
        assert outcomes and all(o[1] == 200 and o[2].strip() == str(label) for o in outcomes), outcomes
        time.sleep(window + 1)  # Retry-After honoured: served again
        assert predict(page)["digit"] == "7"
    finally:
        context.close()
