"""HTTPS for real against a local ACME CA: Debian's pebble (with pebble-challtestsrv as the DNS
that maps the test names to the loopback front-end, 127.0.0.3) on loopback; `fab setup-frontend`
with frontend.domain runs certbot's apache plugin on the front-end host (this machine's apache),
then chromium, trusting pebble's CA and nothing else, loads https://digits.test/ and reads a digit.
The fixture puts apache and /etc/letsencrypt back as they were."""
import base64
import datetime
import hashlib
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from invoke.exceptions import Exit

from tasks import frontend, https
from tests.drawing import CHROMIUM, CHROMIUM_ARGS, STROKES, draw_with_mouse, predict
from tests.fixtures import free_port, wait_for
from tests.fixtures.ssh_hosts import ADDRESSES, captured

pytestmark = [pytest.mark.slow, pytest.mark.browser]
DOMAIN, OTHER, ELSEWHERE = "digits.test", "digits-two.test", "elsewhere.test"  # (DNS: -> 127.0.0.3, SERVFAIL)
FRONT = ADDRESSES["frontend"]
APACHE = Path("/etc/apache2")
READY = "() => window.DigitsApp && window.DigitsApp.ready === true"


class Pebble:
    """pebble + pebble-challtestsrv on 127.0.0.1, pebble's own endpoint with a certificate made here."""

    def __init__(self, folder):
        self.folder, self.port, self.management = folder, free_port(), free_port()
        self.directory = f"https://127.0.0.1:{self.port}/dir"
        key, cert = folder / "api-key.pem", folder / "api-cert.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=pebble",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
        dns, dns_management = free_port(), free_port()
        (folder / "pebble.json").write_text(json.dumps({"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}", "managementListenAddress": f"127.0.0.1:{self.management}",
            "certificate": str(cert), "privateKey": str(key), "httpPort": 80, "tlsPort": free_port(),
            "ocspResponderURL": "", "externalAccountBindingRequired": False}}))
        self.dns_management = f"http://127.0.0.1:{dns_management}"
        log = open(folder / "pebble.log", "w")
        self.processes = [subprocess.Popen(
            ["pebble-challtestsrv", "-defaultIPv4", FRONT, "-defaultIPv6", "", "-dns01", f"127.0.0.1:{dns}",
             "-http01", "", "-https01", "", "-tlsalpn01", "",
             "-management", f"127.0.0.1:{dns_management}"], stdout=log, stderr=log)]
        self.processes.append(subprocess.Popen(
            ["pebble", "-config", str(folder / "pebble.json"), "-dnsserver", f"127.0.0.1:{dns}"],
            env={**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}, stdout=log, stderr=log))
        context = ssl.create_default_context(cafile=str(cert))
        wait_for(lambda: self._get(f"https://127.0.0.1:{self.management}/roots/0", context), "pebble", timeout=30)
        # The CA certificates of this run (new each run): its root and the intermediate it signs with.
        self.root = self._get(f"https://127.0.0.1:{self.management}/roots/0", context)
        self.intermediate = self._get(f"https://127.0.0.1:{self.management}/intermediates/0", context)
        self.bundle = folder / "bundle.pem"  # what the task and its check trust: pebble's API and its CA
        self.bundle.write_bytes(cert.read_bytes() + self.root)

    @staticmethod
    def _get(url, context):
        try:
            with urllib.request.urlopen(url, context=context, timeout=3) as response:
                return response.read()
        except OSError:
            return None

    def break_dns(self, name):
        """DNS: `name` answers SERVFAIL (other names: the front-end). (Every 127.x address is this
        machine, whose apache answers the challenge: only a name that resolves nowhere fails.)"""
        request = urllib.request.Request(f"{self.dns_management}/set-servfail", method="POST",
                                         data=json.dumps({"host": f"{name}."}).encode())
        urllib.request.urlopen(request, timeout=5).close()

    def spki_hashes(self):
        """base64 SHA-256 of the CA certificates' public keys: what chromium is told to trust."""
        keys = [x509.load_pem_x509_certificate(pem).public_key() for pem in (self.root, self.intermediate)]
        return [base64.b64encode(hashlib.sha256(key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).digest()).decode()
            for key in keys]

    def stop(self):
        for process in self.processes:
            process.terminate()
            process.wait(10)


def enabled():
    return {kind: set(os.listdir(APACHE / f"{kind}-enabled")) for kind in ("mods", "conf", "sites")}


@pytest.fixture(scope="module")
def https_site(backend_deployed, tmp_path_factory):
    """The front-end set up with frontend.domain against pebble: (Scenario, Pebble, printed)."""
    before = enabled()
    letsencrypt = {p.relative_to("/etc/letsencrypt") for p in Path("/etc/letsencrypt").rglob("*")}
    pebble = Pebble(tmp_path_factory.mktemp("pebble"))
    pebble.break_dns(ELSEWHERE)
    settings = {"domain": DOMAIN, "email": "ops@digits.test", "acme_server": pebble.directory,
                "acme_ca_bundle": str(pebble.bundle)}
    try:
        started = time.monotonic()
        _, printed = captured(frontend.setup_frontend, backend_deployed.context(frontend=settings))
        print(f"[https] first setup-frontend: {time.monotonic() - started:.1f}s", flush=True)
        yield backend_deployed, pebble, settings, printed
    finally:
        pebble.stop()
        # This machine's apache and certbot state as they were: the tests' hosts are its own.
        after = enabled()
        for kind, command in (("sites", "a2dissite"), ("conf", "a2disconf"), ("mods", "a2dismod")):
            added = sorted({name.rsplit(".", 1)[0] for name in after[kind] - before[kind]})
            if added:
                subprocess.run([command, "-q", "-f", *added] if kind == "mods" else [command, "-q", *added],
                               check=False)
        for name in (https.SITE, https.SSL_SITE):
            (APACHE / "sites-available" / f"{name}.conf").unlink(missing_ok=True)
        for path in sorted(Path("/etc/letsencrypt").rglob("*"), reverse=True):
            if path.relative_to("/etc/letsencrypt") not in letsencrypt:
                path.unlink() if path.is_file() or path.is_symlink() else shutil.rmtree(path, ignore_errors=True)
        Path(https.CA_BUNDLE).unlink(missing_ok=True)
        folder = Path(https.CA_BUNDLE).parent
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        subprocess.run(["apache2ctl", "graceful"], check=False)


def served_certificate(domain=DOMAIN, bundle=None):
    """The certificate apache serves for `domain` on 127.0.0.3:443, verified with `bundle`."""
    context = ssl.create_default_context(cafile=str(bundle))
    with socket.create_connection((FRONT, 443), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=domain) as sock:
        return x509.load_der_x509_certificate(sock.getpeercert(binary_form=True)), sock.version()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_certificate_obtained_and_the_page_served_over_https(https_site):
    _, pebble, _, printed = https_site
    for line in (f"changed: certificate for {DOMAIN} obtained from {pebble.directory}",
                 f"changed: /etc/apache2/sites-available/{https.SITE}.conf -> http://{DOMAIN}/ redirected to https://",
                 "checked: certbot renew --dry-run succeeds", "checked: renewal by /etc/cron.d/certbot",
                 f"checked: http://{DOMAIN}/ redirects to https://{DOMAIN}/"):
        assert f"  {line}\n" in printed, (line, printed)
    assert f"  checked: https://{DOMAIN}/ answers from here (TLSv1.3, HSTS max-age=31536000)\n" in printed
    certificate, version = served_certificate(bundle=pebble.bundle)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [DOMAIN]
    now = datetime.datetime.now(datetime.UTC)
    assert certificate.not_valid_before_utc <= now < certificate.not_valid_after_utc
    assert certificate.not_valid_after_utc - now > datetime.timedelta(days=30)
    assert "Pebble" in certificate.issuer.rfc4514_string() and version == "TLSv1.3"
    # TLS 1.2 at least, and only forward-secret AEAD ciphers in 1.2
    for maximum, ciphers in ((ssl.TLSVersion.TLSv1_1, None), (ssl.TLSVersion.TLSv1_2, "AES128-SHA:AES256-SHA256")):
        context = ssl.create_default_context(cafile=str(pebble.bundle))
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = maximum
        if ciphers:
            context.set_ciphers(ciphers)
        with socket.create_connection((FRONT, 443), timeout=5) as raw, pytest.raises(ssl.SSLError):
            context.wrap_socket(raw, server_hostname=DOMAIN)


def plain(path, domain=DOMAIN):
    connection = http.client.HTTPConnection(FRONT, 80, timeout=5)
    try:
        connection.request("GET", path, headers={"Host": domain})
        response = connection.getresponse()
        return response.status, response.getheader("Location")
    finally:
        connection.close()


def test_http_redirects_except_the_acme_challenge_path(https_site):
    assert plain("/") == (301, f"https://{DOMAIN}/")
    assert plain("/static/app.js?v=1") == (301, f"https://{DOMAIN}/static/app.js?v=1")
    assert plain("/.well-known/acme-challenge/no-such-token") == (404, None)  # certbot's renewals answer here
    assert plain("/", domain=FRONT)[0] == 200  # the address itself: HTTP as before


def test_chromium_trusting_pebbles_ca_draws_a_digit_over_https(https_site, chromium):
    _, pebble, _, _ = https_site
    # The name resolves to the front-end; pebble's CA (its public keys) is trusted; nothing else is.
    # Browsers of their own (their own flags), from the session's Playwright: one per process.
    args = [*CHROMIUM_ARGS, f"--host-resolver-rules=MAP {DOMAIN} {FRONT}",
            f"--ignore-certificate-errors-spki-list={','.join(pebble.spki_hashes())}"]
    browsers = chromium.browser_type
    browser = browsers.launch(executable_path=CHROMIUM, headless=True, args=args)
    try:
        page = browser.new_page(viewport={"width": 900, "height": 760}, ignore_https_errors=False)
        page.set_default_timeout(20_000)
        response = page.goto(f"http://{DOMAIN}/")
        assert page.url == f"https://{DOMAIN}/" and response.status == 200
        details = response.security_details()
        assert details["subjectName"] == DOMAIN and details["protocol"] == "TLS 1.3", details
        assert "Pebble" in details["issuer"]
        assert response.headers["strict-transport-security"] == "max-age=31536000"
        page.wait_for_function(READY)
        draw_with_mouse(page, STROKES[7])
        with page.expect_response(lambda r: r.request.method == "POST") as posted:
            assert predict(page)["digit"] == "7"
        assert posted.value.url == f"https://{DOMAIN}/predict/" and posted.value.status == 200
    finally:
        browser.close()
    # The trust came from pebble's CA keys given above, and from nothing else: without them, refused.
    browser = browsers.launch(executable_path=CHROMIUM, headless=True,
                                args=[*CHROMIUM_ARGS, f"--host-resolver-rules=MAP {DOMAIN} {FRONT}"])
    try:
        with pytest.raises(Exception, match="ERR_CERT_AUTHORITY_INVALID"):
            browser.new_page().goto(f"https://{DOMAIN}/")
    finally:
        browser.close()


def test_second_run_requests_no_certificate_and_changes_nothing(https_site):
    scenario, pebble, settings, _ = https_site
    before, _ = served_certificate(bundle=pebble.bundle)
    result, printed = captured(frontend.setup_frontend, scenario.context(frontend=settings))
    assert result["changed"] == 0, printed
    assert "obtained" not in printed and "  checked: certbot renew --dry-run succeeds\n" in printed
    assert served_certificate(bundle=pebble.bundle)[0].serial_number == before.serial_number


def test_forced_renewal_serves_a_new_certificate(https_site):
    _, pebble, _, _ = https_site
    old, _ = served_certificate(bundle=pebble.bundle)
    time.sleep(1)  # (dates are to the second)
    subprocess.run(["certbot", "renew", "--force-renewal", "--no-random-sleep-on-renew", "--cert-name", DOMAIN],
                   check=True, capture_output=True, env={**os.environ, "REQUESTS_CA_BUNDLE": str(pebble.bundle)})
    # certbot's deploy hook (apache2ctl graceful) has apache serve it
    new = wait_for(lambda: (c := served_certificate(bundle=pebble.bundle)[0]).serial_number != old.serial_number
                   and c, "the renewed certificate served", timeout=15)
    assert new.not_valid_before_utc > old.not_valid_before_utc
    assert new.not_valid_after_utc > old.not_valid_after_utc
    names = new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [DOMAIN]


def test_changed_domain_gets_its_certificate_and_a_failed_issuance_says_why(https_site):
    scenario, pebble, settings, _ = https_site
    try:
        result, printed = captured(frontend.setup_frontend, scenario.context(frontend={**settings, "domain": OTHER}))
        assert f"  changed: certificate for {OTHER} obtained from {pebble.directory}\n" in printed
        certificate, _ = served_certificate(OTHER, bundle=pebble.bundle)
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == [OTHER]
        # A name whose DNS fails: the CA cannot check it; the page stays on http://.
        with pytest.raises(Exit) as failed:
            frontend.setup_frontend(scenario.context(frontend={**settings, "domain": ELSEWHERE}))
        message = failed.value.message
        assert f"no certificate for {ELSEWHERE} from {pebble.directory}: the CA could not reach" in message
        assert f"point to the front-end's public address {FRONT}" in message and "still answers on http://" in message
        assert plain("/", domain=ELSEWHERE)[0] == 200 and plain("/", domain=FRONT)[0] == 200
        # The CA unreachable: said so.
        down = f"https://127.0.0.1:{free_port()}/dir"
        with pytest.raises(Exit) as failed:
            frontend.setup_frontend(scenario.context(frontend={**settings, "acme_server": down, "domain": OTHER}))
        assert f"no certificate for {OTHER} from {down}: the CA at {down} cannot be reached" in failed.value.message
        assert plain("/", domain=FRONT)[0] == 200
    finally:  # back to the first name: its certificate is still held, none is asked for
        result, printed = captured(frontend.setup_frontend, scenario.context(frontend=settings))
    assert "obtained" not in printed and result["changed"] >= 1
    assert served_certificate(bundle=pebble.bundle)[0].extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [DOMAIN]
