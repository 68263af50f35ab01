"""Deploy benchmark: wall time of `deploy` to the loopback test hosts, first run and a no-change run.

    sudo python bench/deploy.py [--epochs 1 --limit 12000]

Starts the same sshd test hosts as the tests (root: Unix users per role), then
runs the whole remote part of the guide (setup-worker, train, setup-backend,
push-model, setup-frontend) from the inventory. The first run uses fresh
environment folders on the hosts, so every pip install and upload really
happens (from the hosts' warm pip caches: no network time is measured); the
second run finds everything right. Writes bench/results/deploy.json.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import save_result
from tasks.deploy import deploy
from tests.conftest import MNIST_NPZ
from tests.fixtures.ssh_hosts import context, free_port, preconditions, running_hosts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=12000, help="training images (0: all)")
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
        ))  # fmt: skip
        times = {}
        for run in ("first_run_s", "no_change_run_s"):
            started = time.perf_counter()
            result = deploy(c, epochs=args.epochs, limit=args.limit, data=str(MNIST_NPZ))
            times[run] = round(time.perf_counter() - started, 1)
            times[run.replace("_s", "_changed")] = result["changed"]
            print(f"{run}: {times[run]} s, {result['changed']} changed", flush=True)
    times["ratio_first_to_no_change"] = round(times["first_run_s"] / times["no_change_run_s"], 1)
    save_result("deploy", {"epochs": args.epochs, "limit": args.limit, **times})


if __name__ == "__main__":
    main()
