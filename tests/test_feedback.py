"""POST /feedback (Files/feedback.py): corrections stored durably, bounded, and nothing about the person.

The no-loss test runs a real gunicorn and kills its worker and its master with SIGKILL
during a burst of corrections: every correction answered 2xx must be in the database.
"""
import base64
import concurrent.futures
import contextlib
import functools
import http.server
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from playwright.sync_api import expect

import feedback
from keras_flask import create_app
from tasks import corrections, local
from tasks.config import FILES, frontend_config_js
from tests.canvas import data_url, render
from tests.drawing import ANSWER_TIMEOUT_MS, STROKES, draw_with_mouse, shown
from tests.fixtures import MNIST_NPZ, wait_for
from tests.fixtures.web import Gunicorn


@pytest.fixture(scope="module")
def seven():
    with np.load(MNIST_NPZ) as data:
        return data["x_test"][0]  # a 7


@pytest.fixture
def app(trained_model, tmp_path):
    return create_app(trained_model / "cnn-mnist.keras", state_dir=tmp_path)


def rows(folder, columns="*"):
    with sqlite3.connect(Path(folder) / "corrections.sqlite") as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute(f"SELECT {columns} FROM corrections ORDER BY id")]  # noqa: S608


def test_a_prediction_then_its_correction_is_stored_as_the_model_saw_it(app, tmp_path, seven):
    client = app.test_client()
    drawing = data_url(render(seven, "transparent"))
    answer = client.post("/predict/", data=drawing, headers={"Accept": "application/json"}).get_json()
    seen = np.frombuffer(base64.b64decode(answer["input"]), np.uint8)
    assert seen.shape == (784,) and seen.max() > 200  # the 28x28 input the model read, as uint8
    sent = {"label": 1, "predicted": answer["digit"], "probabilities": answer["probabilities"],
            "model_sha256": answer["model"]["sha256"], "input": answer["input"], "image": drawing}
    reply = client.post("/feedback", json=sent)
    assert reply.status_code == 201 and reply.get_json()["stored"] is True
    [row] = rows(tmp_path)
    assert row["id"] == reply.get_json()["id"]
    assert (row["label"], row["predicted"], row["model_sha256"]) == (1, 7, answer["model"]["sha256"])
    assert json.loads(row["probabilities"]) == pytest.approx(answer["probabilities"], abs=1e-6)
    assert row["input"] == seen.tobytes()
    assert row["image"] == base64.b64decode(drawing.partition(",")[2])  # the original drawing, as sent
    # Only the drawing: the back-end computes the input itself, as /predict/ did.
    again = client.post("/feedback", json={"label": 4, "image": drawing})
    assert again.status_code == 201 and rows(tmp_path)[1]["input"] == seen.tobytes()
    # A flat list of 784 numbers in [0, 1] is the same input.
    flat = client.post("/feedback", json={"label": 4, "input": (seen / 255).tolist()})
    assert flat.status_code == 201 and rows(tmp_path)[2]["input"] == seen.tobytes()


GOOD_INPUT = base64.b64encode(bytes(784)).decode()


@pytest.mark.parametrize("body, reason", [
    ({"label": 10, "input": GOOD_INPUT}, "label must be a digit 0-9"),
    ({"label": "3", "input": GOOD_INPUT}, "label must be a digit 0-9"),
    ({"label": True, "input": GOOD_INPUT}, "label must be a digit 0-9"),
    ({"input": GOOD_INPUT}, "label must be a digit 0-9"),
    ({"label": 3}, "send the drawing"),
    ({"label": 3, "input": base64.b64encode(bytes(783)).decode()}, "783 bytes: 784 expected"),
    ({"label": 3, "input": [[0.0] * 27] * 28}, "28x28 expected"),
    ({"label": 3, "input": [[0.0] * 28] * 27 + [[0.0] * 27 + ["x"]]}, "only numbers"),
    ({"label": 3, "input": [2.0] * 784}, "in [0, 1]"),
    ({"label": 3, "input": "!!not base64!!"}, "not valid base64"),
    ({"label": 3, "input": GOOD_INPUT, "predicted": -1}, "predicted must be a digit"),
    ({"label": 3, "input": GOOD_INPUT, "probabilities": [0.1] * 9}, "probabilities must be a list of 10"),
    ({"label": 3, "input": GOOD_INPUT, "model_sha256": "abc"}, "64 lowercase hex"),
    ({"label": 3, "input": GOOD_INPUT, "image": "data:image/png;base64,AAAA"}, "not an image"),
    ({"label": 3, "input": GOOD_INPUT, "image": 5}, "data URL"),
    ([3], "JSON object"),
    ("not json", "not valid JSON"),
    ("plain", "send JSON"),
], ids=lambda value: str(value)[:30])
def test_bad_corrections_get_a_json_4xx_and_nothing_is_stored(app, tmp_path, body, reason):
    client = app.test_client()
    if body == "not json":
        reply = client.post("/feedback", data=b"{label: 3", content_type="application/json")
    elif body == "plain":
        reply = client.post("/feedback", data=b"label=3")
    else:
        reply = client.post("/feedback", json=body)
    assert 400 <= reply.status_code < 500 and reason in reply.get_json()["error"], reply.get_json()
    assert rows(tmp_path) == []
    assert client.post("/feedback", json={"label": 3, "input": GOOD_INPUT}).status_code == 201  # still serving


def test_a_body_over_the_limit_is_refused(app, tmp_path):
    huge = {"label": 3, "input": GOOD_INPUT, "image": "data:image/png;base64," + "A" * (3 << 20)}
    reply = app.test_client().post("/feedback", json=huge)
    assert reply.status_code == 413 and "limit" in reply.get_json()["error"]
    assert rows(tmp_path) == []


def test_nothing_about_the_person_is_stored(app, tmp_path):
    """Address, cookie, user agent, referrer: sent with a correction, found nowhere in the files."""
    marks = {"REMOTE_ADDR": "198.51.100.77"}
    headers = {"Cookie": "session=cookie-mark-5b1e", "User-Agent": "agent-mark-91c3",
               "X-Forwarded-For": "203.0.113.99", "Referer": "http://referer-mark-77ad/"}
    reply = app.test_client().post("/feedback", json={"label": 5, "input": GOOD_INPUT}, headers=headers,
                                   environ_base=marks)
    assert reply.status_code == 201 and "Set-Cookie" not in reply.headers
    stored = b"".join(path.read_bytes() for path in tmp_path.iterdir())  # the database, its WAL, all
    assert b"\x00" * 784 in stored  # (the correction itself is there)
    for mark in (b"198.51.100.77", b"cookie-mark-5b1e", b"agent-mark-91c3", b"203.0.113.99", b"referer-mark"):
        assert mark not in stored
    assert set(rows(tmp_path)[0]) == {"id", "created", "label", "predicted", "probabilities", "model_sha256",
                                      "input", "image", "bytes"}


def test_a_flood_from_one_client_gets_429_others_are_served(trained_model, tmp_path, monkeypatch):
    monkeypatch.setenv("FEEDBACK_PER_MINUTE", "3")
    client = create_app(trained_model / "cnn-mnist.keras", state_dir=tmp_path).test_client()
    body = {"label": 3, "input": GOOD_INPUT}

    def post(peer, forwarded=None):
        headers = {"X-Forwarded-For": forwarded} if forwarded else {}
        return client.post("/feedback", json=body, environ_base={"REMOTE_ADDR": peer}, headers=headers)

    assert [post("203.0.113.5").status_code for _ in range(4)] == [201, 201, 201, 429]
    refused = post("203.0.113.5")
    assert refused.status_code == 429 and "at most 3 a minute" in refused.get_json()["error"]
    assert int(refused.headers["Retry-After"]) >= 1
    # A public peer's own X-Forwarded-For changes nothing: still that peer.
    assert post("203.0.113.5", forwarded="198.51.100.1").status_code == 429
    # Behind apache (a private peer), each forwarded-for client has its own allowance.
    assert [post("192.168.0.10", forwarded=f"198.51.100.{i}").status_code for i in (1, 2)] == [201, 201]
    assert post("198.51.100.9").status_code == 201
    assert len(rows(tmp_path)) == 6  # the refused ones were not stored


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [("203.0.113.5", "198.51.100.1", "203.0.113.5"),  # a public peer's claim is ignored
     ("192.168.0.10", "198.51.100.1", "198.51.100.1"),  # apache: the address it appended
     # apache, then the tier's balancer (it appends apache's private address): still the person
     ("192.168.2.7", "198.51.100.1, 192.168.0.10", "198.51.100.1"),
     ("192.168.2.7", "10.0.0.1, 198.51.100.1, 192.168.0.10", "198.51.100.1"),  # their own claim left of it
     ("127.0.0.1", "192.168.0.10", "192.168.0.10"),  # nothing but our own: the left-most
     ("127.0.0.1", None, "127.0.0.1")],
)
def test_the_client_is_the_right_most_address_that_is_not_one_of_our_proxies(peer, forwarded, client):
    assert feedback.client_of(peer, forwarded) == client


def test_the_rate_limit_refills_and_forgets_the_least_recent(monkeypatch):
    limit = feedback.RateLimit(per_minute=2)
    assert [limit.allow("a", now=0.0) for _ in range(3)] == [True, True, False]
    assert limit.allow("a", now=30.0) and not limit.allow("a", now=30.0)  # one back every 30 s
    monkeypatch.setattr(feedback, "TRACKED_CLIENTS", 3)
    for name in "bcd":
        limit.allow(name, now=31.0)
    assert "a" not in limit._buckets and len(limit._buckets) == 3


def test_the_store_is_bounded_oldest_dropped_and_counted(tmp_path):
    store = feedback.FeedbackStore(tmp_path, max_rows=5, max_bytes=10 * 784)
    row = {"label": 1, "predicted": None, "probabilities": None, "model_sha256": None, "image": None}
    ids = [store.add({**row, "input": bytes([i]) * 784})[0] for i in range(8)]
    assert [r["id"] for r in rows(tmp_path)] == ids[3:]  # the newest 5
    assert store.counts() == {"stored": 5, "dropped": 3}
    # The size bound: one row with a big drawing pushes out as many old ones as it must.
    big_id, dropped = store.add({**row, "input": bytes(784), "image": b"x" * (8 * 784)})
    assert dropped == 4 and [r["id"] for r in rows(tmp_path)] == [ids[7], big_id]
    assert store.counts() == {"stored": 2, "dropped": 7}
    settings = sqlite3.connect(tmp_path / "corrections.sqlite").execute("PRAGMA journal_mode").fetchone()
    assert settings == ("wal",)



def test_corrections_today_count_from_local_midnight_and_outlive_clears_drops_and_restarts(tmp_path, monkeypatch):
    """`fab status`' "corrections today": a count per local date, kept in the store with the rows."""
    midnight = time.mktime(time.strptime("2026-03-14", "%Y-%m-%d"))  # local midnight, as the host's clock has it
    clock = {"now": midnight - 60}  # a minute before it: yesterday
    monkeypatch.setattr(feedback, "clock", lambda: clock["now"])
    store = feedback.FeedbackStore(tmp_path, max_rows=3)
    row = {"label": 1, "predicted": None, "probabilities": None, "model_sha256": None, "image": None,
           "input": bytes(784)}
    for _ in range(2):
        store.add(row)
    clock["now"] = midnight + 1
    for _ in range(4):  # the bound (3 rows) drops one of today's too: it was stored today all the same
        store.add(row)
    assert store.stored_on() == ("2026-03-14", 4) and store.stored_on(midnight - 1) == ("2026-03-13", 2)
    assert store.counts() == {"stored": 3, "dropped": 3}
    with sqlite3.connect(tmp_path / "corrections.sqlite") as db:  # what `pull-feedback --clear` does
        db.execute("DELETE FROM corrections")
    reopened = feedback.FeedbackStore(tmp_path, max_rows=3)  # the service restarted
    reopened.add(row)
    assert reopened.stored_on() == ("2026-03-14", 5)
    clock["now"] = midnight + 86400 * (feedback.DAYS_KEPT + 1)  # a month on: the old days' counts are gone
    reopened.add(row)
    assert reopened.stored_on()[1] == 1 and reopened.stored_on(midnight) == ("2026-03-14", 0)
    with sqlite3.connect(tmp_path / "corrections.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM counters WHERE name LIKE 'day:%'").fetchone() == (1,)


# --- Nothing acknowledged is lost: SIGKILL of a worker, a reload, SIGKILL of the master ----------


def correction(number):
    """A correction whose input carries its number (the first 4 bytes), so each row is told apart."""
    pixels = number.to_bytes(4, "big") + bytes(780)
    return {"label": number % 10, "predicted": (number + 1) % 10, "input": base64.b64encode(pixels).decode()}


def test_every_acknowledged_correction_survives_sigkill_of_worker_and_master(trained_model, tmp_path):
    model = trained_model / "cnn-mnist.keras"
    server = {"now": Gunicorn(model, tmp_path)}
    acknowledged, refused, stop = {}, [], threading.Event()
    counter = iter(range(10**6))
    lock = threading.Lock()

    def client():
        session = requests.Session()
        while not stop.is_set():
            with lock:
                number = next(counter)
            try:
                reply = session.post(server["now"].url + "/feedback", json=correction(number), timeout=10)
            except requests.RequestException:
                refused.append(number)
                session = requests.Session()
                continue
            if 200 <= reply.status_code < 300:
                with lock:
                    acknowledged[number] = reply.json()["id"]
            else:
                refused.append(number)

    def acked_soon(more):
        target = len(acknowledged) + more
        wait_for(lambda: len(acknowledged) >= target, f"{more} more acknowledged corrections", timeout=30, step=0.01)

    first = server["now"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        clients = [pool.submit(client) for _ in range(8)]
        try:
            acked_soon(30)
            os.kill(first.workers()[0], signal.SIGKILL)  # a worker, mid-burst
            acked_soon(30)
            os.kill(first.process.pid, signal.SIGHUP)  # a reload, as push-model's model swap does
            acked_soon(30)
            orphans = first.workers()
            os.kill(first.process.pid, signal.SIGKILL)  # the master; its workers are orphaned
            first.process.wait(10)
            server["now"] = Gunicorn(model, tmp_path)  # what systemd's Restart=always does
            acked_soon(30)
        finally:
            stop.set()
            for future in clients:
                future.result()
            server["now"].process.terminate()
            server["now"].process.wait(20)
    for pid in orphans:  # workers of the killed master exit once they see it gone; if one lingers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    stored = {int.from_bytes(row["input"][:4], "big"): (row["id"], row["label"])
              for row in rows(tmp_path, "id, label, input")}
    lost = {n for n in acknowledged if stored.get(n, (None,))[0] != acknowledged[n]}
    assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged corrections lost: {sorted(lost)[:10]}"
    assert all(stored[n][1] == n % 10 for n in acknowledged)
    assert len(acknowledged) >= 120
    with sqlite3.connect(tmp_path / "corrections.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    print(f"{len(acknowledged)} corrections acknowledged, all stored; {len(refused)} refused or cut during the kills")


# --- The page: "wrong? pick the right digit" ----------------------------------------------------


def test_the_page_has_no_inline_script_or_style():
    """A Content-Security-Policy without 'unsafe-inline' (issue 14) must not break the page."""
    html = (FILES / "index.html").read_text()
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == []
    assert re.findall(r"\son[a-z]+\s*=", html) == [] and re.findall(r"\sstyle\s*=", html) == []
    assert "<style" not in html and "javascript:" not in html


class _Site(str):
    server = None


def served_with_csp(backend_url, csp):
    """Files/ as `fab local` serves it, plus a Content-Security-Policy header on every answer."""
    class Handler(local._FilesHandler):
        config_js = frontend_config_js(backend_url).encode()

        def end_headers(self):
            self.send_header("Content-Security-Policy", csp)
            super().end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(FILES)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    site = _Site(f"http://127.0.0.1:{server.server_address[1]}/")
    site.server = server
    return site


@pytest.mark.browser
def test_a_person_corrects_a_wrong_answer_with_the_keyboard_under_a_strict_csp(chromium, local_app):
    """Draw, predict, Tab to a digit button, press Space: the correction is stored, thanks are said."""
    csp = (f"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
           f" connect-src 'self' {local_app.backend_url}; base-uri 'none'; form-action 'none'")
    site = served_with_csp(local_app.backend_url, csp)
    context = chromium.new_context(viewport={"width": 900, "height": 760})
    page = context.new_page()
    page.set_default_timeout(ANSWER_TIMEOUT_MS)
    problems = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda message: "Content Security Policy" in message.text and problems.append(message.text))

    exchanges = {}
    # The last POST to each route: "predict" (/predict/) and "feedback" (/feedback).
    page.on("requestfinished", lambda request: request.method == "POST" and exchanges.__setitem__(
        request.url.rstrip("/").rsplit("/", 1)[-1], request))
    try:
        page.goto(site)  # (under this CSP Playwright's wait_for_function cannot eval: expect() polls)
        wait_for(lambda: page.evaluate("window.DigitsApp && window.DigitsApp.ready === true"), "the page's script")
        assert page.locator("#correct").is_hidden()  # nothing to correct before an answer
        draw_with_mouse(page, STROKES[7])
        page.get_by_role("button", name="Predict").click()
        expect(page.locator("#status")).to_have_class(re.compile(r"\b(ok|error)\b"))
        view = shown(page)
        assert view["kind"] == "message ok", (view["status"], problems)
        predicted = int(view["digit"])
        answer = exchanges["predict"].response().json()
        assert page.locator("#correct").is_visible()
        assert page.locator(f'#correct button[data-digit="{predicted}"]').is_disabled()
        label = (predicted + 1) % 10  # any other digit is a correction
        before = len(rows(local_app.state_dir))
        for _ in range(20):  # from the Predict button, along the tab order, to the digit
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.dataset.digit") == str(label):
                break
        else:
            pytest.fail(f"the button for {label} is not reached with Tab")
        page.keyboard.press("Space")
        expect(page.locator("#correct-status")).to_have_class(re.compile(r"\b(ok|error)\b"))
        assert "Thank you" in page.locator("#correct-status").text_content()
        assert page.locator(f'#correct button[data-digit="{label}"]').get_attribute("aria-pressed") == "true"
        assert all(button.is_disabled() for button in page.locator("#correct button").all())  # one per answer

        sent = exchanges["feedback"].post_data_json
        assert exchanges["feedback"].response().status == 201
        assert {key: sent[key] for key in ("label", "predicted", "input", "model_sha256")} == {
            "label": label, "predicted": predicted, "input": answer["input"], "model_sha256": answer["model"]["sha256"]}
        stored = rows(local_app.state_dir)
        assert len(stored) == before + 1
        row = stored[-1]
        assert (row["label"], row["predicted"]) == (label, predicted)
        assert row["input"] == base64.b64decode(answer["input"])  # the 28x28 the model saw
        assert row["image"] == base64.b64decode(exchanges["predict"].post_data.split(",", 1)[1])  # the drawing
        # Drawing again: the buttons go (they would not be about this drawing).
        draw_with_mouse(page, STROKES[1])
        assert page.locator("#correct").is_hidden()
        assert problems == []  # no CSP violation, no uncaught error
    finally:
        context.close()
        site.server.shutdown()


# --- fab pull-feedback's pieces, on this machine (over SSH: tests/test_backend.py) -------------


def host_script(script, *args):
    """One of pull-feedback's scripts, run as the host runs it (a python -c)."""
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_pull_gives_mnist_layout_counts_what_is_new_and_clears_only_what_it_took(tmp_path):
    store = feedback.FeedbackStore(tmp_path / "state")
    database = store.path

    def add(number, predicted):
        store.add({"label": number % 10, "predicted": predicted, "probabilities": None, "model_sha256": "ab" * 32,
                   "input": bytes([number]) * 784, "image": None})

    for number in range(3):
        add(number, (number + 1) % 10)
    assert host_script(corrections.SNAPSHOT, database, tmp_path / "one.sqlite") == [3, 3]
    first = corrections.read_snapshot(tmp_path / "one.sqlite")
    assert first["x_train"].shape == (3, 28, 28) and first["x_train"].dtype == np.uint8
    assert first["x_train"][2].min() == first["x_train"][2].max() == 2 and first["y_train"].tolist() == [0, 1, 2]
    merged, new = corrections.merge(None, first)
    assert new == 3
    add(3, None)  # after the first pull: a later pull has it, a --clear of the first keeps it
    add(4, 7)
    host_script(corrections.SNAPSHOT, database, tmp_path / "two.sqlite")
    merged, new = corrections.merge(merged, corrections.read_snapshot(tmp_path / "two.sqlite"))
    assert new == 2 and merged["ids"].tolist() == [1, 2, 3, 4, 5]
    assert merged["predicted"].tolist() == [1, 2, 3, -1, 7]  # -1: the page did not say
    corrections.save(tmp_path / "c.npz", merged)
    again = corrections.load(tmp_path / "c.npz")
    assert {key: again[key].tolist() for key in again} == {key: merged[key].tolist() for key in merged}
    with np.load(MNIST_NPZ) as mnist:  # the layout training reads: same dtype, shape and polarity
        assert (again["x_train"].dtype, again["x_train"].shape[1:]) == (mnist["x_train"].dtype, (28, 28))
    corrections.contact_sheet(again, tmp_path / "sheet.png")
    from PIL import Image
    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.size == (800, 40) and sheet.getpixel((6 + 40 * 4 + 14, 1 + 14)) == 4  # the 5th digit's ink
    # A rebuilt back-end: a new database whose ids start at 1 again. Its rows are new, all of them.
    rebuilt = feedback.FeedbackStore(tmp_path / "rebuilt")
    for number in (6, 7):
        rebuilt.add({"label": number, "predicted": None, "probabilities": None, "model_sha256": None,
                     "input": bytes([number]) * 784, "image": None})
    host_script(corrections.SNAPSHOT, rebuilt.path, tmp_path / "three.sqlite")
    after_rebuild, new = corrections.merge(merged, corrections.read_snapshot(tmp_path / "three.sqlite"))
    assert new == 2 and after_rebuild["ids"].tolist() == [1, 2, 3, 4, 5, 1, 2]
    assert after_rebuild["y_train"].tolist() == [0, 1, 2, 3, 4, 6, 7]
    assert corrections.merge(after_rebuild, corrections.read_snapshot(tmp_path / "three.sqlite"))[1] == 0
    assert host_script(corrections.CLEAR, database, 3) == 3  # the first pull's ids
    assert [row["id"] for row in rows(database.parent)] == [4, 5]


def _open_store_at(folder, start):
    start.wait()  # every process at once, as gunicorn's workers boot
    feedback.FeedbackStore(folder)


def test_workers_booting_together_all_open_the_store(tmp_path):
    """Workers that open a new (or just made) store at the same moment all succeed: SQLite answers
    "database is locked" at once, without its busy timeout, to all but one switching the file to WAL
    (in CI a worker failed to boot on it, and gunicorn's master shut the back-end down)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for attempt in range(8):
        folder = tmp_path / str(attempt)
        start = context.Barrier(8)
        workers = [context.Process(target=_open_store_at, args=(folder, start)) for _ in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        assert [worker.exitcode for worker in workers] == [0] * 8, f"attempt {attempt}"
        assert sqlite3.connect(folder / "corrections.sqlite").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
