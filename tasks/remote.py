"""Idempotent steps on a remote host, and their Ansible-like ok/changed report.

Every step compares what is there with what should be there first, acts only
on a difference, and says which: `ok` (already right), `changed` (made right),
`checked` (a live check passed). All transfers go through SFTP. So a task cut
short (a failed command, a lost SSH connection: `Report` names the host and the
step) is finished by running it again.
"""
import contextlib
import hashlib
import io
import json
import re
import shlex
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

import paramiko
from invoke.exceptions import Exit, UnexpectedExit

from .errors import ConfigError, ConnectionLost
from .hosts import address, connect, gateway_role, label
from .report import Tally

STAGE = ".digits-stage"  # upload area in the remote user's home
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # a name that is safe as a file, unit and shell word


def q(value):
    """One shell word on the host, whatever the path or name holds."""
    return shlex.quote(str(value))


def valid_name(value, setting):
    """`value` if it is a plain name (service, venv: they become files and shell words)."""
    value = str(value)
    if not NAME.fullmatch(value) or value in (".", ".."):
        raise ConfigError(f"{setting} = {value!r}: use only letters, digits, '.', '_' and '-'"
                          " (it names files and a service on the host)")
    return value


# What a connection dropped under a running step raises: paramiko's "Server connection
# dropped" / "SSH session not active", EOF, "Socket is closed", resets and broken pipes.
DROPPED = (EOFError, paramiko.SSHException, socket.error)


class Report(Tally):
    """One task on one host: its connection, and the report of its steps; a failed
    command becomes an error naming the host, the command, its output and the task
    to re-run; so does a connection lost under a step, naming that step."""

    def __init__(self, c, task, role):
        user, host, port, _ = address(c, role)
        jump = gateway_role(c, role)
        where = f"{user}@{host}:{port}" + (f" via {jump}" if jump else "")
        super().__init__(task, role, where)  # the header first, then connecting's notes
        self.cxn = connect(c, role)
        self.doing = None  # the step the connection was last given
        self._watch()

    def fail(self, message):
        raise Exit(f"FAILED [{self.task}] on the {label(self.cxn)}: {message}\n  re-run: fab {self.task}")

    def _watch(self):
        """Steps (commands, transfers) go through `_watched`: a connection lost under one
        stops the task there, as ConnectionLost naming it. (Fabric would otherwise
        reconnect for the next step, and a command cut short reads as one that failed.)"""
        steps = {
            "run": lambda command, *args, **kwargs: f"running `{_short(command)}`",
            "sudo": lambda command, *args, **kwargs: f"running `sudo {_short(command)}`",
            "put": lambda local, remote=None, *args, **kwargs: f"uploading {remote or local}",
            "get": lambda remote, *args, **kwargs: f"downloading {remote}",
        }
        for name, describe in steps.items():  # instance attributes: this connection only
            setattr(self.cxn, name, self._watched(getattr(self.cxn, name), describe))

    def _watched(self, method, describe):
        def step(*args, **kwargs):
            self.doing = describe(*args, **kwargs)
            before = self.cxn.transport
            if before is not None and not before.is_active():
                before = None  # it died between steps: fabric reconnects for this one
            try:
                result = method(*args, **kwargs)
            except (*DROPPED, UnexpectedExit) as error:
                if _dropped(before or self.cxn.transport, error):
                    raise ConnectionLost(self.doing, error) from error
                raise
            # A channel closed under a command ends it with no exit status: -1, which
            # warn=True would hand back as an ordinary failure.
            if getattr(result, "exited", 0) == -1 and _dropped(before or self.cxn.transport):
                raise ConnectionLost(self.doing)
            return result

        return step

    def __exit__(self, kind, error, trace):
        if isinstance(error, DROPPED) and self.doing:
            if _dropped(self.cxn.transport, error):  # raised outside a watched step (cxn.sftp()...)
                error = ConnectionLost(self.doing, error)
        with contextlib.suppress(Exception):  # closing what is left of a dead connection must not hide why it died
            self.cxn.close()
        if isinstance(error, ConnectionLost):
            super().__exit__(kind, error, trace)
            cause = error.cause
            why = "" if cause is None else f" ({type(cause).__name__}{f': {cause}' if str(cause) else ''})"
            self.fail(f"the SSH connection was lost while {error.step}{why}\n"
                      f"  that step may be half done: every step checks what is there first,"
                      f" so re-running the task finishes it")
        if isinstance(error, UnexpectedExit):
            result = error.result
            output = (result.stdout + result.stderr).strip()[-3000:]
            super().__exit__(kind, error, trace)
            self.fail(f"`{result.command}` exited {result.exited}\n{output}")
        super().__exit__(kind, error, trace)


def _dropped(transport, error=None, patience=2.0):
    """True when `transport` (the connection a step used) is dead. paramiko's transport
    thread closes the channels first and marks itself inactive just after, so a step
    may fail a moment before: it gets `patience` seconds, when its failure looks like a
    dropped connection (no exit status, EOF, a closed socket)."""
    if transport is None or (isinstance(error, UnexpectedExit) and error.result.exited != -1):
        return False  # (a real exit status came back: the command ran to its end)
    deadline = time.monotonic() + patience
    while transport.is_active():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _short(command, limit=300):
    command = " ".join(str(command).split())
    return command if len(command) <= limit else command[:limit - 3] + "..."


def sh(cxn, command, **kwargs):
    """Run a command quietly; its output comes back (and in errors)."""
    return cxn.run(command, hide=True, **kwargs)


def home(cxn):
    if "home" not in cxn.facts:
        cxn.facts["home"] = PurePosixPath(sh(cxn, 'printf %s "$HOME"').stdout)
    return cxn.facts["home"]


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remote_sha256(cxn, *paths):
    """{path: sha256 or None} for files on the host."""
    quoted = " ".join(q(p) for p in paths)
    out = sh(cxn, f"sha256sum {quoted} 2>/dev/null; true").stdout
    found = {}
    for line in out.splitlines():
        digest, _, name = line.partition("  ")
        found[name] = digest
    return {str(p): found.get(str(p)) for p in paths}


def ensure_dir(cxn, path, sudo=False):
    (cxn.sudo if sudo else cxn.run)(f"mkdir -p {q(path)}", hide=True)


def ensure_file(cxn, source, remote, mode="644", sudo=False):
    """Make `remote` hold `source` (a local Path or bytes); True when it changed.

    The upload goes to a staging file first and is moved into place, so a
    reader never sees half a file.
    """
    data = source if isinstance(source, bytes) else None
    digest = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(source)
    if remote_sha256(cxn, remote)[str(remote)] == digest:
        return False
    remote = PurePosixPath(remote)
    stage = home(cxn) / STAGE / f"{remote.name}.{digest[:12]}"
    ensure_dir(cxn, stage.parent)
    cxn.put(io.BytesIO(data) if data is not None else str(source), str(stage))
    if remote_sha256(cxn, stage)[str(stage)] != digest:
        raise Exit(f"upload of {remote.name} to {cxn.host} arrived corrupted (checksum mismatch)")
    if sudo:
        cxn.sudo(f"install -D -m {mode} {q(stage)} {q(remote)}", hide=True)
        sh(cxn, f"rm -f {q(stage)}")
    else:
        sh(cxn, f"mkdir -p {q(remote.parent)} && chmod {mode} {q(stage)} && mv -f {q(stage)} {q(remote)}")
    return True


# On a fresh EC2 host cloud-init runs its own apt (package upgrades, the key); apt's lock
# is held until it is done. boot-finished is its last act, so a done host costs one `test`.
CLOUD_INIT = ("if [ -e /var/lib/cloud/instance/boot-finished ]; then echo finished;"
              " elif command -v cloud-init >/dev/null 2>&1; then"
              " timeout {limit} cloud-init status --wait >/dev/null 2>&1; echo waited;"
              " else echo none; fi")


def wait_for_cloud_init(cxn, report, limit=900):
    """Wait (once per connection) until cloud-init has finished first-boot setup, if it runs here."""
    if "cloud-init" in cxn.facts:
        return
    started = time.monotonic()
    found = cxn.facts["cloud-init"] = sh(cxn, CLOUD_INIT.format(limit=int(limit))).stdout.strip()
    if found == "waited":
        report.checked(f"cloud-init finished first-boot setup (waited {time.monotonic() - started:.0f}s)")
    elif found == "finished":
        report.ok("cloud-init finished first-boot setup")


# apt's locks, as apt names them when another apt, dpkg or unattended-upgrades holds one
# ("Could not get lock /var/lib/apt/lists/lock. It is held by process 1234 (apt-get)"). apt's
# DPkg::Lock::Timeout makes `install` wait for the dpkg locks, but nothing waits for the lists
# lock `update` takes: on a fresh Ubuntu instance apt-daily and unattended-upgrades hold it
# right after cloud-init. So apt is asked not to wait (timeout 0) and the wait is here, bounded
# (remote.apt_lock_timeout), with its progress shown, for every lock and every apt command.
LOCKED = re.compile(r"Could not get lock (/\S+?)\.?(?=\s|$)(?:\s+It is held by (process \d+(?: \([^)]*\))?))?")
APT = ("DEBIAN_FRONTEND=noninteractive timeout -k 30 {limit} apt-get -q -o DPkg::Lock::Timeout=0"
       " -o Acquire::Retries=3 -o Acquire::http::Timeout=60 -o Acquire::https::Timeout=60 {args}")


def apt_settings(cxn):
    """(lock wait, run time limit) in seconds: remote.apt_lock_timeout and remote.apt_timeout."""
    remote = cxn.config.get("remote") or {}
    return float(remote.get("apt_lock_timeout", 1200)), float(remote.get("apt_timeout", 1800))


def apt_get(cxn, report, args, poll=2.0, every=15.0):
    """`sudo apt-get <args>`, waiting while another process holds one of apt's locks: a line
    every `every` seconds says which lock and who holds it; past remote.apt_lock_timeout it
    fails, naming both. Each apt-get is itself bounded by remote.apt_timeout."""
    patience, limit = apt_settings(cxn)
    started, shown = time.monotonic(), None
    while True:
        result = cxn.sudo(f"sh -c {q(APT.format(limit=f'{limit:g}', args=args))}", hide=True, warn=True)
        if result.ok:
            return result
        if result.exited in (124, 137):  # timeout's TERM, or its KILL (-k) of an apt-get that ignored it
            report.fail(f"`apt-get {args}` did not finish within {limit:g}s (remote.apt_timeout)"
                        f"\n{(result.stdout + result.stderr).strip()[-2000:]}")
        locked = LOCKED.search(result.stdout + result.stderr)
        if result.exited != 100 or not locked:
            raise UnexpectedExit(result)
        lock, holder = locked[1], locked[2] or "another process"
        waited = time.monotonic() - started
        if waited >= patience:
            report.fail(f"apt's lock {lock} is still held by {holder} after {waited:.0f}s"
                        f" (remote.apt_lock_timeout = {patience:g}s): another apt, dpkg or unattended-upgrades"
                        f" runs on the host; see `ps -p <pid> -o pid,etime,args` there, wait for it"
                        f" or raise remote.apt_lock_timeout, and re-run")
        if shown is None or time.monotonic() - shown >= every:
            shown = time.monotonic()
            report.note(f"waiting for apt's lock {lock}, held by {holder}: {waited:.0f}s so far"
                        f" (gives up after {patience:g}s: remote.apt_lock_timeout)")
        time.sleep(max(0.0, min(poll, patience - waited)))


def ensure_apt(cxn, report, packages, cache_valid):
    """apt-get update when the cache is older than `cache_valid` seconds, then
    install whichever of `packages` are missing (each waiting for apt's locks)."""
    wait_for_cloud_init(cxn, report)
    stamp = PurePosixPath("/var/lib/apt/periodic/digits-update-success-stamp")
    age = sh(cxn, f"echo $(( $(date +%s) - $(stat -c %Y {q(stamp)} 2>/dev/null || echo 0) ))").stdout
    if int(age.strip()) > cache_valid:
        apt_get(cxn, report, "update")
        cxn.sudo(f"sh -c {q(f'mkdir -p {q(stamp.parent)} && touch {q(stamp)}')}", hide=True)
        report.changed("apt cache updated")
    else:
        report.ok(f"apt cache updated {int(age) // 60} min ago")
    names = " ".join(q(p) for p in packages)
    status = sh(cxn, f"dpkg-query -W -f='${{Package}} ${{Status}}\\n' {names} 2>/dev/null; true")
    installed = {line.split()[0] for line in status.stdout.splitlines() if line.endswith(" installed")}
    missing = [p for p in packages if p not in installed]
    if missing:
        apt_get(cxn, report, "install -y " + " ".join(q(p) for p in missing))
    report.either(bool(missing), f"apt packages {', '.join(missing or packages)}"
                  + (" installed" if missing else " present"))


def requirement_files(requirements):
    """A requirements file and those it includes with `-r` (beside it), that one first."""
    requirements = Path(requirements)
    found = [requirements]
    for line in requirements.read_text().splitlines():
        words = line.split()
        if len(words) > 1 and words[0] in ("-r", "--requirement"):
            found += requirement_files(requirements.parent / words[1])
    return found


# The lock of each top-level requirements file a host is set up with: its whole closure, pinned
# with hashes, for every Python and platform (requirements/lock.py writes them; README, "Locks").
REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements"
LOCKS = {"wm_requirements.txt": "worker.lock", "backend_requirements.txt": "backend.lock",
         "backend_keras_requirements.txt": "backend-keras.lock"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*(.+?))?\s*\\?$")
# What `python3 -m venv` puts in a venv itself (setuptools only before Python 3.12): left alone
# unless the lock pins it.
SEEDED = ("pip", "setuptools")
# The marker environment (PEP 508) of the host's Python, as packaging.markers.default_environment has it.
MARKER_ENVIRONMENT = (
    "import json,os,platform,sys\n"
    "i=sys.implementation; v=i.version\n"
    "iv='%d.%d.%d'%v[:3]+('' if v.releaselevel=='final' else v.releaselevel[0]+str(v.serial))\n"
    "print(json.dumps({'implementation_name':i.name,'implementation_version':iv,'os_name':os.name,"
    "'platform_machine':platform.machine(),'platform_release':platform.release(),"
    "'platform_system':platform.system(),'platform_version':platform.version(),"
    "'python_full_version':platform.python_version(),"
    "'platform_python_implementation':platform.python_implementation(),"
    "'python_version':'.'.join(platform.python_version_tuple()[:2]),'sys_platform':sys.platform}))\n")


def lock_of(requirements):
    """The lock file of a top-level requirements file (requirements/<role>.lock)."""
    name = Path(requirements).name
    if name not in LOCKS:
        raise Exit(f"no lock for {requirements}: add it to LOCKS in requirements/lock.py and tasks/remote.py,"
                   " then run `python3 requirements/lock.py`")
    return REQUIREMENTS / LOCKS[name]


def read_lock(path):
    """[(name, version, marker or None)] of a lock: `name==version ; marker \\` lines, each
    followed by its `--hash=` lines."""
    found = []
    for line in Path(path).read_text().splitlines():
        match = PIN.match(line)
        if match:
            found.append((match[1], match[2], match[3]))
    return found


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_for_host(path, env):
    """{canonical name: version} of the lock's lines that apply where `env` (a marker environment) holds."""
    from packaging.markers import Marker  # the operator's side only (requirements/dev.txt)

    return {canonical(name): version for name, version, marker in read_lock(path)
            if marker is None or Marker(marker).evaluate(env)}


def venv_packages(cxn, venv):
    """{canonical name: version} of what a venv holds (`pip freeze --all`)."""
    out = sh(cxn, f"{q(venv / 'bin/python')} -m pip freeze --all --disable-pip-version-check").stdout
    found = {}
    for line in out.splitlines():
        name, sep, version = line.partition("==")
        found[canonical(name.strip())] = version.strip() if sep else line.strip()
    return found


def sync_venv(cxn, report, venv, lock):
    """Make the venv hold exactly the lock's packages for its Python: what is not in the
    lock is removed (left from an older lock), and any difference left is an error."""
    env = json.loads(sh(cxn, f"{q(venv / 'bin/python')} -c {q(MARKER_ENVIRONMENT)}").stdout)
    wanted = lock_for_host(lock, env)
    installed = venv_packages(cxn, venv)
    extra = sorted(name for name in installed if name not in wanted and name not in SEEDED)
    if extra:
        sh(cxn, f"{q(venv / 'bin/python')} -m pip uninstall --yes --disable-pip-version-check "
                + " ".join(q(name) for name in extra))
        report.changed(f"removed from the venv, not in {lock.name}: {', '.join(extra)}")
        installed = venv_packages(cxn, venv)
    differ = {name: (installed.get(name), version) for name, version in wanted.items()
              if installed.get(name) != version}
    if differ:
        report.fail(f"the venv {venv} differs from {lock.name} after installing it (installed, locked): {differ}")
    return env, len(wanted)


PYTHON_VERSION = "import sys; print('%d.%d.%d' % sys.version_info[:3])"
OLDEST_PYTHON = (3, 11)  # what the locks are made for (requirements/lock.py)


def ensure_python_venv(cxn, report, venv):
    """A venv at `venv` on the host's own python3, made again when its Python is gone or is
    another release than the host's (a release upgrade under it)."""
    python = venv / "bin/python"
    host = sh(cxn, f"python3 -c {q(PYTHON_VERSION)}").stdout.strip()
    if tuple(int(part) for part in host.split(".")[:2]) < OLDEST_PYTHON:
        report.fail(f"the host's python3 is {host}: the locks need Python"
                    f" {'.'.join(map(str, OLDEST_PYTHON))} or later (Ubuntu 24.04 has 3.12)")
    found = sh(cxn, f"{q(python)} -c {q(PYTHON_VERSION)} 2>/dev/null; true").stdout.strip()
    if found.split(".")[:2] == host.split(".")[:2]:
        report.ok(f"venv {venv} (Python {found})")
        return
    # Only a venv is removed (pyvenv.cfg): a folder of something else is left as it is.
    sh(cxn, f"if [ -f {q(venv / 'pyvenv.cfg')} ]; then rm -rf {q(venv)}; fi && python3 -m venv {q(venv)}")
    report.changed(f"venv {venv} created (Python {host})" if not found else
                   f"venv {venv} made again for the host's Python {host} (it had {found})")


def ensure_venv(cxn, report, venv, requirements):
    """A venv at `venv` holding exactly the lock of `requirements` (its whole closure, pinned,
    every file checked against the lock's hashes) for the host's own Python; the lock's and
    the requirements' checksum is kept in the venv as a marker."""
    venv, files, lock = PurePosixPath(venv), requirement_files(requirements), lock_of(requirements)
    ensure_python_venv(cxn, report, venv)
    # One file: its own sha256, so markers written before includes were followed still hold.
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in [*files, lock])).hexdigest()
    marker = venv / ".requirements.sha256"
    if sh(cxn, f"cat {q(marker)} 2>/dev/null; true").stdout.strip() == digest:
        report.ok(f"{lock.name} installed ({files[0].name})")
        return False
    for path in [*files, lock]:  # side by side: what the venv was made from, readable on the host
        ensure_file(cxn, path, venv / path.name)
    started = time.monotonic()
    sh(cxn, f"rm -f {q(marker)} && {q(venv / 'bin/python')} -m pip install --no-input --disable-pip-version-check"
            f" --require-hashes -r {q(venv / lock.name)}")
    env, count = sync_venv(cxn, report, venv, lock)
    sh(cxn, f"echo {digest} > {q(marker)}")
    report.changed(f"{lock.name} installed ({files[0].name}): {count} packages as locked for Python"
                   f" {env['python_full_version']} on {env['platform_machine']} ({time.monotonic() - started:.0f}s)")
    return True


def has_systemd(cxn):
    """True when PID 1 on the host is systemd (the test for `sd_booted`)."""
    if "systemd" not in cxn.facts:
        cxn.facts["systemd"] = sh(cxn, "test -d /run/systemd/system", warn=True).ok
    return cxn.facts["systemd"]


def service(cxn, name, action):
    """start/stop/restart/reload/status a service through the host's init system."""
    if has_systemd(cxn):
        return cxn.sudo(f"systemctl {action} {q(name)}", hide=True, warn=action == "status")
    return cxn.sudo(f"service {q(name)} {action}", hide=True, warn=action == "status")


def service_log(cxn, name, logfile, lines=30):
    """The service's last lines, headed by the command that shows them: the journal
    where systemd runs it (its output goes there), else its log file."""
    if has_systemd(cxn):
        command = f"journalctl -u {q(name)} -n {lines} --no-pager"
        out = cxn.sudo(command, hide=True, warn=True)
    else:
        command = f"tail -n {lines} {q(logfile)}"
        out = sh(cxn, f"{command} 2>&1", warn=True)
    return f"{command}:\n{(out.stdout + out.stderr).strip() or '(empty)'}"


def ensure_running(cxn, report, name):
    """A service enabled at boot and running, whatever the host's init system."""
    if has_systemd(cxn):
        up = sh(cxn, f"systemctl is-enabled --quiet {q(name)} && systemctl is-active --quiet {q(name)}", warn=True).ok
        if not up:
            cxn.sudo(f"systemctl enable --now {q(name)}", hide=True)
    else:
        up = service(cxn, name, "status").ok
        if not up:
            service(cxn, name, "start")
    return report.either(not up, f"service {name} " + ("started" if not up else "running"))


def http_get(cxn, url, python="python3", attempts=1, delay=1.0):
    """GET a URL from the host itself (so it works in a private subnet too);
    returns (status, body) or (None, reason)."""
    code = ("import sys,urllib.request as u\n"
            "try:\n r=u.urlopen(sys.argv[1],timeout=5); print(r.status); print(r.read().decode())\n"
            "except Exception as e: print(0); print(e)\n")
    for attempt in range(attempts):
        out = sh(cxn, f"{q(python)} -c {q(code)} {q(url)}").stdout
        status, _, body = out.partition("\n")
        if status.strip() == "200":
            return 200, body
        if attempt + 1 < attempts:
            time.sleep(delay)
    return None, body.strip()


def fetch(url, headers=None, attempts=1, delay=1.0, timeout=5):
    """GET a URL from the operator's machine, as the user's browser reaches it:
    (status, headers, body), or (None, None, reason) when nothing answers."""
    if not str(url).startswith(("http://", "https://")):
        return None, None, f"not an http(s) URL: {url}"
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310  (scheme checked above)
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310  (http(s) only)
                return response.status, response.headers, response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as error:
            status, answer, reason = error.code, error.headers, error.read().decode("utf-8", "replace")
        except (OSError, ValueError) as error:  # refused, timed out, unreachable, bad URL
            status, answer, reason = None, None, str(getattr(error, "reason", None) or error)
        if attempt + 1 < attempts:
            time.sleep(delay)
    return status, answer, reason
