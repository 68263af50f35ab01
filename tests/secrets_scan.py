"""No committed secrets: scan every file git tracks, and the untracked files it does not ignore.

    python3 tests/secrets_scan.py [ROOT]      # exit 1 and one line per finding (values masked)

Run in CI by tests/test_static.py. It looks for private keys (PEM, OpenSSH, PGP and PuTTY
blocks with a body, and key files by name: *.pem, *.key, id_rsa, ...), AWS access key ids
and secret keys, service tokens (GitHub, GitLab, Slack, Google, Stripe, PyPI, npm, OpenAI,
Anthropic), passwords in URLs, and password/secret/token assignments with a literal value.
Allowed: moto's fake credentials ("testing"), AWS's documented example keys, placeholders
(<...>, ${...}, {...}, xxx, changeme, ...), and a line marked `secrets-scan: allow`.
Standard library only; the working tree's content is scanned, not the history.
"""
import fnmatch
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

ALLOW_MARKER = "secrets-scan: allow"
# moto's fake credentials (tests/fixtures/moto.py, README) and AWS's documentation examples.
ALLOWED_VALUES = {"testing", "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}
PLACEHOLDER = re.compile(
    r"""^(?:<[^>]*>|\$\{?[\w.-]*\}?|\{[^}]*\}|%\(\w+\)s|%s|[x*.•…-]+|\.\.\.|
         (?:change|replace)[_-]?me|example|examplekey|dummy|fake|placeholder|redacted|secret|password|
         none|null|true|false|required|optional|enabled|disabled|
         your[_-]?\w+|(?-i:[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+))$""",  # the last: an environment variable's name
    re.I | re.X,
)
# Names that hold a secret only by name (a file of one, the variable naming one, a header...).
NOT_A_SECRET_NAME = re.compile(
    r"(?:file|path|dir|url|uri|name|env|var|header|field|type|kind|prefix|suffix|len|length|count|"
    r"timeout|pattern|regex|format|fmt|id|arn|tokens)$",
    re.I,
)

KEY_FILE_SUFFIXES = {".pem", ".key", ".p12", ".pfx", ".jks", ".keystore", ".ppk"}
KEY_FILE_NAMES = {"id_rsa", "id_dsa", "id_ecdsa", "id_ed25519", ".netrc", ".pgpass", ".htpasswd", ".git-credentials"}
# Folders that ignore themselves (their own .gitignore) or are git's: skipped when walking without git.
SELF_IGNORED = {".git", ".ruff_cache", ".pytest_cache", ".mypy_cache", "__pycache__", ".venv"}
CONFIG_SUFFIXES = {".env", ".ini", ".cfg", ".conf", ".yaml", ".yml", ".toml", ".properties", ".sh"}

NL = r"(?:\s|\\[rn])+"  # a newline, or one escaped in a JSON or Python string
TOKENS = {
    "private key": re.compile(
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----" + NL
        + r"(?:[A-Za-z-]+:[^\n\\]*" + NL + r")*[A-Za-z0-9+/=]{20,}"
    ),
    "PuTTY private key": re.compile(r"Private-Lines: \d+" + NL + r"[A-Za-z0-9+/=]{20,}"),
    "AWS access key id": re.compile(r"(?<![A-Za-z0-9])((?:AKIA|ASIA)[A-Z0-9]{16})(?![A-Za-z0-9])"),
    "AWS secret access key": re.compile(
        r"(?i:aws.?secret|secret.?access.?key)[^\n]{0,40}?(?<![A-Za-z0-9/+=])([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"
    ),
    "GitHub token": re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b"),
    "GitLab token": re.compile(r"\b(glpat-[A-Za-z0-9_-]{20,})"),
    "Slack token": re.compile(r"\b(xox[abposr]-[A-Za-z0-9-]{10,})"),
    "Slack webhook": re.compile(r"(https://hooks\.slack\.com/services/T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]{16,})"),
    "Google API key": re.compile(r"\b(AIza[0-9A-Za-z_-]{35})"),
    "Stripe key": re.compile(r"\b((?:sk|rk)_live_[0-9A-Za-z]{20,})"),
    "PyPI token": re.compile(r"\b(pypi-AgEIcHlwaS5vcmc[0-9A-Za-z_-]{50,})"),
    "npm token": re.compile(r"\b(npm_[A-Za-z0-9]{36})\b"),
    "OpenAI/Anthropic key": re.compile(r"\b(sk-(?:proj|ant-api\d\d|ant-admin\d\d)-[A-Za-z0-9_-]{40,})"),
    "password in a URL": re.compile(r"(?<![a-z0-9+.-])[a-z][a-z0-9+.-]*://[^\s:/@'\"<>]+:([^\s/@'\"<>]{3,})@[\w.-]"),
}
SENSITIVE_WORDS = r"(?:password|passwd|passphrase|secret|token|api_?key|apikey|access_?key|private_?key|credentials?)"
# name = "literal" (also name: 'literal', name == "literal", "name": "literal", escaped quotes in JSON).
QUOTED_ASSIGNMENT = re.compile(
    r"(?i)(?<![A-Za-z0-9_])([A-Za-z0-9_]*" + SENSITIVE_WORDS + r"[A-Za-z0-9_]*)"
    r"\\?[\"']?\s*(?:==|=>|:=|[:=])\s*[bru]?\\?[\"']([^\"'\s\\]{6,})\\?[\"']"
)
# name=value / name: value in configuration files and shell scripts, unquoted.
CONFIG_ASSIGNMENT = re.compile(
    r"(?im)^[ \t]*(?:export[ \t]+)?([A-Za-z0-9_.-]*" + SENSITIVE_WORDS + r"[A-Za-z0-9_.-]*)[ \t]*[:=][ \t]*"
    r"([^\s\"'#()\[\]{}$<>`][^\s\"'#()\[\]{}$<>`]{5,})[ \t]*(?:#.*)?$"  # a value, not an expression
)


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    kind: str
    value: str

    def __str__(self):
        shown = self.value[:4] + "…" if len(self.value) > 4 else "…"
        return f"{self.path}:{self.line}: {self.kind} ({shown}, {len(self.value)} chars)"


def candidate_files(root):
    """Paths (relative, POSIX) that git tracks or would add; every file when root is no git checkout."""
    try:
        listing = subprocess.run(
            ["git", "-c", f"safe.directory={root}", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root, capture_output=True, check=True,
        ).stdout  # fmt: skip
        return sorted({name for name in listing.decode().split("\0") if name})
    except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout: walk, minus the simple .gitignore
        ignored = gitignore(root)
        found = []
        for folder, dirs, files in os.walk(root):
            here = Path(folder).relative_to(root).as_posix()
            prefix = "" if here == "." else here + "/"
            dirs[:] = [d for d in dirs if d not in SELF_IGNORED and not ignored(prefix + d)]
            found += [prefix + name for name in files if not ignored(prefix + name)]
        return sorted(found)


def gitignore(root):
    """A predicate for the root .gitignore's plain patterns (no negation, no nested .gitignore files)."""
    path = Path(root) / ".gitignore"
    lines = path.read_text().splitlines() if path.is_file() else []
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith(("#", "!"))]

    def ignored(relative):
        parts = relative.split("/")
        for pattern in patterns:
            bare = pattern.strip("/")
            if "/" in pattern.rstrip("/"):  # anchored at the root
                if fnmatch.fnmatch(relative, bare) or relative.startswith(bare + "/"):
                    return True
            elif any(fnmatch.fnmatch(part, bare) for part in parts):
                return True
        return False

    return ignored


def allowed(value, line_text):
    return value in ALLOWED_VALUES or "EXAMPLE" in value or PLACEHOLDER.match(value) or ALLOW_MARKER in line_text


def scan_text(path, text):
    lines = text.splitlines() or [""]

    def at(offset):
        number = text.count("\n", 0, offset) + 1
        return number, lines[min(number, len(lines)) - 1]

    found = []
    for kind, pattern in TOKENS.items():
        for match in pattern.finditer(text):
            value = match.group(match.lastindex or 0)
            number, line_text = at(match.start())
            if kind == "AWS secret access key" and not (re.search("[a-z]", value) and re.search("[A-Z]", value)):
                continue  # a hex digest or a name, not 40 random base64 characters
            if not allowed(value, line_text):
                found.append(Finding(path, number, kind, value))
    assignments = [QUOTED_ASSIGNMENT]
    name = PurePosixPath(path).name
    if PurePosixPath(path).suffix in CONFIG_SUFFIXES or name.startswith(".env") or name == "credentials":
        assignments.append(CONFIG_ASSIGNMENT)
    already = {finding.value for finding in found}
    for pattern in assignments:
        for match in pattern.finditer(text):
            key, value = match.group(1), match.group(match.lastindex)
            number, line_text = at(match.start(match.lastindex))
            if value in already or NOT_A_SECRET_NAME.search(key) or allowed(value, line_text):
                continue  # reported above by its kind, or not a secret
            already.add(value)
            found.append(Finding(path, number, f"literal assigned to {key}", value))
    return found


def key_file(path):
    """Why the name alone says this is a private key or a credentials file, or None."""
    p = PurePosixPath(path)
    if p.suffix.lower() in KEY_FILE_SUFFIXES:
        return f"key file ({p.suffix})"
    if p.name in KEY_FILE_NAMES:
        return f"key file ({p.name})"
    if p.name == ".env" or (p.name.startswith(".env.") and not p.name.endswith((".example", ".sample", ".template"))):
        return "environment file"
    if p.name == "credentials" and p.parent.name == ".aws":
        return "AWS credentials file"
    return None


def scan(root):
    """Every finding under root, in path order."""
    root = Path(root).resolve()
    findings = []
    for path in candidate_files(root):
        full = root / path
        if not full.is_file():  # tracked but deleted in the working tree
            continue
        why = key_file(path)
        if why:
            findings.append(Finding(path, 1, why, PurePosixPath(path).name))
        findings += scan_text(path, full.read_bytes().decode("utf-8", "replace"))
    return findings


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent
    findings = scan(root)
    for finding in findings:
        print(finding)
    print(f"secrets scan: {len(findings)} finding(s) in {root}", file=sys.stderr)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
