"""Deploy benchmark: wall time of `deploy` to the loopback test hosts, first run and a no-change
run; then what apache's forwarding (backend.mode proxied) costs per request.

    sudo python bench/deploy.py [--epochs 1 --limit 12000] [--seconds 10 --clients 8]

Starts the same sshd test hosts as the tests (root: Unix users per role), then
runs the whole remote part of the guide (setup-worker, train, setup-backend,
push-model, setup-frontend) from the inventory. The first run uses fresh
environment folders on the hosts, so every pip install and upload really
happens (from the hosts' warm pip caches: no network time is measured); the
second run finds everything right. Then wrk drives the deployed back-end twice with
the same canvas PNG: through apache on the front-end (what the page calls in
proxied and private mode) and straight at its port (public mode). Writes
bench/results/deploy.json.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import save_result
from bench.serving import drive
from tasks.deploy import deploy
from tests.canvas import data_url, render
from tests.fixtures import MNIST_NPZ, context, free_port
from tests.fixtures.ssh_hosts import ADDRESSES, preconditions, running_hosts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=12000, help="training images (0: all)")
    parser.add_argument("--seconds", type=int, default=10, help="of wrk's load, each way")
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    reason = preconditions()
    if reason:
        sys.exit(reason)

    run_id = time.strftime("%Y%m%d%H%M%S")
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as folder, running_hosts(folder) as hosts:
        c = context(**hosts.config(
            train={"artifacts": str(Path(folder) / "artifacts"), "data": str(MNIST_NPZ)},
            # A port free on every address: the back-end binds 0.0.0.0 and is reached at the host's 127.0.0.x.
            backend={"port": free_port("0.0.0.0"),  # noqa: S104  (a probe for a free port, closed at once)
                     "service": "digits-backend-test-bench", "dir": f"bench-{run_id}/backend"},
            worker={"venv": f"benchenv{run_id}", "dir": f"bench-{run_id}/work", "jupyter_port": free_port()},
            frontend={"rate_limit": 0},  # wrk from one address measures apache's cost, not its rate limit
        ))  # fmt: skip
        times = {}
        for run in ("first_run_s", "no_change_run_s"):
            started = time.perf_counter()
            result = deploy(c, epochs=args.epochs, limit=args.limit, data=str(MNIST_NPZ))
            times[run] = round(time.perf_counter() - started, 1)
            times[run.replace("_s", "_changed")] = result["changed"]
            print(f"{run}: {times[run]} s, {result['changed']} changed", flush=True)
        serving = forwarding_cost(c, Path(folder), args)
    times["ratio_first_to_no_change"] = round(times["first_run_s"] / times["no_change_run_s"], 1)
    save_result("deploy", {"epochs": args.epochs, "limit": args.limit, **times, "serving": serving})


def forwarding_cost(c, folder, args):
    """wrk through apache's forwarding (the page's own origin) and straight at the back-end."""
    with np.load(MNIST_NPZ) as data:
        digit = data["x_test"][0]  # a 7
    body_file = folder / "body.txt"
    body_file.write_text(data_url(render(digit, "white", 200)))
    urls = {"through_apache": f"http://{ADDRESSES['frontend']}/predict/",
            "direct": f"http://{ADDRESSES['backend']}:{c.config.backend.port}/predict/"}
    found = {way: drive(url, body_file, args.seconds, args.clients) for way, url in urls.items()}
    for way, figures in found.items():
        print(f"{way:>15}: {figures['requests_per_s']:7.1f} req/s  p50 {figures['p50_ms']:6.2f} ms"
              f"  p99 {figures['p99_ms']:6.2f} ms  errors {figures['errors']}", flush=True)
    found["apache_p50_added_ms"] = round(found["through_apache"]["p50_ms"] - found["direct"]["p50_ms"], 2)
    found["throughput_ratio"] = round(found["through_apache"]["requests_per_s"] / found["direct"]["requests_per_s"], 2)
    print(f"apache adds {found['apache_p50_added_ms']} ms at p50; throughput through it x{found['throughput_ratio']}")
    return {"clients": args.clients, "seconds": args.seconds, **found}


if __name__ == "__main__":
    main()
