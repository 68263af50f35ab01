"""Keep one command running, like systemd's Restart=always, where PID 1 is not systemd.

    supervise.py --env-file F --log F --child-pidfile F -- COMMAND...

TERM/INT stop the command and exit; HUP is passed on (gunicorn: graceful reload);
if the command dies any other way it is started again, with a growing pause
when it keeps failing fast. Standard library only: runs on the host's venv python.

The command runs in a process group of its own, and whatever is left of that group
when the command has exited is stopped too (TERM, then KILL after GRACE seconds),
like systemd's KillMode=mixed: gunicorn's workers outlive a SIGKILLed master and,
under load, go on serving without one and keep the port, so that a new master
could never bind it. TERM lets each finish the request it is answering.
"""
import argparse
import os
import signal
import subprocess
import sys
import time

GRACE = 20  # seconds for leftovers to finish after TERM (gunicorn's graceful_timeout)


def load_env(path):
    for line in open(path, encoding="utf-8"):
        name, sep, value = line.strip().partition("=")
        if sep and not name.startswith("#"):
            os.environ[name.strip()] = value.strip().strip('"')


def group_alive(group):
    """True while a process of `group` runs (zombies, waiting for their reaper, do not count)."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as stat:
                        fields = stat.read().rpartition(")")[2].split()
                except OSError:
                    continue
                if int(fields[2]) == group and fields[0] not in "ZX":
                    return True
        return False
    except OSError:  # no /proc: trust kill()
        return True


def stop_group(group, say, grace=GRACE):
    """TERM what is left of the process group `group`; KILL it after `grace` seconds."""
    if not group_alive(group):
        return
    say(f"stopping what is left of process group {group} (TERM, KILL after {grace}s)")
    try:
        os.killpg(group, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + grace
    while group_alive(group):
        if time.monotonic() >= deadline:
            say(f"process group {group} still there after {grace}s: KILL")
            try:
                os.killpg(group, signal.SIGKILL)
            except OSError:
                pass
            return
        time.sleep(0.1)


def leftover(pidfile, command):
    """The group of a command a previous supervisor started and left running (it was
    killed itself), or None: it would hold the port."""
    try:
        with open(pidfile) as stream:
            pid = int(stream.read().split()[0])
        with open(f"/proc/{pid}/cmdline", "rb") as stream:
            arguments = stream.read().split(b"\0")
        if os.fsencode(command[0]) in arguments and os.getpgid(pid) == pid:
            return pid
    except (OSError, ValueError, IndexError):
        pass
    return None


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
    group = leftover(args.child_pidfile, command)
    if group:
        stop_group(group, say)
    failures = 0
    while not state["stopping"]:
        started = time.monotonic()
        child = state["child"] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                  start_new_session=True)
        with open(args.child_pidfile, "w") as out:
            out.write(f"{child.pid}\n")
        say(f"started pid {child.pid}: {' '.join(command)}")
        if state["stopping"]:  # TERM came while it was being started: on_signal saw no child
            child.terminate()
        code = child.wait()
        stop_group(child.pid, say)  # its workers, when it died before them
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
