"""backend.mode public on the loopback hosts, attacked: the page calls the back-end's port itself,
where apache on the back-end host (tasks/public_edge.py) now answers, in front of gunicorn on
127.0.0.1:backend.app_port. Slow clients hold none of gunicorn's workers; a flood gets 429 with a
reason the page (another origin) can read and show; a person elsewhere is served meanwhile.
Then back to proxied: apache leaves the back-end's port and gunicorn takes it again."""
import json
import math
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tasks import backend, corrections, frontend, public_edge
from tests.attack import (
    Slowloris,
    Steady,
    flood_beside_a_person,
    mnist_digit,
    p99,
    refused_past_the_burst,
    under_attack,
)
from tests.drawing import STROKES, draw_with_mouse, predict, predict_seen, violations, watch_policy
from tests.fixtures import free_port
from tests.fixtures.ssh_hosts import ADDRESSES, captured

pytestmark = [pytest.mark.slow, pytest.mark.browser]
BACKEND, PAGE = ADDRESSES["backend"], f"http://{ADDRESSES['frontend']}"
READY = "() => window.DigitsApp && window.DigitsApp.ready === true"
ATTACK_SECONDS = 12  # past the 10 s header timeout; bench/edge.py runs 30 s with the figures


@pytest.fixture(scope="module")
def public(backend_deployed):
    """The stack in public mode: the back-end with apache on its port, the page naming it;
    proxied again afterwards."""
    app_port = free_port("0.0.0.0")
    c = backend_deployed.context(backend={"mode": "public", "app_port": app_port})
    try:
        backend_deployed.results["setup-backend public"] = captured(backend.setup_backend, c)
        frontend.setup_frontend(c)  # config.js and the page's CSP name the back-end's origin
        yield backend_deployed, c, app_port
    finally:
        # Each step whatever the one before did: the back-end first (apache off its port, which the
        # rest of the session's gunicorn needs), then the page, then the shared apache's edge conf.
        try:
            backend.setup_backend(backend_deployed.context())  # (converged already where the last test ran)
        finally:
            try:
                frontend.setup_frontend(backend_deployed.context())
            finally:
                # The test hosts' apache is this machine's, shared by every checkout's sessions in turn: the
                # front-end's edge conf is left to the session that writes it (as tests/test_frontend.py does).
                subprocess.run(["a2disconf", "-q", frontend.EDGE], check=True)
                subprocess.run(["apache2ctl", "graceful"], check=True)


def answer(url, data=None, headers=None):
    """(status, headers, body) of a request, error answers included."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


def listening(port):
    """The local addresses something listens on at `port` on this machine (the hosts' machine)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split()[3] for line in out.splitlines())


def test_public_mode_puts_apache_between_the_internet_and_gunicorn(public):
    scenario, c, app_port = public
    port, url = scenario.port, f"http://{BACKEND}:{scenario.port}"
    _, printed = scenario.results["setup-backend public"]
    for line in (f"changed: /etc/apache2/conf-available/digits-backend-edge.conf -> port {port} -> gunicorn on"
                 f" 127.0.0.1:{app_port}; /predict/ at most 10/s per address",
                 f"checked: /health on port {app_port} serves model sha256",
                 f"checked: port {port} answers /health through apache (gunicorn on 127.0.0.1:{app_port} only)"):
        assert f"  {line}" in printed, (line, printed)
    # gunicorn on the loopback only; the public port is apache's, on every address
    assert listening(app_port) == [f"127.0.0.1:{app_port}"]
    assert listening(port) == [f"*:{port}"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((BACKEND, app_port), timeout=5).close()
    status, headers, body = answer(f"{url}/health")
    assert status == 200 and headers["Server"] == "gunicorn" and json.loads(body)["model_loaded"]
    # Only the app's routes are forwarded: /metrics stays on the host (fab metrics reads gunicorn's port).
    assert answer(f"{url}/metrics")[0] == 403
    assert answer(f"{url}/")[0] == 403  # nor Debian's default page, nor anything but the app's routes
    assert answer(f"{url}/predict/", b"data:image/png;base64,!!")[0] == 400  # gunicorn's own refusal
    assert corrections.metrics(c, interval=0.2)["metrics"]["refused_4xx"] >= 1
    # apache's refusals are JSON the page's origin may read (gunicorn's answers carry their own CORS).
    status, headers, body = answer(f"{url}/predict/", b"x" * (3 << 20), {"Origin": PAGE})
    assert status == 413 and headers["Content-Type"] == "application/json" and "2 MiB" in json.loads(body)["error"]
    assert headers["Access-Control-Allow-Origin"] == PAGE
    assert "Access-Control-Allow-Origin" not in answer(f"{url}/predict/", b"x" * (3 << 20),
                                                       {"Origin": "http://127.0.0.9"})[1]
    again = backend.setup_backend(c)
    assert again["changed"] == 0, again


def test_slow_clients_hold_no_worker_in_public_mode(public):
    """Hundreds of connections dribbling headers or bodies at the back-end's public port while a
    person keeps drawing: every digit is read (the two sync workers never see a slow body)."""
    scenario, c, _ = public
    label, body = mnist_digit(0)
    per_ip = c.config.frontend.max_connections_per_ip
    steady = Steady(BACKEND, scenario.port, "127.0.0.33", body)
    headers = Slowloris(BACKEND, scenario.port, "127.0.0.31", "headers", connections=150)
    bodies = Slowloris(BACKEND, scenario.port, "127.0.0.32", "body", connections=150)
    quiet, attacked = under_attack(steady, [headers, bodies], ATTACK_SECONDS, quiet_seconds=1.5)
    print(f"\n[public edge] slowloris {ATTACK_SECONDS}s: headers {headers}\n  bodies {bodies}\n  person:"
          f" {len(quiet)} quiet p99 {p99([o[0] for o in quiet]):.3f}s, {len(attacked)} under attack p99"
          f" {p99([o[0] for o in attacked]):.3f}s", flush=True)
    failed = [o for o in quiet + attacked if o[1] != 200 or o[2].strip() != str(label)]
    assert not failed, failed[:5]
    assert len(attacked) >= ATTACK_SECONDS * 2  # answered all along
    for attacker in (headers, bodies):
        assert attacker.opened >= 150 and sum(attacker.answered.values()) >= 150 - per_ip, attacker
    assert headers.answered.get("HTTP/1.1 408 Request Timeout", 0) >= per_ip // 2, headers.answered


def test_a_flood_gets_429_the_page_on_another_origin_says_so(public, chromium):
    """The page (front-end's origin) calls the back-end's apache; one address floods /predict/:
    429, Retry-After, a JSON reason the page can read across origins and shows; another address
    is served meanwhile, and the page again once Retry-After has passed."""
    scenario, c, _ = public
    settings = c.config.frontend
    burst, window = settings.rate_burst, math.ceil(settings.rate_burst / settings.rate_limit)
    label, body = mnist_digit(0)
    context = chromium.new_context(viewport={"width": 900, "height": 760})
    page = context.new_page()
    page.set_default_timeout(20_000)
    refused_in_console = watch_policy(page)
    try:
        page.goto(f"{PAGE}/")
        page.wait_for_function(READY)
        draw_with_mouse(page, STROKES[7])
        assert predict(page)["digit"] == "7"  # across origins, through apache
        answers, outcomes, (refused, shown) = flood_beside_a_person(BACKEND, scenario.port, body, 3 * burst,
                                                                    lambda: predict_seen(page))
        reason = refused_past_the_burst(answers, burst, window)
        assert reason["error"].startswith("too many requests from your address")
        assert refused.status == 429 and refused.url == f"http://{BACKEND}:{scenario.port}/predict/"
        assert shown["status"] == "Too many requests from your address: wait a few seconds and try again."
        assert outcomes and all(o[1] == 200 and o[2].strip() == str(label) for o in outcomes), outcomes
        time.sleep(window + 1)
        assert predict(page)["digit"] == "7"
        assert violations(page) == [] and refused_in_console == []
    finally:
        context.close()


def test_back_to_proxied_apache_leaves_the_backends_port(public):
    scenario, _, app_port = public
    result, printed = captured(backend.setup_backend, scenario.context())
    assert f"  changed: /etc/apache2/conf-available/{public_edge.EDGE}.conf removed, apache2 restarted" in printed
    assert listening(app_port) == []
    status, headers, _ = answer(f"http://{BACKEND}:{scenario.port}/health")
    assert status == 200 and headers["Server"] == "gunicorn"
    assert listening(scenario.port) == [f"0.0.0.0:{scenario.port}"]  # gunicorn itself, as proxied mode has it
    assert backend.setup_backend(scenario.context())["changed"] == 0
