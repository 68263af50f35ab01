"""Corrections from the page: POST /feedback, kept durably in SQLite (issue 15).

A correction is what the model saw (the 28x28 input), the digit the person says it
is, what the model answered, and which model answered. Nothing about the person is
read or stored: no address, no cookie, no user agent.

Durability: the row is committed (WAL, synchronous=FULL: the commit returns after the
WAL is fsynced) before the answer goes out, so every 2xx-answered correction survives
a killed worker, a killed master and a power cut. NORMAL would survive the kills too
(the WAL is in the page cache, which outlives the process) but not a power cut or a
kernel crash, and a correction costs one fsync (a few ms), which the page can afford.

Under gunicorn each worker process opens its own connection, lazily, after the fork:
a SQLite connection must never cross a fork. Writers serialise on SQLite's lock
(BEGIN IMMEDIATE, waiting up to busy_timeout for another worker's commit).
"""
import base64
import binascii
import collections
import ipaddress
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
from flask import Blueprint, current_app, jsonify, request

SIDE = 28
INPUT_BYTES = SIDE * SIDE  # one uint8 per pixel, MNIST's layout
BUSY_TIMEOUT_MS = 10_000  # another worker's commit (an fsync) takes milliseconds
DEFAULT_MAX_ROWS = 50_000
DEFAULT_MAX_MB = 200
DEFAULT_PER_MINUTE = 30  # corrections a minute from one address, per worker; 0: no limit
# Where our own proxy (apache on the front-end) connects from: RFC 1918, IPv6 unique local.
PROXY_NETWORKS = tuple(ipaddress.ip_network(net) for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                                                "fc00::/7"))
TRACKED_CLIENTS = 10_000  # addresses remembered (in memory only) for the limit; the least recent go
SHA256_HEX = frozenset("0123456789abcdef")
DAYS_KEPT = 31  # the per-day counts of stored corrections (counters 'day:YYYY-MM-DD') kept
clock = time.time  # when a correction is stored (a test moves it across midnight)

SCHEMA = """
CREATE TABLE IF NOT EXISTS corrections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: a pull's high-water mark stays valid
    created REAL NOT NULL,                 -- unix time of the commit
    label INTEGER NOT NULL CHECK (label BETWEEN 0 AND 9),
    predicted INTEGER CHECK (predicted BETWEEN 0 AND 9),
    probabilities TEXT,                    -- JSON list of 10, as the page got them
    model_sha256 TEXT,
    input BLOB NOT NULL CHECK (length(input) = 784),  -- 28x28 uint8, white ink on black
    image BLOB,                            -- the original drawing (PNG/JPEG bytes), if sent
    bytes INTEGER NOT NULL                 -- length(input) + length(image): the size bound
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
-- This database's identity: ids start again at 1 in a new one (a rebuilt back-end), and a pull
-- must not take its rows for ones it already has.
INSERT OR IGNORE INTO counters VALUES ('database', random() & 9223372036854775807);
"""


class FeedbackError(ValueError):
    """A correction that cannot be stored as sent (answered 400 with the reason)."""

    status = 400


# --- The store ---------------------------------------------------------------


class FeedbackStore:
    """corrections.sqlite in `folder`: one connection per process, opened on first use."""

    def __init__(self, folder, max_rows=DEFAULT_MAX_ROWS, max_bytes=DEFAULT_MAX_MB << 20):
        self.path = Path(folder) / "corrections.sqlite"
        self.max_rows, self.max_bytes = int(max_rows), int(max_bytes)
        self._pid, self._connection = None, None
        self._lock = threading.Lock()  # Flask's threaded dev server shares one connection
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open().close()  # the schema once, early: a bad folder fails at start, not per request

    def _open(self):
        """A connection with the schema in place. Workers booting together race to make the file
        and turn WAL on, and SQLite answers "database is locked" to the loser at once, without
        waiting for busy_timeout (the switch to WAL takes an exclusive lock): that was a worker
        failing to boot, and gunicorn's master shutting down. So the setup is retried, for as
        long as busy_timeout would have waited."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                         check_same_thread=False)
            try:
                connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                if connection.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    connection.execute("PRAGMA journal_mode = WAL")  # persistent: it stays on in the file
                connection.execute("PRAGMA synchronous = FULL")  # per connection: why FULL, see the top
                connection.executescript(SCHEMA)
                return connection
            except sqlite3.OperationalError as error:
                connection.close()
                if "locked" not in str(error) and "busy" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def connection(self):
        """This process's connection; a new one after a fork (the parent's is left alone)."""
        if self._pid != os.getpid():
            self._pid, self._connection = os.getpid(), self._open()
        return self._connection

    def add(self, row):
        """Insert one correction, drop the oldest beyond the bounds; return (id, dropped) once committed."""
        with self._lock:
            db = self.connection()
            db.execute("BEGIN IMMEDIATE")  # the write lock now: no deadlock upgrading a read lock
            now = clock()
            try:
                cursor = db.execute(
                    "INSERT INTO corrections (created, label, predicted, probabilities, model_sha256, input, image,"
                    " bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (now, row["label"], row["predicted"], row["probabilities"], row["model_sha256"],
                     row["input"], row["image"], len(row["input"]) + len(row["image"] or b"")))
                dropped = self._trim(db)
                self._count_today(db, now)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return cursor.lastrowid, dropped

    def _trim(self, db):
        """Delete the oldest rows beyond max_rows or max_bytes; count them in counters.dropped."""
        dropped = db.execute(
            "DELETE FROM corrections WHERE id IN (SELECT id FROM (SELECT id, COUNT(*) OVER newest AS n,"
            " SUM(bytes) OVER newest AS total FROM corrections WINDOW newest AS (ORDER BY id DESC))"
            " WHERE n > ? OR total > ?)", (self.max_rows, self.max_bytes)).rowcount
        if dropped:
            db.execute("INSERT INTO counters VALUES ('dropped', ?) ON CONFLICT(name) DO UPDATE"
                       " SET value = value + excluded.value", (dropped,))
        return dropped

    @staticmethod
    def _count_today(db, now):
        """counters 'day:YYYY-MM-DD' (this host's local date) + 1, in the insert's transaction: a count
        per day that rows dropped by the bounds or deleted by `pull-feedback --clear` do not lower, and
        that outlives a restart (unlike /metrics' counters). Days older than DAYS_KEPT are deleted."""
        db.execute("INSERT INTO counters VALUES (?, 1) ON CONFLICT(name) DO UPDATE SET value = value + 1",
                   (day_key(now),))
        db.execute("DELETE FROM counters WHERE name LIKE 'day:%' AND name < ?", (day_key(now - DAYS_KEPT * 86400),))

    def stored_on(self, now=None):
        """(local date, corrections stored that day) for the day of `now` (default: today)."""
        now = clock() if now is None else now
        with self._lock:
            found = self.connection().execute("SELECT value FROM counters WHERE name = ?", (day_key(now),)).fetchone()
        return day_key(now)[len("day:"):], found[0] if found else 0

    def counts(self):
        with self._lock:
            db = self.connection()
            stored = db.execute("SELECT COUNT(*) FROM corrections").fetchone()[0]
            dropped = db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        return {"stored": stored, "dropped": dropped[0] if dropped else 0}


def day_key(now):
    """The counters row of the day `now` (unix time) falls on, in this host's local time."""
    return time.strftime("day:%Y-%m-%d", time.localtime(now))


# --- A flood --------------------------------------------------------------------


class RateLimit:
    """At most `per_minute` corrections a minute per client, a token bucket each; kept in this
    process's memory only (never stored), for the TRACKED_CLIENTS most recent clients."""

    def __init__(self, per_minute):
        self.per_minute = float(per_minute)
        self._buckets = collections.OrderedDict()  # client -> (tokens, at)
        self._lock = threading.Lock()

    def allow(self, client, now=None):
        if self.per_minute <= 0:
            return True
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, at = self._buckets.pop(client, (self.per_minute, now))
            tokens = min(self.per_minute, tokens + (now - at) * self.per_minute / 60)
            allowed = tokens >= 1
            self._buckets[client] = (tokens - allowed, now)
            while len(self._buckets) > TRACKED_CLIENTS:
                self._buckets.popitem(last=False)
        return allowed


def client_of(remote_addr, forwarded_for):
    """Who sent it: the peer, or, when the peer is our own proxy (a private or loopback address:
    apache on the front-end, the tier's balancer), the right-most address in X-Forwarded-For that
    is not one of ours. A public peer's X-Forwarded-For is its own claim, and ignored."""
    try:
        peer = ipaddress.ip_address(remote_addr or "")
    except ValueError:
        return remote_addr or "unknown"
    if not (_ours(peer) and forwarded_for):
        return str(peer)
    # Right to left, past our own proxies (apache, then the tier's balancer, each appends the address
    # it got the request from): the first address that is not ours is the client.
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        try:
            if not _ours(ipaddress.ip_address(hop)):
                return hop
        except ValueError:
            return hop  # not an address: what our proxy wrote, kept as the client's name
    return hops[0] if hops else str(peer)


def _ours(address):
    return address.is_loopback or any(address in net for net in PROXY_NETWORKS)


# --- Reading a correction ------------------------------------------------------


def _digit(value, name, required):
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 9:
        raise FeedbackError(f"{name} must be a digit 0-9, got {json.dumps(value)[:20]}")
    return value


def _input(value):
    """The 28x28 input as 784 uint8: base64 of 784 bytes, or 784 (or 28x28) numbers in [0, 1]."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise FeedbackError("input is not valid base64 (784 bytes, 28x28 uint8)") from None
        if len(raw) != INPUT_BYTES:
            raise FeedbackError(f"input has {len(raw)} bytes: 784 expected (28x28 uint8)")
        return raw
    if not isinstance(value, list) or len(value) not in (SIDE, INPUT_BYTES):
        raise FeedbackError("input must be 28x28 numbers in [0, 1] (nested or flat), or base64 of 784 bytes")
    try:
        pixels = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise FeedbackError("input must hold only numbers") from None
    if pixels.size != INPUT_BYTES or pixels.shape not in ((SIDE, SIDE), (INPUT_BYTES,)):
        raise FeedbackError(f"input has shape {pixels.shape}: 28x28 expected")
    if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
        raise FeedbackError("input values must be in [0, 1]")
    return np.rint(pixels * 255).astype(np.uint8).tobytes()


def _probabilities(value):
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 10
            or not all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1 for p in value)):
        raise FeedbackError("probabilities must be a list of 10 numbers in [0, 1]")
    return json.dumps([round(float(p), 6) for p in value])


def _sha256(value):
    if value is None:
        return None
    if not isinstance(value, str) or len(value) != 64 or not set(value) <= SHA256_HEX:
        raise FeedbackError("model_sha256 must be 64 lowercase hex digits")
    return value


def read_correction(payload, decode_image, to_input):
    """The row to store from the JSON body; FeedbackError (or the app's BadInput) names what is wrong.

    decode_image: data URL -> image bytes; to_input: image bytes -> (28, 28) float array
    (the app's own preprocessing, used when the page sent only the drawing).
    """
    if not isinstance(payload, dict):
        raise FeedbackError('body must be a JSON object: {"label": d, "input": ..., "image": ...}')
    label = _digit(payload.get("label"), "label", required=True)
    image = payload.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise FeedbackError("image must be the drawing's data URL")
        image = decode_image(image.encode())
    if payload.get("input") is not None:
        pixels = _input(payload["input"])
    elif image is not None:
        pixels = np.rint(to_input(image) * 255).astype(np.uint8).tobytes()
    else:
        raise FeedbackError("send the drawing: input (28x28) or image (data URL), or both")
    return {"label": label, "predicted": _digit(payload.get("predicted"), "predicted", required=False),
            "probabilities": _probabilities(payload.get("probabilities")),
            "model_sha256": _sha256(payload.get("model_sha256")), "input": pixels, "image": image}


# --- The view ----------------------------------------------------------------


def blueprint(store, decode_image, to_input, on_stored=None, per_minute=DEFAULT_PER_MINUTE):
    """POST /feedback: 201 {"stored": true, "id": n} once committed; 400 {"error": ...} otherwise,
    429 past `per_minute` corrections from one client."""
    bp = Blueprint("feedback", __name__)
    limit = RateLimit(per_minute)

    @bp.errorhandler(FeedbackError)
    def refused(error):
        return jsonify(error=str(error)), error.status

    @bp.post("/feedback", strict_slashes=False)
    def feedback():
        if not limit.allow(client_of(request.remote_addr, request.headers.get("X-Forwarded-For"))):
            return jsonify(error=f"too many corrections from this address: at most {per_minute:g} a minute"), 429, {
                "Retry-After": str(max(1, round(60 / per_minute)))}
        if not request.is_json:
            raise FeedbackError("send JSON (Content-Type: application/json)")
        payload = request.get_json(silent=True)
        if payload is None:
            raise FeedbackError("body is not valid JSON")
        row = read_correction(payload, decode_image, to_input)
        row_id, dropped = store.add(row)
        if dropped:
            current_app.logger.warning("feedback: %d oldest correction(s) dropped (bound reached)", dropped)
        if on_stored:
            on_stored(row, dropped)
        return jsonify(stored=True, id=row_id), 201

    return bp


def per_minute_from_environment():
    return float(os.environ.get("FEEDBACK_PER_MINUTE", DEFAULT_PER_MINUTE))


def store_from_environment(folder=None):
    """The store in `folder`, else $STATE_DIR, else ./state beside the app; bounded by FEEDBACK_MAX_ROWS/_MB."""
    folder = folder or os.environ.get("STATE_DIR") or Path(__file__).resolve().parent / "state"
    return FeedbackStore(folder, max_rows=int(os.environ.get("FEEDBACK_MAX_ROWS", DEFAULT_MAX_ROWS)),
                         max_bytes=int(float(os.environ.get("FEEDBACK_MAX_MB", DEFAULT_MAX_MB)) * (1 << 20)))
