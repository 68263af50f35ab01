"""Static checks: ruff over the project (ruff.toml), and no key, token or credential committed.

The secret scanner (tests/secrets_scan.py) is first shown to catch secrets planted in a
throwaway git repository, generated here at test time (never committed), then run over
this repository.
"""
import json
import secrets
import string
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests import secrets_scan
from tests.fixtures import ROOT

UPPER_DIGITS = string.ascii_uppercase + string.digits
ALNUM = string.ascii_letters + string.digits


def test_ruff_finds_nothing():
    ruff = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert ruff.returncode == 0, f"`ruff check .` (ruff.toml):\n{ruff.stdout}{ruff.stderr}"


def test_no_secret_is_committed():
    findings = secrets_scan.scan(ROOT)
    assert not findings, "secrets in the repository (remove them, and rotate them):\n" + "\n".join(map(str, findings))


def random_text(alphabet, length):
    return "".join(secrets.choice(alphabet) for _ in range(length))


def aws_secret_key():
    """40 base64 characters, both cases, like AWS's."""
    alphabets = (string.ascii_lowercase, string.ascii_uppercase, ALNUM + "/+", string.digits)
    return "".join(random_text(alphabet, 10) for alphabet in alphabets)


FORMATS = {"pkcs8": serialization.PrivateFormat.PKCS8, "traditional": serialization.PrivateFormat.TraditionalOpenSSL,
           "openssh": serialization.PrivateFormat.OpenSSH}  # fmt: skip


def pem(key, key_format, encryption=None):
    """The private key as text, in the given format: what a key file holds."""
    encryption = encryption or serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, FORMATS[key_format], encryption).decode()


def planted():
    """{path: (content, the kinds the scanner must report there)}, every secret made now."""
    rsa_key = pem(rsa.generate_private_key(public_exponent=65537, key_size=2048), "traditional")
    ec_key = pem(ec.generate_private_key(ec.SECP256R1()), "traditional")
    ed_key = ed25519.Ed25519PrivateKey.generate()
    key_id, session_id = "AKIA" + random_text(UPPER_DIGITS, 16), "ASIA" + random_text(UPPER_DIGITS, 16)
    secret_key, other_secret_key = aws_secret_key(), aws_secret_key()
    password = random_text(ALNUM, 14)
    return {
        "notes/rsa.txt": (f"the old deploy key:\n{rsa_key}", {"private key"}),
        "notes/ec.md": (f"```\n{ec_key}```\n", {"private key"}),
        "notes/openssh": (pem(ed_key, "openssh"), {"private key"}),
        "notes/pkcs8-encrypted": (pem(ed_key, "pkcs8", serialization.BestAvailableEncryption(b"pass phrase")),
                                  {"private key"}),
        "service-account.json": (json.dumps({"type": "service_account", "private_key": pem(ed_key, "pkcs8")}),
                                 {"private key"}),
        "tasks/aws.py": (f'AWS_ACCESS_KEY_ID = "{key_id}"\nAWS_SECRET_ACCESS_KEY = "{secret_key}"\n',
                         {"AWS access key id", "AWS secret access key"}),
        "tests/session.json": (json.dumps({"Credentials": {"AccessKeyId": session_id,
                                                           "SecretAccessKey": other_secret_key}}),
                               {"AWS access key id", "AWS secret access key"}),
        "aws/credentials.ini": (f"[default]\naws_access_key_id={key_id}\naws_secret_access_key = {secret_key}\n",
                                {"AWS access key id", "AWS secret access key"}),
        "ci/github.sh": (f"export GH_TOKEN={'ghp_' + random_text(ALNUM, 36)}\n", {"GitHub token"}),
        "ci/pat.txt": ("github_pat_" + random_text(ALNUM, 22) + "_" + random_text(ALNUM, 59), {"GitHub token"}),
        "ci/slack.py": (f'client = WebClient("xoxb-{random_text(string.digits, 12)}-{random_text(ALNUM, 24)}")\n',
                        {"Slack token"}),
        "app/settings.py": (f'DB_PASSWORD = "{password}"\n', {"literal assigned to DB_PASSWORD"}),
        "app/check.py": (f"if password == '{password}':\n    pass\n", {"literal assigned to password"}),
        "notebook.ipynb": (json.dumps({"cells": [{"cell_type": "code", "source": [f'api_key = "{password}"\n']}]}),
                           {"literal assigned to api_key"}),
        "app/db.py": (f'URL = "postgresql://app:{password}@db.internal:5432/app"\n', {"password in a URL"}),
        "fabric.yaml": (f"connect_kwargs:\n  password: {password}\n", {"literal assigned to password"}),
        "keys/deploy.pem": ("(the name alone is enough)\n", {"key file (.pem)"}),
        "keys/id_ed25519": (pem(ed_key, "openssh"), {"key file (id_ed25519)", "private key"}),
    }


def git(repo, *args):
    subprocess.run(["git", "-c", f"safe.directory={repo}", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def repository(tmp_path):
    """A git repository holding every planted secret: added, one force-added though ignored, fabric.yaml
    left untracked (but not ignored); and a secret in an ignored folder, which is not reported."""
    files = planted()
    for path, (content, _) in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(content)
    (tmp_path / ".gitignore").write_text("*.pem\n/ignored/\n")
    (tmp_path / "ignored").mkdir()
    (tmp_path / "ignored" / "local.env.py").write_text(files["tasks/aws.py"][0])  # never committed: not reported
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-f", "keys/deploy.pem")  # committed despite .gitignore
    apart = ("keys/deploy.pem", "fabric.yaml")  # force-added above; left untracked
    git(tmp_path, "add", *(path for path in files if path not in apart))
    return tmp_path, files


def test_the_scanner_catches_planted_secrets(repository):
    root, files = repository
    found = {}
    for finding in secrets_scan.scan(root):
        found.setdefault(finding.path, set()).add(finding.kind)
    for path, (_, kinds) in files.items():
        assert found.get(path, set()) == kinds, path
    assert set(found) == set(files), "reported only where something was planted (not ignored/, not .gitignore)"


def test_the_scanner_exits_1_and_does_not_print_the_secrets(repository, capsys):
    root, files = repository
    assert secrets_scan.main([str(root)]) == 1
    out = capsys.readouterr().out
    assert "tasks/aws.py:1: AWS access key id (AKIA…, 20 chars)" in out
    password = files["app/settings.py"][0].split('"')[1]
    assert password not in out


def test_the_scanner_works_without_git(tmp_path):
    """Not a checkout (an exported tree): every file but what the root .gitignore plainly names."""
    leaked = 'token = "' + random_text(ALNUM, 30) + '"\n'
    for path in ("old.py", "sub/.keys/deploy.py", ".keys/deploy.py", "artifacts/run.py", "a/b.pyc"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(leaked)
    (tmp_path / ".gitignore").write_text("# local only\n/.keys/\n/artifacts/\n*.pyc\n")
    assert [(f.path, f.kind) for f in secrets_scan.scan(tmp_path)] == [
        ("old.py", "literal assigned to token"), ("sub/.keys/deploy.py", "literal assigned to token")]


@pytest.mark.parametrize(
    "text",
    [
        '"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing"',  # moto
        "export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing",  # moto, in the README
        "aws_access_key_id = AKIAIOSFODNN7EXAMPLE\naws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        'assert key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")',  # a header, no key
        'password = "<password>"\ntoken = "${GITHUB_TOKEN}"\napi_key = "{api_key}"\nsecret = "changeme"',
        'api_key = os.environ["API_KEY"]\nsecret_name = "digits-backend-secret"\nTOKEN_FILE = "/var/run/token"',
        'IMDS_V2 = {"HttpTokens": "required"}\nprint(f"http://localhost:8888/tree?token={token}")',
        'url = "https://user:${PASSWORD}@example.com/"\nssh = "ssh://git@github.com/org/repo"',
        'password = "' + "hunter2hunter2" + '"  # secrets-scan: allow (a test fixture)',
        "sha = 'aws_secret_access_key " + "0123456789abcdef0123456789abcdef01234567'",  # a digest, not a key
    ],
    ids=["moto", "moto-shell", "aws-docs", "header-only", "placeholders", "names", "not-values", "url-placeholder",
         "marker", "hex-digest"],
)
def test_the_scanner_allows_fakes_and_placeholders(text):
    assert secrets_scan.scan_text("sample.sh", text + "\n") == []  # .sh: unquoted assignments are checked too
