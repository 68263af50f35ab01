"""Edge benchmark: a person drawing while a slowloris and a flood attack, through each mode's edge:
the front-end's (`fab setup-frontend`: apache with tasks/templates/digits-frontend-edge.conf and the
forwarding conf; backend.mode proxied and private), the back-end host's (`fab setup-backend` in
backend.mode public: tasks/templates/digits-backend-edge.conf), and, for comparison, straight at
gunicorn (what public mode exposed before).

    sudo python bench/edge.py [--seconds 30] [--model artifacts/cnn-mnist.keras]

Runs a private apache2 per edge (this machine's modules, its own config, pid and logs in a
temporary folder, on 127.0.0.9) in front of the back-end under gunicorn with 2 sync workers on
127.0.0.1, as deployed. The person (127.0.0.33) posts an MNIST digit every 0.25 s on a new
connection: p99 alone, then during the attack: 150 connections from 127.0.0.31 dribbling headers
and 150 from 127.0.0.32 dribbling bodies, a byte a second each (in a process of their own). Then
a flood from 127.0.0.21 while the person goes on. Writes bench/results/edge.json.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ensure_model, save_result
from tasks import frontend, public_edge
from tasks.config import DEFAULTS, FILES, frontend_config_js
from tasks.local import gunicorn_command
from tests.attack import Slowloris, Steady, flood, mnist_digit, p99, under_attack
from tests.fixtures import free_port

HOST = "127.0.0.9"
MODULES = ["mpm_event", "authz_core", "mime", "dir", "alias", "env", "setenvif", "headers", "reqtimeout",
           "request", "proxy", "proxy_http", "qos"]
MODULE_DIRS = {}  # module -> folder, where not apache's (--qos-dir)
HTTPD = """ServerRoot /etc/apache2
DefaultRuntimeDir {folder}
PidFile {folder}/httpd.pid
Mutex file:{folder} default
ErrorLog {folder}/error.log
LogLevel warn
{listen}
ServerName bench-edge
User www-data
Group www-data
{load}
TypesConfig /etc/mime.types
DirectoryIndex index.html
DocumentRoot {folder}/www
<Directory {folder}/www>
    Require all granted
</Directory>
{include}
"""
APP = "127.0.0.1"  # gunicorn's address: the back-end's edge forwards to the loopback


def settings(port, backend_port):
    """What the tasks read: the defaults, backend.mode public on these ports."""
    sections = {"frontend": DEFAULTS["frontend"],
                "backend": {**DEFAULTS["backend"], "mode": "public", "port": port, "app_port": backend_port}}
    return types.SimpleNamespace(config=types.SimpleNamespace(
        **{name: types.SimpleNamespace(**values) for name, values in sections.items()}))


def start_apache(folder, port, backend_port, way):
    """apache2 with an edge's confs as the setup tasks render them, in front of the back-end:
    way "frontend" (setup-frontend's, proxied and private modes) or "backend" (public mode's)."""
    folder.mkdir()
    if way == "frontend":
        edge = frontend.EDGE_TEMPLATE.read_text().replace("@CONNECT_SRC@", "")
        for placeholder, value in frontend.edge_limits(settings(port, backend_port)).items():
            edge = edge.replace(placeholder, value)
        (folder / "edge.conf").write_text(edge)
        proxy = frontend.PROXY_TEMPLATE.read_text().replace("@BACKEND@", f"{APP}:{backend_port}")
        (folder / "proxy.conf").write_text(proxy)
        listen, include = f"Listen {HOST}:{port}", f"Include {folder}/edge.conf\nInclude {folder}/proxy.conf"
    else:
        edge, _ = public_edge.render(settings(port, backend_port), "http://127.0.0.3")
        edge = edge.replace(f"Listen {port}\n", f"Listen {HOST}:{port}\n")
        (folder / "edge.conf").write_text(edge.replace(str(public_edge.ERRORS), f"{folder}/www/static"))
        listen, include = "", f"Include {folder}/edge.conf"
    shutil.copytree(FILES, folder / "www", ignore=shutil.ignore_patterns("*.ipynb", "*.png", "*.py", "*.txt"))
    (folder / "www/static/config.js").write_text(frontend_config_js("/"))
    os.chmod(folder, 0o755)  # noqa: S103  (apache's www-data reads the page; nothing secret there)
    load = [f"LoadModule {m}_module {MODULE_DIRS.get(m, '/usr/lib/apache2/modules')}/mod_{m}.so" for m in MODULES]
    pcre = subprocess.run("ldconfig -p | awk '/libpcre\\.so\\.3 /{print $NF; exit}'", shell=True,  # noqa: S602,S607
                          capture_output=True, text=True).stdout.strip()
    if pcre:  # mod_qos on Debian 12 wants the old PCRE (tasks/frontend.py, ensure_qos)
        load.insert(0, f"LoadFile {pcre}")
    config = folder / "httpd.conf"
    config.write_text(HTTPD.format(folder=folder, listen=listen, include=include, load="\n".join(load)))
    subprocess.run(["apache2", "-f", str(config), "-k", "start"], check=True)  # noqa: S603,S607
    return config


def wait_for(url, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310  (loopback http)
                return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"{url} did not answer within {seconds}s")


def attack(host, port, body, label, seconds, quiet_seconds):
    steady = Steady(host, port, "127.0.0.33", body)
    attackers = [Slowloris(host, port, "127.0.0.31", "headers"), Slowloris(host, port, "127.0.0.32", "body")]
    quiet, attacked = under_attack(steady, attackers, seconds, quiet_seconds)
    right = [o for o in attacked if o[1] == 200 and o[2].strip() == str(label)]
    figures = {"quiet_requests": len(quiet), "quiet_p99_s": round(p99([o[0] for o in quiet]), 3),
               "attack_requests": len(attacked), "attack_answered_right": len(right),
               "attack_p99_s": round(p99([o[0] for o in attacked]), 3),
               "attackers": [{"kind": a.kind, "opened": a.opened, "answered": a.answered, "cpu_s": a.cpu_s}
                             for a in attackers]}
    figures["p99_ratio"] = round(figures["attack_p99_s"] / figures["quiet_p99_s"], 1)
    return figures


def flooded(port, body, label, seconds):
    """One address floods /predict/ for `seconds` (at most 30,000 requests) while a person at another
    posts a digit every 0.2 s: how much of the flood gets 429, and how the person fares meanwhile."""
    stop, person = threading.Event(), Steady(HOST, port, "127.0.0.22", body, every=0.2)
    thread = threading.Thread(target=person.run, args=(stop,), daemon=True)
    thread.start()
    started = time.monotonic()
    answers = []
    while time.monotonic() - started < seconds and len(answers) < 30_000:  # bounded in time and count
        answers += flood(HOST, port, "127.0.0.21", b"data:image/png;base64,!!", 300)
    took = time.monotonic() - started
    stop.set()
    thread.join(30)
    statuses = [a[0] for a in answers]
    return {"flood_requests": len(answers), "flood_s": round(took, 2), "flood_429": statuses.count(429),
            "flood_answered_before_429": statuses.index(429) if 429 in statuses else None,
            "person_requests": len(person.outcomes),
            "person_answered_right": sum(o[1] == 200 and o[2].strip() == str(label) for o in person.outcomes)}


def show(way, figures):
    print(f"{way:>16}: quiet p99 {figures['quiet_p99_s']:.3f}s ({figures['quiet_requests']} requests);"
          f" under attack p99 {figures['attack_p99_s']:.3f}s (x{figures['p99_ratio']}),"
          f" {figures['attack_answered_right']}/{figures['attack_requests']} answered right; the attackers'"
          f" CPU {sum(a['cpu_s'] for a in figures['attackers']):.1f}s", flush=True)


WAYS = {"frontend": "front-end edge", "backend": "back-end edge", "direct": "gunicorn direct"}


def measure(way, folder, body, label, args, backend_port):
    """One way's figures: the slowloris, then (through an edge) the flood."""
    if way == "direct":
        figures = attack(APP, backend_port, body, label, args.seconds, args.quiet)
        show(WAYS[way], figures)
        return figures
    port = free_port(HOST)
    config = start_apache(folder / way, port, backend_port, way)
    try:
        wait_for(f"http://{HOST}:{port}/health")
        figures = attack(HOST, port, body, label, args.seconds, args.quiet)
        show(WAYS[way], figures)
        time.sleep(2)
        figures.update(flooded(port, body, label, args.flood_seconds))
        print(f"{'flood':>16}: {figures['flood_429']}/{figures['flood_requests']} answered 429 (the first after"
              f" {figures['flood_answered_before_429']}); the person meanwhile"
              f" {figures['person_answered_right']}/{figures['person_requests']} right", flush=True)
    finally:
        subprocess.run(["apache2", "-f", str(config), "-k", "stop"], check=False)  # noqa: S603,S607
    time.sleep(5)  # (apache gone, the attack's sockets with it)
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=30, help="of the slowloris, each way")
    parser.add_argument("--quiet", type=int, help="seconds of the person alone first (default: --seconds, so"
                                                   " that both p99s come from as many requests)")
    parser.add_argument("--flood-seconds", type=float, default=10, help="of the flood, each edge")
    parser.add_argument("--model", help="a .keras model (default: artifacts/, else a quick one)")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"which of {', '.join(WAYS)} (default: all)")
    parser.add_argument("--qos-dir", help="the folder of mod_qos.so (default: apache's, from libapache2-mod-qos)")
    args = parser.parse_args()
    args.quiet = args.seconds if args.quiet is None else args.quiet
    if args.qos_dir:
        MODULE_DIRS["qos"] = args.qos_dir
    if os.geteuid() != 0:
        sys.exit("bench/edge.py starts apache2 (User www-data): run it as root")
    ways = [way.strip() for way in args.ways.split(",") if way.strip()]
    if set(ways) - set(WAYS):
        sys.exit(f"--ways: {', '.join(WAYS)}")
    model = ensure_model(args.model)
    label, body = mnist_digit(0)
    backend_port = free_port(APP)
    backend = subprocess.Popen(gunicorn_command(APP, backend_port, 2), cwd=FILES,  # noqa: S603
                               env={**os.environ, "MODEL_PATH": str(model)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = {"seconds": args.seconds}
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as folder:
        os.chmod(folder, 0o755)  # noqa: S103  (apache's www-data reads the page; nothing secret there)
        try:
            wait_for(f"http://{APP}:{backend_port}/health")
            warm = Steady(APP, backend_port, "127.0.0.33", body)
            for _ in range(10):  # both workers' first answers (model warm-up) are not the quiet figure
                warm.post()
            for way in ways:
                results[way] = measure(way, Path(folder), body, label, args, backend_port)
        finally:
            backend.terminate()
            backend.wait(30)
    save_result("edge", results)


if __name__ == "__main__":
    main()
