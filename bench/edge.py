"""Edge benchmark: a person drawing while a slowloris and a flood attack, through the edge that
`fab setup-frontend` configures (apache with tasks/templates/digits-frontend-edge.conf and the
forwarding conf), and, for comparison, straight at gunicorn (what backend.mode public exposes).

    sudo python bench/edge.py [--seconds 30] [--model artifacts/cnn-mnist.keras]

Runs a private apache2 (this machine's modules, its own config, pid and logs in a temporary
folder, on 127.0.0.9) in front of the back-end under gunicorn with 2 sync workers, as deployed.
The person (127.0.0.33) posts an MNIST digit every 0.25 s on a new connection: p99 alone, then
during the attack: 150 connections from 127.0.0.31 dribbling headers and 150 from 127.0.0.32
dribbling bodies, a byte a second each. Then a flood from 127.0.0.21 while the person goes on.
Writes bench/results/edge.json.
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
from tasks import frontend
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
Listen {host}:{port}
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
Include {folder}/edge.conf
Include {folder}/proxy.conf
"""


def start_apache(folder, port, backend_port):
    """apache2 with the edge's confs as setup-frontend renders them, in front of the back-end."""
    defaults = types.SimpleNamespace(**DEFAULTS["frontend"])
    settings = types.SimpleNamespace(config=types.SimpleNamespace(frontend=defaults))
    edge = frontend.EDGE_TEMPLATE.read_text().replace("@CONNECT_SRC@", "")
    for placeholder, value in frontend.edge_limits(settings).items():
        edge = edge.replace(placeholder, value)
    (folder / "edge.conf").write_text(edge)
    proxy = frontend.PROXY_TEMPLATE.read_text().replace("@BACKEND@", f"{HOST}:{backend_port}")
    (folder / "proxy.conf").write_text(proxy)
    shutil.copytree(FILES, folder / "www", ignore=shutil.ignore_patterns("*.ipynb", "*.png", "*.py", "*.txt"))
    (folder / "www/static/config.js").write_text(frontend_config_js("/"))
    os.chmod(folder, 0o755)  # noqa: S103  (apache's www-data reads the page; nothing secret there)
    load = [f"LoadModule {m}_module {MODULE_DIRS.get(m, '/usr/lib/apache2/modules')}/mod_{m}.so" for m in MODULES]
    pcre = subprocess.run("ldconfig -p | awk '/libpcre\\.so\\.3 /{print $NF; exit}'", shell=True,  # noqa: S602,S607
                          capture_output=True, text=True).stdout.strip()
    if pcre:  # mod_qos on Debian 12 wants the old PCRE (tasks/frontend.py, ensure_qos)
        load.insert(0, f"LoadFile {pcre}")
    config = folder / "httpd.conf"
    config.write_text(HTTPD.format(folder=folder, host=HOST, port=port, load="\n".join(load)))
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


def attack(port, body, label, seconds, quiet_seconds):
    steady = Steady(HOST, port, "127.0.0.33", body)
    attackers = [Slowloris(HOST, port, "127.0.0.31", "headers"), Slowloris(HOST, port, "127.0.0.32", "body")]
    quiet, attacked = under_attack(steady, attackers, seconds, quiet_seconds)
    right = [o for o in attacked if o[1] == 200 and o[2].strip() == str(label)]
    figures = {"quiet_requests": len(quiet), "quiet_p99_s": round(p99([o[0] for o in quiet]), 3),
               "attack_requests": len(attacked), "attack_answered_right": len(right),
               "attack_p99_s": round(p99([o[0] for o in attacked]), 3),
               "attackers": [{"kind": a.kind, "opened": a.opened, "answered": a.answered} for a in attackers]}
    figures["p99_ratio"] = round(figures["attack_p99_s"] / figures["quiet_p99_s"], 1)
    return figures


def flooded(port, body, label):
    stop, person = threading.Event(), Steady(HOST, port, "127.0.0.22", body, every=0.2)
    thread = threading.Thread(target=person.run, args=(stop,), daemon=True)
    thread.start()
    started = time.monotonic()
    answers = flood(HOST, port, "127.0.0.21", b"data:image/png;base64,!!", 300)
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
          f" {figures['attack_answered_right']}/{figures['attack_requests']} answered right", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=30, help="of the slowloris, each way")
    parser.add_argument("--quiet", type=int, default=10, help="seconds of the person alone first")
    parser.add_argument("--model", help="a .keras model (default: artifacts/, else a quick one)")
    parser.add_argument("--qos-dir", help="the folder of mod_qos.so (default: apache's, from libapache2-mod-qos)")
    args = parser.parse_args()
    if args.qos_dir:
        MODULE_DIRS["qos"] = args.qos_dir
    if os.geteuid() != 0:
        sys.exit("bench/edge.py starts apache2 (User www-data): run it as root")
    model = ensure_model(args.model)
    label, body = mnist_digit(0)
    port, backend_port = free_port(HOST), free_port(HOST)
    backend = subprocess.Popen(gunicorn_command(HOST, backend_port, 2), cwd=FILES,  # noqa: S603
                               env={**os.environ, "MODEL_PATH": str(model)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as folder:
        config = None
        try:
            wait_for(f"http://{HOST}:{backend_port}/health")
            config = start_apache(Path(folder), port, backend_port)
            wait_for(f"http://{HOST}:{port}/health")
            warm = Steady(HOST, backend_port, "127.0.0.33", body)
            for _ in range(10):  # both workers' first answers (model warm-up) are not the quiet figure
                warm.post()
            edge = attack(port, body, label, args.seconds, args.quiet)
            show("through the edge", edge)
            time.sleep(2)
            edge.update(flooded(port, body, label))
            print(f"{'flood':>16}: {edge['flood_429']}/{edge['flood_requests']} answered 429 (the first after"
                  f" {edge['flood_answered_before_429']}); the person meanwhile"
                  f" {edge['person_answered_right']}/{edge['person_requests']} right", flush=True)
            time.sleep(12)  # (the slowloris' sockets closed at apache's end too)
            direct = attack(backend_port, body, label, args.seconds, args.quiet)
            show("gunicorn direct", direct)
        finally:
            if config:
                subprocess.run(["apache2", "-f", str(config), "-k", "stop"], check=False)  # noqa: S603,S607
            backend.terminate()
            backend.wait(30)
    save_result("edge", {"seconds": args.seconds, "through_edge": edge, "gunicorn_direct": direct})


if __name__ == "__main__":
    main()
