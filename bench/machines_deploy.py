"""Deploy benchmark on machines: wall time of `deploy` to three freshly booted Debian 12
machines with systemd (tests/fixtures/machines.py), first run and a no-change run.

    sudo python bench/machines_deploy.py [--epochs 1 --limit 12000] [--runs 1]

Each run boots three new machines from the cached image (nothing installed but what a
fresh Ubuntu cloud image has), so every apt and pip install really happens, from the
package registries through the machines' NAT (pip's cache, shared by the machines and kept
in /var/cache/digits-tests/machines-pip, is warm after the first run: the figures say so).
Writes bench/results/machines_deploy.json.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import save_result
from tasks.deploy import deploy
from tests.fixtures import MNIST_NPZ, context, free_port
from tests.fixtures.machines import PIP_CACHE, SUBNETS, lab, preconditions

ADDRESSES = {"worker": "192.168.0.10", "frontend": "192.168.0.11", "backend": "192.168.0.12"}


def cache_size():
    return sum(p.stat().st_size for p in PIP_CACHE.rglob("*") if p.is_file()) if PIP_CACHE.is_dir() else 0


def one_run(machines_lab, folder, args):
    started = time.perf_counter()
    machines = {role: machines_lab.machine(role, ip) for role, ip in ADDRESSES.items()}
    booted = round(time.perf_counter() - started, 1)
    c = context(**machines_lab.config(
        machines, train={"artifacts": str(Path(folder) / "artifacts"), "data": str(MNIST_NPZ)},
        worker={"jupyter_port": free_port()}))  # fmt: skip
    figures = {"boot_three_s": booted, "pip_cache_mb_before": round(cache_size() / 2**20)}
    for run in ("first_run_s", "no_change_run_s"):
        began = time.perf_counter()
        result = deploy(c, epochs=args.epochs, limit=args.limit, data=str(MNIST_NPZ))
        figures[run] = round(time.perf_counter() - began, 1)
        figures[run.replace("_s", "_changed")] = result["changed"]
        print(f"{run}: {figures[run]} s, {result['changed']} changed", flush=True)
    for role in list(machines):
        machines_lab.remove(role)
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=12000, help="training images (0: all)")
    parser.add_argument("--runs", type=int, default=1, help="each on three new machines")
    args = parser.parse_args()
    reason = preconditions()
    if reason:
        sys.exit(reason)
    with tempfile.TemporaryDirectory(prefix="bench-machines-") as folder, lab(folder, SUBNETS) as machines_lab:
        runs = [one_run(machines_lab, Path(folder) / str(index), args) for index in range(args.runs)]
    summary = {key: statistics.median(run[key] for run in runs) for key in ("first_run_s", "no_change_run_s")}
    save_result("machines_deploy", {"epochs": args.epochs, "limit": args.limit, "runs": runs, "median": summary})


if __name__ == "__main__":
    main()
