"""Shared fixtures live in tests/fixtures/, one module per real component."""
import sys

from tasks.config import ROOT

sys.path.insert(0, str(ROOT / "Files"))  # the deployable app is plain scripts: `import keras_flask`

pytest_plugins = [
    "tests.fixtures.model",  # a briefly trained model, made by the real notebook
    "tests.fixtures.web",  # the back-end under gunicorn, Files/ served, chromium
    "tests.fixtures.moto",  # a moto server on 127.0.0.1
    "tests.fixtures.aws_faults",  # a fault-injecting (throttling, kills) proxy in front of it
    "tests.fixtures.ssh_hosts",  # sshd on loopback, one Unix user per role
    "tests.fixtures.machines",  # systemd-nspawn machines in their own network namespaces
]


def pytest_collection_modifyitems(items):
    """The unit tier (tests/unit: pure helpers, no root, seconds) runs first: a broken helper
    fails in seconds, not after the machines tier."""
    items.sort(key=lambda item: not item.nodeid.startswith("tests/unit/"))
