"""tests/fixtures/load.py's post_as_the_page: the load clients of the machines tier retry a
/predict/ as the page does (Files/static/app.js), against a loopback server that answers a script."""
import http.server
import json
import threading
import time

import pytest

from tests.fixtures import load


@pytest.fixture
def scripted():
    """A loopback server: the n-th POST gets answers[n] (a status, or "cut": the connection closed
    with no answer); a digit 3 once the script is spent. Yields (port, answers, times seen)."""
    answers, seen = [], []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(time.monotonic())
            what = answers.pop(0) if answers else 200
            if what == "cut":
                self.close_connection = True
                self.connection.shutdown(2)
                return
            body = json.dumps({"digit": 3, "model": {"sha256": "x"}} if what == 200 else {"error": "no"}).encode()
            self.send_response(what)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], answers, seen
    server.shutdown()
    server.server_close()


def test_the_pause_is_the_pages():
    assert load.RETRY_PAUSE == 0.4 and load.RETRIABLE == (502, 503, 504)


@pytest.mark.parametrize("first", [502, 503, 504, "cut"])
def test_a_failed_try_is_asked_once_more_after_the_pause(scripted, first):
    port, answers, seen = scripted
    answers.append(first)
    outcome = load.post_as_the_page("127.0.0.1", port, 3, b"drawing")
    assert outcome.ok and outcome.retried == ("RemoteDisconnected: Remote end closed connection without response"
                                              if first == "cut" else f"HTTP {first}")
    assert len(seen) == 2 and seen[1] - seen[0] >= load.RETRY_PAUSE
    assert outcome.start < seen[0]  # the outcome spans both tries


def test_two_failures_fail_and_a_refusal_is_not_retried(scripted):
    port, answers, seen = scripted
    answers += [502, 504]
    twice = load.post_as_the_page("127.0.0.1", port, 3, b"drawing")
    assert not twice.ok and twice.status == 504 and twice.retried == "HTTP 502" and len(seen) == 2
    answers.append(422)
    refused = load.post_as_the_page("127.0.0.1", port, 3, b"drawing")
    assert refused.status == 422 and refused.retried is None and len(seen) == 3
    # A plain post (the other load tests) never retries.
    answers.append(502)
    assert load.post("127.0.0.1", port, 3, b"drawing").status == 502 and len(seen) == 4
