"""Keep one command running, like systemd's Restart=always, where PID 1 is not systemd.

    supervise.py --env-file F --log F --child-pidfile F -- COMMAND...

TERM/INT stop the command and exit; HUP is passed on (gunicorn: graceful reload);
if the command dies any other way it is started again, with a growing pause
when it keeps failing fast. Standard library only: runs on the host's venv python.
"""
import argparse
import os
import signal
import subprocess
import sys
import time


def load_env(path):
    for line in open(path, encoding="utf-8"):
        name, sep, value = line.strip().partition("=")
        if sep and not name.startswith("#"):
            os.environ[name.strip()] = value.strip().strip('"')


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--env-file")
    parser.add_argument("--log", required=True)
    parser.add_argument("--child-pidfile", required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.env_file:
        load_env(args.env_file)
    log = open(args.log, "ab", buffering=0)
    state = {"stopping": False, "child": None}

    def say(message):
        log.write(f"[supervise {time.strftime('%Y-%m-%d %H:%M:%S')}] {message}\n".encode())

    def on_signal(number, frame):
        if number in (signal.SIGTERM, signal.SIGINT):
            state["stopping"] = True
        if state["child"] and state["child"].poll() is None:
            state["child"].send_signal(signal.SIGTERM if number == signal.SIGINT else number)

    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, on_signal)
    failures = 0
    while not state["stopping"]:
        started = time.monotonic()
        child = state["child"] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        with open(args.child_pidfile, "w") as out:
            out.write(f"{child.pid}\n")
        say(f"started pid {child.pid}: {' '.join(command)}")
        code = child.wait()
        if state["stopping"]:
            say(f"stopped (exit {code})")
            break
        failures = failures + 1 if time.monotonic() - started < 10 else 0
        pause = min(30, 2 ** failures) if failures else 1
        say(f"pid {child.pid} exited with {code}; starting again in {pause}s")
        deadline = time.monotonic() + pause
        while not state["stopping"] and time.monotonic() < deadline:
            time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
