"""Write bench/RESULTS.md from bench/results/*.json (run after the benchmarks)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RESULTS


def load(name):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def serving(r):
    g, o, x = r["guide"], r["ours"], r["ratios"]
    rows = [
        ("throughput (req/s)", g["requests_per_s"], o["requests_per_s"], f"{x['throughput_x']}x"),
        ("p50 latency (ms)", g["p50_ms"], o["p50_ms"], ""),
        ("p99 latency (ms)", g["p99_ms"], o["p99_ms"], f"{x['p99_x_faster']}x lower"),
        ("errors under load", g["errors"], o["errors"], ""),
        ("wrong answers after load (of 20)", g["wrong_after_load"], o["wrong_after_load"], ""),
        ("RSS per process, max (MB)", g["rss_mb_max"], o["rss_mb_max"],
         f"{x['rss_per_process_x_smaller']}x smaller"),
        ("processes (RSS total MB)", f"{g['processes']} ({g['rss_mb_total']})",
         f"{o['processes']} ({o['rss_mb_total']})", ""),
        ("cold start to first answer (s)", g["cold_start_s"], o["cold_start_s"], f"{x['cold_start_x_faster']}x"),
    ]
    head = (f"## Serving ({r['when']})\n\n`python bench/serving.py`: wrk, {r['clients']} keep-alive connections, "
            f"{r['seconds']} s each, a 280x280 canvas PNG; "
            f"ours = gunicorn, {r['workers']} workers, LiteRT.\n\n")  # fmt: skip
    return head + table(["", "guide", "ours", "ours/guide"], rows)


def accuracy(r):
    rows = [(name, f"{r['guide'][name]:.2%}", f"{r['ours'][name]:.2%}") for name in r["ours"]]
    head = (f"## Accuracy through HTTP ({r['when']})\n\n"
            f"`python bench/accuracy.py --count {r['count']}`: "
            f"the first {r['count']} MNIST test digits in each set.\n\n")
    return head + table(["set", "guide", "ours"], rows)


def training(r):
    m = r["metrics"]
    rows = [("test accuracy (10,000 MNIST test images)", f"{m['test_accuracy']:.2%}"), ("epochs", m["epochs"]),
            ("wall seconds (whole notebook, headless)", r["wall_seconds"])]  # fmt: skip
    return f"## Training ({r['when']})\n\n`python bench/training.py`\n\n" + table(["", "figure"], rows)


def deploy(r):
    rows = [(k.replace("_", " "), v) for k, v in r.items() if k.endswith("_s")]
    head = f"## Deploy ({r['when']})\n\n`sudo python bench/deploy.py` (root: it creates the test hosts' Unix users)\n\n"
    text = head + table(["run", "seconds"], rows)
    if "serving" in r:  # recorded since backend.mode proxied became the default
        s = r["serving"]
        ways = ("through_apache", "direct")
        rows = [(label, *(s[way][key] for way in ways)) for label, key in
                (("throughput (req/s)", "requests_per_s"), ("p50 latency (ms)", "p50_ms"),
                 ("p99 latency (ms)", "p99_ms"), ("errors", "errors"))]
        text += (f"\nThe deployed back-end under wrk, {s['clients']} keep-alive connections, {s['seconds']} s each:"
                 " through apache's forwarding on the front-end (backend.mode proxied, private) and straight"
                 f" at its port (public). Apache adds {s['apache_p50_added_ms']} ms at p50; throughput"
                 f" through it x{s['throughput_ratio']}.\n\n")
        text += table(["", "through apache", "direct"], rows)
    return text


def machines_deploy(r):
    rows = [(index + 1, run["boot_three_s"], run["first_run_s"], run["no_change_run_s"], run["no_change_run_changed"],
             run["pip_cache_mb_before"]) for index, run in enumerate(r["runs"])]
    head = (f"## Deploy on machines ({r['when']})\n\n`sudo python bench/machines_deploy.py`: three Debian 12 machines"
            " booted with systemd-nspawn (tests/fixtures/machines.py), nothing installed, then `deploy` from the"
            f" inventory ({r['epochs']}-epoch train on {r['limit']} images) and once more.\n\n")
    return head + table(["run", "boot 3 machines (s)", "first deploy (s)", "no-change deploy (s)",
                         "changed in the no-change run", "machines' pip cache before (MB)"], rows)


EDGE_WAYS = {"frontend": "front-end edge (apache; proxied, private)", "backend": "back-end edge (apache; public)",
             "direct": "gunicorn direct (public mode before)"}


def edge(r):
    ways = [(label, r[way]) for way, label in EDGE_WAYS.items() if way in r]
    rows = [(way, f["quiet_p99_s"], f["attack_p99_s"], f"x{f['p99_ratio']}",
             f"{f['attack_answered_right']}/{f['attack_requests']}",
             round(sum(a.get("cpu_s", 0) for a in f["attackers"]), 1)) for way, f in ways]
    floods = [f"{label.split(' (')[0]}: {f['flood_429']}/{f['flood_requests']} answered 429 (the first after"
              f" {f['flood_answered_before_429']}), a person at another address meanwhile"
              f" {f['person_answered_right']}/{f['person_requests']} right" for label, f in ways if "flood_429" in f]
    return (f"## Edge under attack ({r['when']})\n\n`sudo python bench/edge.py --seconds {r['seconds']}`: a person"
            " posting a digit every 0.25 s, alone, then under a slowloris (150 connections dribbling headers"
            " and 150 dribbling bodies, a byte a second, from two addresses, in a process of their own),"
            " each as long.\n\n"
            + table(("way", "quiet p99 (s)", "attack p99 (s)", "ratio", "answered right under attack",
                     "attackers' CPU (s)"), rows)
            + "\nFlood from one address: " + "; ".join(floods) + ".\n")


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main():
    sections, machine = [], None
    for name, render in [("training", training), ("serving", serving), ("accuracy", accuracy), ("deploy", deploy),
                         ("machines_deploy", machines_deploy), ("edge", edge)]:
        result = load(name)
        if result:
            sections.append(render(result))
            machine = machine or result["machine"]
    text = "# Benchmark results\n\nRecorded by the scripts in `bench/` (see README.md).\n"
    if machine:
        text += (f"Machine: {machine['cpus']} CPUs, {machine['machine']}, {machine['system']}, "
                 f"Python {machine['python']}.\n")
    (RESULTS.parent / "RESULTS.md").write_text(text + "\n" + "\n".join(sections))
    print(f"wrote {RESULTS.parent / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
