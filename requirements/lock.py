"""Refresh the lock files: the whole closure of each host role's requirements, pinned with hashes.

    python3 requirements/lock.py            # re-lock, keeping every pin that still fits
    python3 requirements/lock.py --upgrade  # re-lock to the newest releases the top-level pins allow

Each top-level file below names what a role asks for (mostly its direct packages, pinned);
its lock, beside this script, pins every package that installs with them, each with the
sha256 of every file PyPI has of that version. The setup tasks install a host's venv from
its lock alone (`pip install --require-hashes -r <lock>`), CI installs requirements/dev.lock:
so hosts, CI and the tests get the same versions of everything, bit for bit.

One lock serves every Python from 3.11 (this machine, CI, Debian 12's test hosts) to 3.12
(Ubuntu 24.04's hosts) and every platform (x86_64, and aarch64 for a Graviton back-end):
where the right version differs, the lock has one line per case with an environment marker
(`contourpy==1.3.3 ; python_full_version < '3.12'`). The resolver is uv's (`uv pip compile
--universal`, pinned in dev.txt), which evaluates markers for the target Pythons and
platforms rather than for the Python it runs under, as pip's own resolver would.
"""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "requirements"
PYTHON = "3.11"  # the oldest Python the locks serve (they hold for every later one)
# lock file (beside this script): its top-level requirements
LOCKS = {
    "worker.lock": "Files/wm_requirements.txt",
    "backend.lock": "Files/backend_requirements.txt",
    "backend-keras.lock": "Files/backend_keras_requirements.txt",  # backend.keras_fallback
    "dev.lock": "requirements/dev.txt",  # the operator's machine, CI and the tests
}
COMMAND = "python3 requirements/lock.py"
# Versions kept out of every lock, with why (uv ignores the upper bounds of Requires-Python).
CONSTRAINTS = HERE / "lock-constraints.txt"


def compile_command(top, lock, *extra):
    return [sys.executable, "-m", "uv", "pip", "compile", "--quiet", "--python", sys.executable, "--universal",
            "--python-version", PYTHON,
            "--generate-hashes", "--no-annotate", "--custom-compile-command", COMMAND, "--output-file", str(lock),
            "--constraints", str(CONSTRAINTS), *extra, str(top)]


def main(argv):
    extra = ["--upgrade"] if "--upgrade" in argv else []
    for name, top in LOCKS.items():
        subprocess.run(compile_command(ROOT / top, HERE / name, *extra), cwd=ROOT, check=True)  # noqa: S603
        print(f"{HERE.name}/{name}: {top} locked", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
