"""The whole chain over real SSH, seen in a real browser: the page apache serves on
the front-end host, the prediction from the gunicorn back-end, the worker's model.
Then a second full run changes nothing."""
import json
import urllib.error
import urllib.request

import pytest
from invoke.exceptions import Exit

from tasks import backend, frontend, worker
from tasks.remote import sha256_file
from tests.drawing import STROKES, draw_with_mouse, predict
from tests.fixtures import free_port
from tests.fixtures.ssh_hosts import ADDRESSES, captured

pytestmark = [pytest.mark.slow, pytest.mark.browser]
PAGE = f"http://{ADDRESSES['frontend']}/"


@pytest.fixture(scope="module")
def frontend_deployed(backend_deployed):
    backend_deployed.results["setup-frontend"] = captured(frontend.setup_frontend, backend_deployed.context())
    return backend_deployed


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
    try:
        page.goto(PAGE)
        page.wait_for_function("window.DigitsApp && window.DigitsApp.ready === true")
        seen = {}
        for digit in (1, 7, 0):
            page.get_by_role("button", name="Clear").click()
            draw_with_mouse(page, STROKES[digit])
            seen[digit] = predict(page)["digit"]
    finally:
        context.close()
    assert seen == {1: "1", 7: "7", 0: "0"}
    # Each answer came through the page's own origin from the back-end host, whose /health
    # names the model the worker trained.
    assert [p.url for p in posts] == [f"{PAGE}predict/"] * 3
    assert all(p.status == 200 for p in posts)
    with urllib.request.urlopen(f"{frontend_deployed.backend_url}/health", timeout=5) as response:
        served = json.load(response)["model"]["sha256"]
    assert served == sha256_file(frontend_deployed.artifacts / "cnn-mnist.tflite")


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


def test_public_mode_page_calls_the_backend_itself(frontend_deployed):
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
