"""Back-end tier scaling: throughput through the stand-in balancer for N = 1, 2, 3 back-ends.

    sudo python bench/tier_scaling.py [--model artifacts/cnn-mnist.keras] [--seconds 10] [--quota 0.25]

Each back-end (gunicorn, keras_flask, one worker) runs in its own cgroup (v1 cpu controller, or v2)
limited to --quota of one CPU, so that the machine's own cores are not what limits N back-ends.
apache's mod_proxy_balancer (tasks/balancer.py's configuration, as the machines tier runs it)
spreads wrk's requests (a canvas PNG, as the page posts) over them. Also for N = 1: the same
back-end straight, for the balancer's cost per request. Needs root (cgroups) and apache2.
Prints req/s per N and the ratios to N = 1 (the issue's goal: >= 1.8x at 2, >= 2.5x at 3);
writes bench/results/tier_scaling.json.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "Files")]
from bench.common import ensure_model, save_result  # noqa: E402
from bench.serving import drive, start  # noqa: E402
from tasks import balancer  # noqa: E402
from tasks.config import FILES  # noqa: E402
from tasks.local import gunicorn_command  # noqa: E402
from tests.canvas import data_url, render  # noqa: E402
from tests.fixtures import MNIST_NPZ, free_port  # noqa: E402
from tests.test_balancer import HTTPD  # noqa: E402  (the same minimal apache)


def cgroup(name, quota):
    """A cgroup limited to `quota` CPUs; returns its cgroup.procs file."""
    v1 = Path("/sys/fs/cgroup/cpu")
    if v1.is_dir():
        folder = v1 / name
        folder.mkdir(exist_ok=True)
        (folder / "cpu.cfs_period_us").write_text("100000")
        (folder / "cpu.cfs_quota_us").write_text(str(int(quota * 100000)))
    else:
        folder = Path("/sys/fs/cgroup") / name
        folder.mkdir(exist_ok=True)
        (folder / "cpu.max").write_text(f"{int(quota * 100000)} 100000")
    return folder / "cgroup.procs"


def answered(url, body, expected, timeout=30):
    """Until the balancer answers right (apache started, its members healthy)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.post(url, data=body, timeout=5).text.strip() == expected:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    sys.exit(f"no right answer from {url} within {timeout}s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a cnn-mnist.keras (its .tflite beside it is served)")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--quota", type=float, default=0.25, help="CPUs per back-end")
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("apache2"):
        sys.exit("needs root (cgroups) and apache2")
    model = ensure_model(args.model)
    with np.load(MNIST_NPZ) as data:
        digit, label = data["x_test"][0], str(int(data["y_test"][0]))
    body = data_url(render(digit, "white", 200))
    work = Path(tempfile.mkdtemp(prefix="bench-tier-"))
    body_file = work / "body.txt"
    body_file.write_text(body)

    servers, ports, groups = [], [], []
    for i in range(3):
        port = free_port()
        procs = cgroup(f"digits-bench-backend-{i}", args.quota)
        groups.append(procs)
        command = ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *gunicorn_command("127.0.0.1", port, 1)]
        server, _ = start(command, FILES, f"http://127.0.0.1:{port}/predict/", body, label,
                          env={"MODEL_PATH": str(model.resolve())})
        servers.append(server)
        ports.append(port)
    figures = {}
    try:
        direct = drive(f"http://127.0.0.1:{ports[0]}/predict/", body_file, args.seconds, args.clients)
        print(f"direct N=1: {direct['requests_per_s']:8.1f} req/s  p50 {direct['p50_ms']:.2f} ms", flush=True)
        for n in (1, 2, 3):
            front = free_port()
            (work / "httpd.conf").write_text(HTTPD.format(root=work, port=front))
            (work / "balancer.conf").write_text(balancer.render([f"127.0.0.1:{p}" for p in ports[:n]], 5))
            httpd = subprocess.Popen([shutil.which("apache2"), "-f", str(work / "httpd.conf"), "-DFOREGROUND"])  # noqa: S603
            try:
                answered(f"http://127.0.0.1:{front}/predict/", body, label)
                figures[n] = drive(f"http://127.0.0.1:{front}/predict/", body_file, args.seconds, args.clients)
            finally:
                httpd.terminate()
                httpd.wait(10)
                time.sleep(0.5)
            print(f"balanced N={n}: {figures[n]['requests_per_s']:8.1f} req/s  p50 {figures[n]['p50_ms']:.2f} ms"
                  f"  errors {figures[n]['errors']}", flush=True)
    finally:
        for server in servers:
            server.terminate()
            server.wait(20)
        for procs in groups:
            procs.parent.rmdir()  # empty now: its processes are gone
    base = figures[1]["requests_per_s"]
    ratios = {f"x_at_{n}": round(figures[n]["requests_per_s"] / base, 2) for n in (2, 3)}
    cost_ms = round(figures[1]["p50_ms"] - direct["p50_ms"], 2)
    print(f"scaling: {ratios}; the balancer's cost per request: {cost_ms} ms at p50"
          f" (N=1 balanced {base:.1f} vs direct {direct['requests_per_s']:.1f} req/s)")
    save_result("tier_scaling", {"quota_cpus": args.quota, "clients": args.clients, "seconds": args.seconds,
                                 "direct": direct, "balanced": figures, "ratios": ratios,
                                 "balancer_p50_cost_ms": cost_ms})


if __name__ == "__main__":
    main()
