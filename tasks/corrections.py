"""The corrections people make on the page, and what the back-end is doing (issue 15).

    fab metrics                  a one-line summary of the back-end's /metrics (read over SSH)
    fab metrics --raw            the scrape itself, Prometheus' text format
    fab metrics --tunnel 9100    localhost:9100/metrics for a Prometheus you run (Ctrl-C closes)
    fab pull-feedback [--clear]  corrections -> feedback/corrections.npz (+ .png), new ones counted

/metrics answers only on the back-end host (Files/metrics.py), and apache does not forward
it: the operator reads it through SSH. Corrections are copied with SQLite's backup API into
a consistent snapshot on the host (the service keeps writing meanwhile), fetched over SFTP.
"""
import contextlib
import json
import math
import sqlite3
import sys
import tempfile
import time
from pathlib import Path, PurePosixPath

import numpy as np
from invoke import task
from invoke.exceptions import Exit

from . import backend, hosts
from .remote import Report, http_get, q, sh

NPZ_NAME, SHEET_NAME = "corrections.npz", "corrections.png"
SHEET_MAX = 400  # digits on the contact sheet: the newest

# --- /metrics -------------------------------------------------------------------------------


def parse(text):
    """{sample name: [(labels, value)]} of a scrape, read by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def _total(samples, name, keep=lambda labels: True):
    return sum(value for labels, value in samples.get(name, []) if keep(labels))


def p99_seconds(samples):
    """The 99th percentile of latency, all routes together, as the bucket bound that holds it."""
    buckets = {}
    for labels, value in samples.get("digits_http_request_duration_seconds_bucket", []):
        buckets[float(labels["le"])] = buckets.get(float(labels["le"]), 0.0) + value
    count = buckets.get(math.inf, 0.0)
    if not count:
        return None
    return next(bound for bound in sorted(buckets) if buckets[bound] >= 0.99 * count)


def summarize(before, after, seconds):
    """The one-line summary of two scrapes `seconds` apart (texts): rate, p99, errors, corrections today."""
    first, last = parse(before), parse(after)
    requests = _total(last, "digits_http_requests_total")
    rate = (requests - _total(first, "digits_http_requests_total")) / seconds if seconds else 0.0
    errors = _total(last, "digits_http_requests_total", lambda labels: labels["status"].startswith("5"))
    refused = _total(last, "digits_http_requests_total", lambda labels: labels["status"].startswith("4"))
    p99 = p99_seconds(last)
    models = sorted({labels["sha256"][:12] for labels, value in last.get("digits_model_info", []) if value})
    # Stored since local midnight on the host (the store's count: it outlives restarts); a back-end
    # older than that gauge has only the counter since the service started.
    today = last.get("digits_corrections_today")
    figures = {"requests_per_s": round(rate, 2), "requests": int(requests), "p99_s": p99, "errors_5xx": int(errors),
               "refused_4xx": int(refused), "corrections": int(_total(last, "digits_corrections_total")),
               "corrections_today": int(_total(last, "digits_corrections_today")) if today else None,
               "decode_failures": int(_total(last, "digits_image_decode_failures_total")), "models": models}
    p99_text = "-" if p99 is None else ("> 10 s" if math.isinf(p99) else f"<= {p99 * 1000:g} ms")
    corrections_text = (f"{figures['corrections']} corrections" if today is None
                        else f"{figures['corrections_today']} corrections today")
    line = (f"{rate:.1f} req/s, p99 {p99_text}, {figures['errors_5xx']} errors (5xx),"
            f" {figures['refused_4xx']} refused (4xx), {corrections_text},"
            f" model {', '.join(models) or '-'} (since the service started: {figures['requests']} requests)")
    return figures, line


def scrape(c, cxn, paths):
    status, body = http_get(cxn, f"http://127.0.0.1:{backend.local_port(c)}/metrics",
                            python=paths["venv"] / "bin/python")
    return status, body


def status_line(c, interval=1.0):
    """`fab status`'s line for the back-end, from two scrapes of its /metrics over SSH; or why there
    is none. Never raises: status shows what AWS has even when the service does not answer."""
    with contextlib.redirect_stdout(sys.stderr):  # a host key recorded is said, but not into `status --json`
        return _status_line(c, interval)


def _status_line(c, interval):
    try:
        cxn = hosts.connect(c, "backend")
    except Exit as error:
        return f"unreachable ({error.message.splitlines()[0]})"
    try:
        paths = backend.layout(c, cxn)
        status, first = scrape(c, cxn, paths)
        if status != 200:
            return f"no /metrics ({first}): is the service running? `fab setup-backend` starts it"
        time.sleep(interval)
        status, last = scrape(c, cxn, paths)
        return summarize(first, last, interval)[1] if status == 200 else f"no /metrics ({last})"
    except Exception as error:  # a dropped connection, a failed command: a line, not a traceback
        return f"unavailable ({type(error).__name__}: {error})"
    finally:
        cxn.close()


@task(help={"raw": "print the scrape itself (Prometheus' text format)",
            "interval": "seconds between the two scrapes the request rate comes from (default 2)",
            "tunnel": "forward this local port to the back-end for a Prometheus you run: scrape"
                      " http://localhost:PORT/metrics (Ctrl-C closes)",
            "seconds": "with --tunnel: close it after this many seconds (default: Ctrl-C)"})
def metrics(c, raw=False, interval=2.0, tunnel=0, seconds=0):
    """Read the back-end's /metrics over SSH: a one-line summary, the raw text, or a tunnel."""
    with Report(c, "metrics", "backend") as r:
        cxn, paths = r.cxn, backend.layout(c, r.cxn)
        port = backend.local_port(c)  # gunicorn's (behind apache on the host in public mode)
        status, first = scrape(c, cxn, paths)
        if status != 200:
            r.fail(f"/metrics on the back-end's 127.0.0.1:{port} did not answer ({first});"
                   " is the service running? `fab setup-backend` installs and starts it")
        if tunnel:
            with cxn.forward_local(int(tunnel), remote_port=port, remote_host="127.0.0.1"):
                r.checked(f"tunnel open: http://localhost:{int(tunnel)}/metrics -> the back-end's 127.0.0.1:{port}")
                print(f"  scrape it from here ({f'for {seconds}s' if seconds else 'Ctrl-C closes the tunnel'})",
                      flush=True)
                try:
                    time.sleep(float(seconds)) if seconds else _forever()
                except KeyboardInterrupt:
                    print("  tunnel closed")
            return r.result
        if raw:
            print(first, end="" if first.endswith("\n") else "\n")
            return r.result
        time.sleep(float(interval))
        status, last = scrape(c, cxn, paths)
        if status != 200:
            r.fail(f"/metrics stopped answering between two scrapes ({last})")
        figures, line = summarize(first, last, float(interval))
        r.checked(f"back-end {cxn.host}: {line}")
    return dict(r.result, metrics=figures)


def _forever():
    while True:
        time.sleep(3600)


# --- Corrections: pull, to an .npz in MNIST's layout ----------------------------------------

# Runs on the host with the service's venv python: a consistent copy of the live database
# (SQLite's online backup: readers and the service's writers carry on), then its highest id.
SNAPSHOT = """
import json, sqlite3, sys
source = sqlite3.connect(sys.argv[1], timeout=30)
target = sqlite3.connect(sys.argv[2])
source.backup(target)
print(json.dumps(target.execute("SELECT COALESCE(MAX(id), 0), COUNT(*) FROM corrections").fetchone()))
"""

# Deletes what a pull took: ids only grow (AUTOINCREMENT, one writer at a time), so every row
# with an id up to the snapshot's highest was in the snapshot, and nothing newer is touched.
CLEAR = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=30)
db.execute("PRAGMA busy_timeout = 30000")
with db:
    print(db.execute("DELETE FROM corrections WHERE id <= ?", (int(sys.argv[2]),)).rowcount)
"""


def read_snapshot(path):
    """The corrections in a database file, as arrays in MNIST's layout plus what was said about each."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT id, created, label, predicted, model_sha256, input FROM corrections"
                          " ORDER BY id").fetchall()
        identity = db.execute("SELECT value FROM counters WHERE name = 'database'").fetchone()
    count = len(rows)
    images = np.frombuffer(b"".join(row[5] for row in rows), np.uint8).reshape(count, 28, 28)
    return {"database": np.full(count, identity[0] if identity else 0, np.int64),
            "ids": np.array([row[0] for row in rows], np.int64),
            "created": np.array([row[1] for row in rows], np.float64),
            "x_train": images.copy(),  # uint8, white ink on black, like MNIST's
            "y_train": np.array([row[2] for row in rows], np.uint8),
            "predicted": np.array([-1 if row[3] is None else row[3] for row in rows], np.int8),
            "model_sha256": np.array([row[4] or "" for row in rows], "<U64")}


def merge(old, new):
    """`old` plus the rows of `new` it does not have (by database and id): (merged, how many were new)."""
    if old is None:
        return new, len(new["ids"])
    if "database" not in old:  # pulled before databases had an identity: from the one there was
        old = {**old, "database": np.full(len(old["ids"]), new["database"][0] if len(new["ids"]) else 0, np.int64)}
    seen = set(zip(old["database"].tolist(), old["ids"].tolist(), strict=True))
    fresh = np.array([pair not in seen for pair in zip(new["database"].tolist(), new["ids"].tolist(), strict=True)],
                     bool)
    merged = {key: np.concatenate([old[key], new[key][fresh]]) for key in new}
    order = np.lexsort((merged["ids"], merged["created"]))  # in the order they were made, whichever database
    return {key: value[order] for key, value in merged.items()}, int(fresh.sum())


def load(path):
    if not Path(path).exists():
        return None
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def save(path, arrays):
    """Write the .npz whole, then rename it over the old one: a pull cut short leaves the last good file."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as out:
        np.savez_compressed(out, **arrays)
    partial.replace(path)


def contact_sheet(arrays, path, limit=SHEET_MAX):
    """A PNG of the newest digits, each with its label (and the model's answer, crossed out)."""
    from PIL import Image, ImageDraw

    images, labels, predicted = arrays["x_train"][-limit:], arrays["y_train"][-limit:], arrays["predicted"][-limit:]
    columns, cell = 20, 40
    rows = max(1, math.ceil(len(images) / columns))
    sheet = Image.new("L", (columns * cell, rows * cell), 32)
    draw = ImageDraw.Draw(sheet)
    for i, (image, label, answer) in enumerate(zip(images, labels, predicted, strict=True)):
        x, y = (i % columns) * cell, (i // columns) * cell
        sheet.paste(Image.fromarray(image), (x + 6, y + 1))
        draw.text((x + 2, y + 28), str(int(label)), fill=255)
        if answer >= 0:
            draw.text((x + 28, y + 28), str(int(answer)), fill=120)
    sheet.save(path)


@task(help={"clear": "then delete on the back-end the corrections just pulled (only those)",
            "to": "the local folder (default: train.feedback, feedback/ in this project)"})
def pull_feedback(c, clear=False, to=None):
    """Download the page's corrections: feedback/corrections.npz (MNIST's layout) and a contact sheet."""
    folder = Path(to or c.config.train.feedback).expanduser()
    with Report(c, "pull-feedback", "backend") as r:
        cxn, paths = r.cxn, backend.layout(c, r.cxn)
        database = PurePosixPath(paths["state"]) / "corrections.sqlite"
        if not sh(cxn, f"test -f {q(database)}", warn=True).ok:
            r.fail(f"no corrections database on the back-end ({database}): the service creates it when it"
                   " starts with this version of the app (`fab setup-backend`)")
        remote = PurePosixPath(paths["base"]) / "pull-snapshot.sqlite"
        python = q(paths["venv"] / "bin/python")
        out = sh(cxn, f"rm -f {q(remote)} && {python} -c {q(SNAPSHOT)} {q(database)} {q(remote)}").stdout
        high, count = json.loads(out.strip().splitlines()[-1])
        r.checked(f"snapshot of {count} corrections taken on the host (SQLite backup API), ids up to {high}")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            local = Path(scratch) / "snapshot.sqlite"
            cxn.get(str(remote), str(local))
            sh(cxn, f"rm -f {q(remote)}")
            pulled = read_snapshot(local)
        if len(pulled["ids"]) != count:
            r.fail(f"the downloaded snapshot holds {len(pulled['ids'])} corrections, the host's {count}")
        merged, new = merge(load(folder / NPZ_NAME), pulled)
        save(folder / NPZ_NAME, merged)
        contact_sheet(merged, folder / SHEET_NAME)
        r.either(new > 0, f"{new} new corrections since the last pull; {len(merged['ids'])} in"
                          f" {folder / NPZ_NAME} (contact sheet: {folder / SHEET_NAME})")
        if clear and high:
            deleted = int(sh(cxn, f"{python} -c {q(CLEAR)} {q(database)} {int(high)}").stdout.strip() or 0)
            r.either(deleted > 0, f"{deleted} pulled corrections deleted on the back-end (ids up to {high});"
                                  " newer ones stay")
        elif clear:
            r.ok("nothing to delete on the back-end")
    return dict(r.result, new=new, total=len(merged["ids"]), high=int(high))
