"""Serving benchmark: the guide's back-end against ours, same model, same load, same run.

    python bench/serving.py [--model artifacts/cnn-mnist.keras] [--seconds 15] [--clients 8]

Each server is started cold, timed to its first correct answer, then driven by
wrk (C, keep-alive) with 8 connections posting a 280x280 canvas PNG as the
guide's page does. Prints throughput, p50/p99 latency, errors, RSS per process
and the ratios ours/guide; writes bench/results/serving.json.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "Files")]
from bench.common import ensure_model, save_result  # noqa: E402
from tasks.config import FILES  # noqa: E402
from tasks.local import gunicorn_command  # noqa: E402
from tests.canvas import data_url, render  # noqa: E402
from tests.fixtures import MNIST_NPZ, free_port  # noqa: E402

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded; charset=UTF-8"
local f = io.open("{body}", "rb")
wrk.body = f:read("*all")
f:close()
"""


def process_tree(pid):
    """pid and its descendants (a gunicorn master and its workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid] + [p for child in children for p in process_tree(int(child))]


def rss_mb(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def start(command, cwd, url, body, expected, env=None):
    """Start a server; seconds from exec to its first correct answer."""
    started = time.perf_counter()
    server = subprocess.Popen(  # noqa: S603  (argv list of our own, no shell)
        command, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"{command[:3]} exited with {server.returncode}")
        try:
            if requests.post(url, data=body, timeout=5).text.strip() == expected:
                return server, time.perf_counter() - started
        except requests.ConnectionError:
            time.sleep(0.05)


def drive(url, body_file, seconds, clients):
    """wrk's figures for one server."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA.format(body=body_file))
    out = subprocess.run(  # noqa: S603  (fixed argv, no shell)
        ["wrk", "-t", "1", "-c", str(clients), "-d", f"{seconds}s", "--latency", "--timeout", "10s",  # noqa: S607  (Debian's wrk, from PATH)
         "-s", script.name, url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip

    def latency(label):
        value, unit = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    requests_done = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": latency("50%"),
        "p99_ms": latency("99%"),
        "requests": requests_done,
        "errors": (int(non_2xx.group(1)) if non_2xx else 0)
        + (sum(map(int, socket_errors.groups())) if socket_errors else 0),
    }


def bench(name, command, cwd, url, body, body_file, expected, args, env=None):
    server, cold = start(command, cwd, url, body, expected, env)
    try:
        figures = drive(url, body_file, args.seconds, args.clients)
        processes = process_tree(server.pid)
        rss = [rss_mb(pid) for pid in processes]
        # After the load: does it still answer right? (the guide's output.png races)
        wrong = sum(requests.post(url, data=body, timeout=10).text.strip() != expected for _ in range(20))
    finally:
        server.terminate()
        server.wait(20)
    figures.update(cold_start_s=round(cold, 3), processes=len(processes), rss_mb_max=round(max(rss), 1),
                   rss_mb_total=round(sum(rss), 1), wrong_after_load=wrong)  # fmt: skip
    print(f"{name:>6}: {figures['requests_per_s']:8.1f} req/s  "
          f"p50 {figures['p50_ms']:7.2f} ms  p99 {figures['p99_ms']:7.2f} ms  "
          f"errors {figures['errors']}  RSS max {figures['rss_mb_max']:.0f} MB/process ({len(processes)} processes)  "
          f"cold start {cold:.2f} s", flush=True)  # fmt: skip
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a cnn-mnist.keras (a .tflite beside it is used by ours)")
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers for ours")
    args = parser.parse_args()
    model = ensure_model(args.model)

    with np.load(MNIST_NPZ) as data:
        digit, label = data["x_test"][0], str(int(data["y_test"][0]))
    body = data_url(render(digit, "white", 200))  # white canvas: what the guide's page posts
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    body_file = work / "body.txt"
    body_file.write_text(body)

    port = free_port()
    guide_command = [sys.executable, str(Path(__file__).with_name("guide_backend.py")),
                     "--model", str(model), "--port", str(port)]  # fmt: skip
    guide = bench("guide", guide_command, work, f"http://127.0.0.1:{port}/predict/", body, body_file, label, args)
    port = free_port()
    ours = bench("ours", gunicorn_command("127.0.0.1", port, args.workers), FILES, f"http://127.0.0.1:{port}/predict/",
                 body, body_file, label, args, env={"MODEL_PATH": str(model.resolve())})  # fmt: skip

    ratios = {
        "throughput_x": round(ours["requests_per_s"] / guide["requests_per_s"], 1),
        "p99_x_faster": round(guide["p99_ms"] / ours["p99_ms"], 1),
        "rss_per_process_x_smaller": round(guide["rss_mb_max"] / ours["rss_mb_max"], 1),
        "cold_start_x_faster": round(guide["cold_start_s"] / ours["cold_start_s"], 1),
    }
    print("ours/guide: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    save_result("serving", {"clients": args.clients, "seconds": args.seconds, "workers": args.workers,
                            "guide": guide, "ours": ours, "ratios": ratios})  # fmt: skip


if __name__ == "__main__":
    main()
