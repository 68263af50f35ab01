"""The lock files (requirements/*.lock, made by requirements/lock.py): each pins the whole
closure of its top-level requirements, for every Python and platform a host or CI runs, with
wheels there (aarch64 included, for a Graviton back-end); and a host's venv after setup holds
exactly its lock, nothing more, nothing else.

The closure is checked with uv (pinned in requirements/dev.txt), which resolves for a target
Python and platform other than its own; it reads PyPI's metadata, not whole wheels.
"""
import json
import os
import pwd
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.utils import canonicalize_name

from tasks import backend, remote, worker
from tasks.config import FILES, ROOT
from tests.fixtures import context, free_port
from tests.fixtures.ssh_hosts import PERSIST, captured

sys.path.insert(0, str(ROOT / "requirements"))
import lock  # requirements/lock.py: not a package

from tests.fixtures.locks import TARGETS, WHERE, environment, pinned

CASES = [(name, target) for name, targets in WHERE.items() for target in targets]


@pytest.mark.parametrize(("name", "target"), CASES)
def test_each_lock_covers_the_whole_closure(name, target):
    """Resolving the top-level file with the lock as constraints, for the target's Python and
    platform, and from wheels only (a host builds nothing): every package resolved is pinned in
    the lock, at that version, and every pin of the lock that applies there is resolved."""
    version, _, platform = TARGETS[target]
    lock_file = ROOT / "requirements" / name
    resolved = subprocess.run(
        # --python: this one builds nothing here (wheels only); else uv looks for a 3.12 to download.
        [sys.executable, "-m", "uv", "pip", "compile", "--quiet", "--python", sys.executable, "--no-header",
         "--no-annotate", "--python-version",
         version, "--python-platform", platform, "--only-binary", ":all:", "--constraint", str(lock_file),
         str(ROOT / lock.LOCKS[name])], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert resolved.returncode == 0, f"{name} does not resolve on {target}:\n{resolved.stderr[-3000:]}"
    got = {}
    for line in resolved.stdout.splitlines():
        if line.strip() and not line.startswith("#"):
            package, _, pin = line.partition("==")
            got[canonicalize_name(package.split("[")[0])] = pin.split(";")[0].strip()
    expected = pinned(lock_file, environment(target))
    unpinned = {package: pin for package, pin in got.items() if expected.get(package) != pin}
    assert not unpinned, f"{name} ({target}): resolved but not pinned so in the lock: {unpinned}"
    assert got == expected, f"{name} ({target}): pinned but not needed: {set(expected) - set(got)}"


def platforms(machine, newest=39):
    """pip's --platform for every manylinux a glibc 2.`newest` runs (Ubuntu 24.04: 2.39).
    pip takes `manylinux2014_aarch64` alone literally: numpy 2.4's aarch64 wheels are
    manylinux_2_28, so that tag alone finds none."""
    return [f"manylinux_2_{minor}_{machine}" for minor in range(newest, 16, -1)] + [f"manylinux2014_{machine}"]


def for_target(lock_file, target, out):
    """The lines of a lock that apply on `target`, markers evaluated, hashes kept: what pip
    running there would read (pip evaluates markers for the Python it runs under, not for
    --python-version and --platform)."""
    env, kept = environment(target), []
    for block in re.split(r"\n(?=\S)", lock_file.read_text().split("\n", 2)[2].strip()):
        head, _, hashes = block.partition("\\\n")
        requirement, _, marker = head.partition(";")
        if not marker.strip() or Marker(marker.strip().rstrip("\\").strip()).evaluate(env):
            kept.append(f"{requirement.strip()} \\\n{hashes}")
    out.write_text("\n".join(kept) + "\n")
    return out


# Ubuntu 24.04's pip on each EC2 host: the light back-end on x86_64 and on a Graviton (t4g),
# the Keras fallback and the worker on x86_64 (m5, t2). Debian 12's (3.11) is the test hosts'.
DOWNLOADS = [("backend.lock", "ubuntu24.04-aarch64"), ("backend.lock", "ubuntu24.04"),
             ("backend-keras.lock", "ubuntu24.04"), ("worker.lock", "ubuntu24.04")]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "target"), DOWNLOADS)
def test_every_pin_has_a_wheel_on_ubuntu_24_04(name, target, tmp_path):
    """pip, as on an Ubuntu 24.04 host (Python 3.12; aarch64 for a Graviton t4g.micro back-end),
    finds a wheel of every pin of the lock (nothing to build on a host), whose file matches the
    lock's hashes (pip's hash-checking mode), and whose Requires-Python admits 3.12 (which uv,
    the locks' resolver, does not check). The four download about 1 GB: 90 s here."""
    version, machine, _ = TARGETS[target]
    abi = "cp" + "".join(version.split(".")[:2])
    cache = PERSIST / "pip" / "download"
    cache.mkdir(parents=True, exist_ok=True)
    requirements = for_target(ROOT / "requirements" / name, target, tmp_path / "lock.txt")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--python-version", ".".join(version.split(".")[:2]), "--implementation", "cp",
               "--abi", abi, "--abi", "abi3", "--abi", "none", *(f"--platform={tag}" for tag in platforms(machine)),
               "--cache-dir", str(cache), "-d", str(tmp_path / "wheels"), "-r", str(requirements)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    wheels = sorted(path.name for path in (tmp_path / "wheels").iterdir())
    expected = pinned(ROOT / "requirements" / name, environment(target))
    assert len(wheels) == len(expected) and all(wheel.endswith(".whl") for wheel in wheels), wheels
    assert all(machine in wheel or wheel.endswith("-any.whl") for wheel in wheels), wheels
    if name == "backend.lock":
        assert any(wheel.startswith("ai_edge_litert-2.3.0-") and machine in wheel for wheel in wheels), wheels


def venv_freeze(python):
    """{name: version} of everything installed in a venv, pip itself aside."""
    out = subprocess.run([python, "-m", "pip", "freeze", "--all", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        package, _, version = line.partition("==")
        assert version, f"not installed from an index at a pinned version: {line}"
        found[canonicalize_name(package)] = version
    found.pop("pip")
    return found


def host_environment(python):
    code = ("import json,os,platform,sys;print(json.dumps({'platform_machine':platform.machine(),"
            "'python_full_version':platform.python_version()}))")
    import json

    facts = json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)
    env = environment("debian12")
    env.update(facts, python_version=".".join(facts["python_full_version"].split(".")[:2]))
    return env


@pytest.mark.slow
@pytest.mark.parametrize("role", ["backend", "worker"])
def test_a_hosts_venv_after_setup_is_exactly_its_lock(ssh_hosts, role):
    """After setup-<role> on the test host, `pip freeze --all` of its venv is its lock's lines
    for that host's Python, version for version: nothing missing, nothing more (but pip, and the
    setuptools `python3 -m venv` puts in on Python 3.11 where the lock has none)."""
    port = free_port("0.0.0.0")
    c = context(**ssh_hosts.config(backend={"port": port, "service": "digits-backend-test-locks"},
                                   worker={"jupyter_port": free_port()}))
    task = backend.setup_backend if role == "backend" else worker.setup_worker
    result, printed = captured(task, c)
    home = Path(pwd.getpwnam(role).pw_dir)
    venv = home / ("digits-backend/venv" if role == "backend" else c.config.worker.venv)
    requirements = FILES / ("backend_requirements.txt" if role == "backend" else "wm_requirements.txt")
    lock_file = remote.lock_of(requirements)
    expected = pinned(lock_file, host_environment(str(venv / "bin/python")))
    installed = venv_freeze(str(venv / "bin/python"))
    if "setuptools" not in expected:
        installed.pop("setuptools", None)
    missing = {p: v for p, v in expected.items() if installed.get(p) != v}
    extra = {p: v for p, v in installed.items() if p not in expected}
    assert not missing and not extra, f"{venv} vs {lock_file.name}: differ {missing}, not in the lock {extra}"
    assert os.access(venv / lock_file.name, os.R_OK), "the lock is kept in the venv, beside the marker"
    assert f"{lock_file.name} " in printed, printed


def python_3_12():
    """A Python 3.12 on this machine (Ubuntu 24.04's version), or None."""
    for candidate in ("/usr/bin/python3.12", *sorted(Path("/root/.pyenv/versions").glob("3.12.*/bin/python3.12"))):
        if Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["backend.lock", "worker.lock"])
def test_pip_on_python_3_12_installs_exactly_the_lock(name, tmp_path):
    """What the setup task runs on an Ubuntu 24.04 host, on a real Python 3.12: in a new venv,
    `pip install --require-hashes -r <lock>` would install exactly the lock's lines for 3.12.
    pip resolves and checks every hash for real; `--dry-run --report` only spares unpacking
    TensorFlow (minutes), which the setup tests on the hosts and machines do anyway."""
    python = python_3_12()
    if python is None:
        pytest.skip("no Python 3.12 on this machine")
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    cache = PERSIST / "pip" / "py312"
    cache.mkdir(parents=True, exist_ok=True)
    report = tmp_path / "report.json"
    done = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           "--dry-run", "--report", str(report), "--cache-dir", str(cache), "--require-hashes",
                           "-r", str(ROOT / "requirements" / name)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = pinned(ROOT / "requirements" / name, host_environment(str(venv / "bin/python")))
    installed = {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
                 for item in json.loads(report.read_text())["install"]}
    differ = {package: (installed.get(package), pin) for package, pin in expected.items()
              if installed.get(package) != pin}
    assert installed == expected, f"differ (installed, locked) {differ}, extra {set(installed) - set(expected)}"


@pytest.mark.slow
def test_a_venv_that_drifted_is_brought_back_to_the_lock(ssh_hosts):
    """A host set up from an older lock (or by hand): a package the lock does not name, another
    at a version it does not pin. Once the marker no longer matches, setup-backend makes the
    venv its lock again, and says what it removed."""
    c = context(**ssh_hosts.config(backend={"port": free_port("0.0.0.0"), "service": "digits-backend-test-locks"}))
    backend.setup_backend(c)
    venv = Path(pwd.getpwnam("backend").pw_dir) / "digits-backend/venv"
    subprocess.run(["sudo", "-u", "backend", "-H", str(venv / "bin/python"), "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", "six==1.17.0", "blinker==1.8.2"], check=True, capture_output=True)
    (venv / ".requirements.sha256").write_text("from an older lock\n")
    result, printed = captured(backend.setup_backend, c)
    assert "  changed: removed from the venv, not in backend.lock: six\n" in printed, printed
    expected = pinned(remote.lock_of(FILES / "backend_requirements.txt"), host_environment(str(venv / "bin/python")))
    installed = venv_freeze(str(venv / "bin/python"))
    installed.pop("setuptools", None)
    assert installed == expected and installed["blinker"] == "1.9.0", installed


@pytest.mark.slow
def test_a_venv_of_another_python_is_made_again(ssh_hosts):
    """A venv whose Python is another release than the host's python3 (a release upgrade under
    it: Ubuntu 22.04's 3.10 venv on 24.04) is made again on the host's Python, then installed."""
    c = context(**ssh_hosts.config())
    entry = pwd.getpwnam("backend")
    venv = Path(entry.pw_dir) / "digits-locks-test-venv"
    subprocess.run(["rm", "-rf", str(venv)], check=True)
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/python").write_text("#!/bin/sh\necho 3.10.12\n")
    (venv / "bin/python").chmod(0o755)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\nversion = 3.10.12\n")
    for path in (venv, venv / "bin", venv / "bin/python", venv / "pyvenv.cfg"):
        os.chown(path, entry.pw_uid, entry.pw_gid)

    def setup():
        with remote.Report(c, "setup-backend", "backend") as r:
            remote.ensure_venv(r.cxn, r, venv, FILES / "backend_requirements.txt")
        return r.result

    try:
        _, printed = captured(setup)
        host = subprocess.run(["/usr/bin/python3", "-c", remote.PYTHON_VERSION],  # the test hosts' python3
                              capture_output=True, text=True).stdout.strip()
        assert f"  changed: venv {venv} made again for the host's Python {host} (it had 3.10.12)\n" in printed, printed
        assert venv_freeze(str(venv / "bin/python"))["numpy"] == "2.4.6"
        _, printed = captured(setup)
        assert f"  ok: venv {venv} (Python {host})\n" in printed and "  ok: backend.lock installed" in printed, printed
    finally:
        subprocess.run(["rm", "-rf", str(venv)], check=True)
