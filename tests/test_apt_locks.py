"""apt's locks on a fresh host: the setup tasks wait for them, show it, and give up, bounded.

On a new Ubuntu instance apt-daily and unattended-upgrades run apt right after cloud-init;
`apt-get update` then fails at once ("Could not get lock /var/lib/apt/lists/lock", exit 100)
and DPkg::Lock::Timeout does not help it. Here this test process plays that holder: it takes
apt's own fcntl (F_SETLK) lock on the real lock file of this machine, which the test hosts
share, while ensure_apt runs over SSH with real sudo and apt.
"""
import contextlib
import fcntl
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from invoke.exceptions import Exit

from tasks import remote
from tests.fixtures import context
from tests.fixtures.ssh_hosts import captured

LISTS = Path("/var/lib/apt/lists/lock")
FRONTEND = Path("/var/lib/dpkg/lock-frontend")
PACKAGE = "hello"  # small, and needed by nothing here: installed by the test, removed after


@contextlib.contextmanager
def holding(path, seconds=None):
    """Hold apt's lock on `path` as apt does (fcntl, F_SETLK), for `seconds` (released by a
    thread meanwhile) or until the block ends. Another apt holding it is waited for first."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    deadline = time.monotonic() + 120
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    released = threading.Event()

    def release():
        if not released.is_set():
            released.set()
            os.close(fd)  # closing it drops the lock

    timer = threading.Timer(seconds, release) if seconds else None
    if timer:
        timer.start()
    try:
        yield
    finally:
        if timer:
            timer.cancel()
        release()


def setup_apt(c, packages, cache_valid):
    """ensure_apt as setup-worker runs it, on the worker test host: (seconds, printed)."""
    def run():
        with remote.Report(c, "setup-worker", "worker") as r:
            remote.ensure_apt(r.cxn, r, packages, cache_valid)
        return r.result

    started = time.monotonic()
    result, printed = captured(run)
    return result, time.monotonic() - started, printed


def root_apt(*args):
    subprocess.run(["apt-get", "-q", "-o", "DPkg::Lock::Timeout=120", *args], capture_output=True, check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def test_update_waits_for_the_lists_lock(ssh_hosts):
    c = context(**ssh_hosts.config(remote={"apt_lock_timeout": 120}))
    with holding(LISTS, seconds=6):
        result, seconds, printed = setup_apt(c, ["python3-venv"], cache_valid=-1)  # -1: a stale stamp
    assert (f"  waiting for apt's lock /var/lib/apt/lists/lock, held by process {os.getpid()} (" in printed
            and "gives up after 120s: remote.apt_lock_timeout" in printed), printed
    assert "  changed: apt cache updated\n" in printed and result["changed"] == 1, printed
    assert seconds >= 5, seconds


def test_install_waits_for_the_dpkg_frontend_lock(ssh_hosts):
    c = context(**ssh_hosts.config(remote={"apt_lock_timeout": 120}))
    root_apt("remove", "-y", PACKAGE)
    try:
        with holding(FRONTEND, seconds=6):
            result, seconds, printed = setup_apt(c, [PACKAGE], cache_valid=10**10)  # no update: install only
        assert (f"  waiting for apt's lock /var/lib/dpkg/lock-frontend, held by process {os.getpid()} ("
                in printed), printed
        assert f"  changed: apt packages {PACKAGE} installed\n" in printed, printed
        assert subprocess.run(["dpkg-query", "-W", "-f=${Status}", PACKAGE], capture_output=True,
                              text=True).stdout == "install ok installed"
        assert seconds >= 5, seconds
    finally:
        root_apt("remove", "-y", PACKAGE)


def test_a_lock_never_released_fails_after_the_bound(ssh_hosts):
    c = context(**ssh_hosts.config(remote={"apt_lock_timeout": 4}))
    started = time.monotonic()
    with holding(LISTS), pytest.raises(Exit) as error:
        setup_apt(c, ["python3-venv"], cache_valid=-1)
    seconds = time.monotonic() - started
    message = error.value.message
    assert message.startswith(f"FAILED [setup-worker] on the worker (worker@127.0.0.2:{ssh_hosts.port}): apt's lock"
                              f" /var/lib/apt/lists/lock is still held by process {os.getpid()} ("), message
    assert "(remote.apt_lock_timeout = 4s)" in message and "re-run: fab setup-worker" in message, message
    assert 4 <= seconds < 30, seconds


def test_an_apt_get_that_does_not_finish_is_stopped(ssh_hosts):
    """Each apt-get on the host runs under `timeout` (remote.apt_timeout): one that runs past
    it is stopped, and the task fails saying which and why."""
    c = context(**ssh_hosts.config(remote={"apt_timeout": 0.01}))
    with pytest.raises(Exit) as error:
        setup_apt(c, ["python3-venv"], cache_valid=-1)
    message = error.value.message
    assert message.startswith(f"FAILED [setup-worker] on the worker (worker@127.0.0.2:{ssh_hosts.port}):"
                              " `apt-get update` did not finish within 0.01s (remote.apt_timeout)"), message
