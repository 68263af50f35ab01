"""The whole chain over real SSH, seen in a real browser: the page apache serves on
the front-end host, the prediction from the gunicorn back-end, the worker's model.
Then a second full run changes nothing."""
import json
import urllib.request

import pytest

from tasks import backend, frontend, worker
from tasks.remote import sha256_file
from tests.fixtures.ssh_hosts import ADDRESSES, captured
from tests.drawing import STROKES, draw_with_mouse, predict

pytestmark = [pytest.mark.slow, pytest.mark.browser]
PAGE = f"http://{ADDRESSES['frontend']}/"


@pytest.fixture(scope="module")
def frontend_deployed(backend_deployed):
    backend_deployed.results["setup-frontend"] = captured(frontend.setup_frontend, backend_deployed.context())
    return backend_deployed


def test_apache_serves_the_page_with_its_generated_config(frontend_deployed):
    result, printed = frontend_deployed.results["setup-frontend"]
    page, backend_url = PAGE.rstrip("/"), frontend_deployed.backend_url
    # Checked on the host, then from here as the browser will: page, config.js, then CORS.
    for line in (f"checked: the page answers on port 80: {page}",
                 f"checked: the page answers from here: {page}/",
                 f"checked: {page}/static/config.js names the back-end {backend_url}",
                 f"checked: the back-end answers the page's origin: {backend_url}/health allows {page}"):
        assert f"  {line}\n" in printed, line
    with urllib.request.urlopen(PAGE + "static/config.js", timeout=5) as response:
        config_js = response.read().decode()
    assert f'backendUrl: "{frontend_deployed.backend_url}"' in config_js


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
    # Each answer came from the back-end host, whose /health names the model the worker trained.
    assert [p.url for p in posts] == [f"{frontend_deployed.backend_url}/predict/"] * 3
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
