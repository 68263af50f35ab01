"""Idempotent steps on a remote host, and their Ansible-like ok/changed report.

Every step compares what is there with what should be there first, acts only
on a difference, and says which: `ok` (already right), `changed` (made right),
`checked` (a live check passed). All transfers go through SFTP.
"""
import hashlib
import io
import re
import shlex
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from invoke.exceptions import Exit, UnexpectedExit

from .hosts import address, connect, label
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
        raise Exit(f"bad config: {setting} = {value!r}: use only letters, digits, '.', '_' and '-'"
                   " (it names files and a service on the host)")
    return value


class Report(Tally):
    """One task on one host: its connection, and the report of its steps; a failed
    command becomes an error naming the host, the command, its output and the task
    to re-run."""

    def __init__(self, c, task, role):
        user, host, port, _ = address(c, role)
        super().__init__(task, role, f"{user}@{host}:{port}")  # the header first, then connecting's notes
        self.cxn = connect(c, role)

    def fail(self, message):
        raise Exit(f"FAILED [{self.task}] on the {label(self.cxn)}: {message}\n  re-run: fab {self.task}")

    def __exit__(self, kind, error, trace):
        self.cxn.close()
        if isinstance(error, UnexpectedExit):
            result = error.result
            output = (result.stdout + result.stderr).strip()[-3000:]
            super().__exit__(kind, error, trace)
            self.fail(f"`{result.command}` exited {result.exited}\n{output}")
        super().__exit__(kind, error, trace)


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


def ensure_apt(cxn, report, packages, cache_valid):
    """apt-get update when the cache is older than `cache_valid` seconds, then
    install whichever of `packages` are missing."""
    wait_for_cloud_init(cxn, report)
    stamp = PurePosixPath("/var/lib/apt/periodic/digits-update-success-stamp")
    age = sh(cxn, f"echo $(( $(date +%s) - $(stat -c %Y {q(stamp)} 2>/dev/null || echo 0) ))").stdout
    apt = "DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300"
    if int(age.strip()) > cache_valid:
        cxn.sudo(f"sh -c {q(f'{apt} update && mkdir -p {q(stamp.parent)} && touch {q(stamp)}')}", hide=True)
        report.changed("apt cache updated")
    else:
        report.ok(f"apt cache updated {int(age) // 60} min ago")
    names = " ".join(q(p) for p in packages)
    status = sh(cxn, f"dpkg-query -W -f='${{Package}} ${{Status}}\\n' {names} 2>/dev/null; true")
    installed = {line.split()[0] for line in status.stdout.splitlines() if line.endswith(" installed")}
    missing = [p for p in packages if p not in installed]
    if missing:
        cxn.sudo(f"sh -c {q(f'{apt} install -y ' + ' '.join(q(p) for p in missing))}", hide=True)
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


def ensure_venv(cxn, report, venv, requirements):
    """A venv at `venv` with `requirements` (a local file, and its `-r` includes)
    installed; their checksum is kept in the venv as a marker."""
    venv, files = PurePosixPath(venv), requirement_files(requirements)
    if sh(cxn, f"test -x {q(venv / 'bin/python')}", warn=True).ok:
        report.ok(f"venv {venv}")
    else:
        sh(cxn, f"python3 -m venv {q(venv)}")
        report.changed(f"venv {venv} created")
    # One file: its own sha256, so markers written before includes were followed still hold.
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in files)).hexdigest()
    marker = venv / ".requirements.sha256"
    if sh(cxn, f"cat {q(marker)} 2>/dev/null; true").stdout.strip() == digest:
        report.ok(f"{files[0].name} installed")
        return False
    for path in files:  # side by side, so that `-r other.txt` resolves on the host too
        ensure_file(cxn, path, venv / path.name)
    started = time.monotonic()
    sh(cxn, f"{q(venv / 'bin/pip')} install --no-input --disable-pip-version-check -r {q(venv / files[0].name)}"
            f" && echo {digest} > {q(marker)}")
    report.changed(f"{files[0].name} installed ({time.monotonic() - started:.0f}s)")
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
    request = urllib.request.Request(url, headers=headers or {})
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.headers, response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as error:
            status, answer, reason = error.code, error.headers, error.read().decode("utf-8", "replace")
        except (OSError, ValueError) as error:  # refused, timed out, unreachable, bad URL
            status, answer, reason = None, None, str(getattr(error, "reason", None) or error)
        if attempt + 1 < attempts:
            time.sleep(delay)
    return status, answer, reason
