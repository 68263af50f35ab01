"""The requirement files, offline: every lock is the script's and hashed, each role installs from
its lock, and no top-level pin was changed without re-locking."""
import re
import sys

import pytest

from tasks import backend, remote
from tasks.config import FILES, ROOT
from tests.fixtures import context
from tests.fixtures.locks import WHERE, environment, pinned, top_level

sys.path.insert(0, str(ROOT / "requirements"))
import lock


def test_every_lock_is_made_by_the_script_and_hashed():
    assert sorted(path.name for path in (ROOT / "requirements").glob("*.lock")) == sorted(lock.LOCKS)
    for name in lock.LOCKS:
        text = (ROOT / "requirements" / name).read_text()
        assert f"#    {lock.COMMAND}\n" in text, f"{name}: not made by {lock.COMMAND}"
        entries = remote.read_lock(ROOT / "requirements" / name)
        assert len(entries) > 10, name
        # Every requirement line is `name==version`, each followed by its hashes: pip's hash-checking mode.
        blocks = re.split(r"\n(?=\S)", text.split("\n", 2)[2].strip())
        assert len(blocks) == len(entries), name
        for block in blocks:
            assert re.search(r"^\S+==\S+", block) and "--hash=sha256:" in block, f"{name}: {block[:200]}"


def test_the_setup_tasks_install_from_the_locks():
    """Each top-level file a host is set up with has its lock, the one requirements/lock.py writes."""
    for requirements in (FILES / "wm_requirements.txt", FILES / "backend_requirements.txt",
                         FILES / "backend_keras_requirements.txt"):
        path = remote.lock_of(requirements)
        assert lock.LOCKS[path.name] == str(requirements.relative_to(ROOT)), path
    c = context(backend={"keras_fallback": True})
    assert remote.lock_of(backend.requirements(c)).name == "backend-keras.lock"


@pytest.mark.parametrize("name", sorted(lock.LOCKS))
def test_each_lock_pins_its_top_level_requirements_as_given(name):
    """Offline: a pin changed in a top-level file without re-locking is caught here."""
    top = top_level(ROOT / lock.LOCKS[name])
    for target in WHERE[name]:
        locked = pinned(ROOT / "requirements" / name, environment(target))
        differ = {package: (version, locked.get(package)) for package, version in top.items()
                  if locked.get(package) != version}
        assert not differ, (f"{name} ({target}): top-level pin vs lock {differ}: run `{lock.COMMAND}`"
                            " after changing a requirements file")
