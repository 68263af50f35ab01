"""HTTPS for the front-end (frontend.domain, docs/https.md): a certificate from an ACME CA (Let's
Encrypt by default) obtained by certbot's apache plugin on the host, the page on 443 with modern
TLS and HSTS, http:// redirected (except the ACME challenge path), renewal by certbot's own timer."""
import http.client
import re
import socket
import ssl
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from .config import backend_mode
from .errors import ConfigError
from .remote import ensure_apt, ensure_file, has_systemd, q, service, sh

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
TEMPLATES = Path(__file__).resolve().parent / "templates"
SITE, SSL_SITE = "digits-frontend", "digits-frontend-ssl"  # /etc/apache2/sites-available/<name>.conf
SITES = PurePosixPath("/etc/apache2/sites-available")
LIVE, RENEWAL = PurePosixPath("/etc/letsencrypt/live"), PurePosixPath("/etc/letsencrypt/renewal")
CA_BUNDLE = PurePosixPath("/etc/digits-frontend/acme-ca.pem")  # frontend.acme_ca_bundle, on the host
DOMAIN = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,62}")
EMAIL = re.compile(r"[^@\s'\"]+@[^@\s'\"]+\.[^@\s'\"]+")
# Everything but the challenge path goes to https:// (mod_alias; PCRE's look-ahead).
REDIRECT = '    RedirectMatch 301 "^/(?!\\.well-known/acme-challenge/)(.*)$" "https://{domain}/$1"\n'


def settings(c):
    """(domain, email, ACME directory URL, local CA bundle or None) checked; domain None: HTTP only."""
    front = c.config.frontend
    domain = (front.get("domain") or "").strip().lower().rstrip(".") or None
    if domain is None:
        return None, None, None, None
    if not DOMAIN.fullmatch(domain):
        raise ConfigError(f"frontend.domain={domain!r} is not a DNS name (digits.example.org)")
    email = (front.get("email") or "").strip() or None
    if email and not EMAIL.fullmatch(email):
        raise ConfigError(f"frontend.email={email!r} is not an e-mail address")
    server = (front.get("acme_server") or LETS_ENCRYPT).strip()
    if not server.startswith("https://"):
        raise ConfigError(f"frontend.acme_server={server!r}: an ACME directory https:// URL")
    bundle = front.get("acme_ca_bundle")
    if bundle and not Path(bundle).expanduser().is_file():
        raise ConfigError(f"frontend.acme_ca_bundle={bundle!r}: no such file")
    if backend_mode(c) == "public":  # an https page may not call http://<back-end>:5000 (mixed content)
        raise ConfigError("frontend.domain with backend.mode public: the https:// page could not call the"
                          " back-end's http:// port (browsers block mixed content); use backend.mode proxied")
    return domain, email, server, Path(bundle).expanduser() if bundle else None


def ensure_site(cxn, r, name, text, what):
    """sites-available/<name>.conf holding `text`, enabled; True when apache must reload."""
    path = SITES / f"{name}.conf"
    changed = r.either(ensure_file(cxn, text.encode(), path, sudo=True), f"{path} -> {what}")
    if not sh(cxn, f"test -e /etc/apache2/sites-enabled/{name}.conf", warn=True).ok:
        cxn.sudo(f"a2ensite -q {name}", hide=True)
        changed = r.either(True, f"apache site {name} enabled")
    if changed:
        check = cxn.sudo("apache2ctl configtest", hide=True, warn=True)
        if not check.ok:
            cxn.sudo(f"a2dissite -q {name}", hide=True, warn=True)
            r.fail(f"apache refuses {path} (disabled again): {(check.stderr or check.stdout).strip()[-500:]}")
    return changed


def remove_sites(cxn, r):
    """No domain (any more): the page on HTTP only, as without HTTPS. True when apache must reload."""
    found = [n for n in (SSL_SITE, SITE) if sh(cxn, f"test -e {SITES / n}.conf", warn=True).ok]
    for name in found:
        cxn.sudo(f"sh -c {q(f'a2dissite -q {name} >/dev/null; rm -f {SITES / name}.conf')}", hide=True)
    return r.either(bool(found), "HTTPS sites removed (frontend.domain unset: HTTP only)") if found else False


def render(name, domain, docroot, redirect=False):
    text = (TEMPLATES / f"{name}.conf").read_text()
    text = text.replace("@REDIRECT@", REDIRECT.format(domain=domain) if redirect else "")
    return text.replace("@DOMAIN@", domain).replace("@DOCROOT@", str(docroot))


def certificate_held(cxn, domain, server):
    """True when certbot keeps a certificate for `domain` from `server` (its lineage, named after
    the domain): then no new one is asked for; certbot's timer renews it."""
    return sh(cxn, f"sudo test -s {LIVE / domain}/fullchain.pem && sudo grep -qxF {q(f'server = {server}')}"
                   f" {RENEWAL / domain}.conf", warn=True).ok


def certbot(cxn, args, bundle):
    """certbot as root, trusting `bundle` (the ACME server's CA, when private) for its API."""
    env = f"env REQUESTS_CA_BUNDLE={CA_BUNDLE} " if bundle else ""
    return cxn.sudo(f"{env}certbot {args}", hide=True, warn=True)


def why_not_issued(output, domain, address, server):
    """What an operator can do about a failed issuance, from certbot's words."""
    text = output.lower()
    if "ratelimited" in text or "too many" in text:
        return (f"the CA's rate limit (too many certificates or failures for {domain} lately): wait (Let's"
                " Encrypt: an hour for failed validations, a week for duplicate certificates), or try"
                " frontend.acme_server https://acme-staging-v02.api.letsencrypt.org/directory meanwhile")
    if "failed to authenticate" in text or "authority reported" in text or "dns problem" in text:
        return (f"the CA could not reach this host as {domain} on port 80: make the DNS name {domain} point"
                f" to the front-end's public address {address} (an A record), with port 80 open to the world,"
                " wait for DNS to follow, then re-run")
    ca_host = (urlsplit(server).hostname or "").lower()
    if any(words in text for words in (f"requesting {ca_host}", "max retries exceeded", "unable to reach",
                                       "certificate verify failed", "connection refused", "timed out")):
        return (f"the CA at {server} cannot be reached from the front-end (network, proxy, a wrong"
                f" frontend.acme_server, or its TLS not trusted): check `curl -sI {server}` on the host, then re-run")
    return "certbot failed (see its words above and /var/log/letsencrypt/letsencrypt.log on the host)"


def certificate_facts(cxn, domain):
    """{'names': [...], 'not_after': str, 'issuer': str} of the certificate certbot keeps for `domain`."""
    out = cxn.sudo(f"openssl x509 -in {LIVE / domain}/cert.pem -noout -issuer -enddate -ext subjectAltName",
                   hide=True).stdout
    names = re.findall(r"DNS:([^,\s]+)", out)
    not_after = re.search(r"notAfter=(.*)", out).group(1).strip()
    issuer = re.search(r"issuer=(.*)", out).group(1).strip()
    return {"names": names, "not_after": not_after, "issuer": issuer}


def ensure_https(c, cxn, r, address):
    """The certificate, the sites, the checks; the https:// page URL, or None (no frontend.domain).
    A failed issuance leaves the HTTP site as it was and says why."""
    domain, email, server, bundle = settings(c)
    docroot = PurePosixPath(c.config.frontend.docroot)
    if domain is None:
        if remove_sites(cxn, r):
            service(cxn, "apache2", "reload")
        return None
    ensure_apt(cxn, r, ["certbot", "python3-certbot-apache"], c.config.remote.apt_cache_valid)
    if bundle:
        r.either(ensure_file(cxn, bundle, CA_BUNDLE, sudo=True), f"{CA_BUNDLE} (the ACME server's CA)")
    held = certificate_held(cxn, domain, server)
    reload = ensure_site(cxn, r, SITE, render(SITE, domain, docroot, redirect=held), f"http://{domain}/")
    if not held:
        if reload:  # the name's own site read before the CA checks it
            service(cxn, "apache2", "reload")
            reload = False
        who = f"-m {q(email)}" if email else "--register-unsafely-without-email"
        # certonly: the apache plugin answers the HTTP-01 challenge; the sites are ours (templates).
        out = certbot(cxn, f"certonly --apache --non-interactive --agree-tos {who} --server {q(server)}"
                           f" --cert-name {q(domain)} -d {q(domain)} --deploy-hook 'apache2ctl graceful'"
                           " --force-renewal", bundle)
        if not out.ok:
            words = (out.stdout + out.stderr).strip()[-1500:]
            r.fail(f"no certificate for {domain} from {server}: {why_not_issued(words, domain, address, server)}\n"
                   f"  the page still answers on http:// as before\n  certbot said:\n{words}")
        r.changed(f"certificate for {domain} obtained from {server}")
        reload |= ensure_site(cxn, r, SITE, render(SITE, domain, docroot, redirect=True),
                              f"http://{domain}/ redirected to https://")
    if not sh(cxn, "test -e /etc/apache2/mods-enabled/ssl.load", warn=True).ok:
        cxn.sudo("a2enmod -q ssl", hide=True)
        reload = r.either(True, "apache module ssl enabled")
    reload |= ensure_site(cxn, r, SSL_SITE, render(SSL_SITE, domain, docroot), f"https://{domain}/")
    if reload:
        service(cxn, "apache2", "reload")
        r.changed("apache2 reloaded (HTTPS)")
    facts = certificate_facts(cxn, domain)
    if domain not in facts["names"]:
        r.fail(f"the certificate in {LIVE / domain} names {facts['names']}, not {domain}: delete it with"
               f" `sudo certbot delete --cert-name {domain}` on the host and re-run")
    r.checked(f"certificate for {', '.join(facts['names'])} until {facts['not_after']} ({facts['issuer']})")
    # (--server: certbot's dry run otherwise goes to Let's Encrypt's staging whatever the CA; given
    # Let's Encrypt's production, it still goes to staging)
    dry = certbot(cxn, f"renew --dry-run --no-random-sleep-on-renew --cert-name {q(domain)} --server {q(server)}",
                  bundle)
    if not dry.ok:
        r.fail(f"`certbot renew --dry-run` fails: the certificate would not renew before it expires"
               f" ({facts['not_after']}):\n{(dry.stdout + dry.stderr).strip()[-1500:]}")
    r.checked("certbot renew --dry-run succeeds")
    if has_systemd(cxn):
        timer = sh(cxn, "systemctl is-enabled --quiet certbot.timer && systemctl is-active --quiet certbot.timer",
                   warn=True).ok
        how = "certbot.timer"
    else:  # (the package's cron job runs where systemd does not)
        timer, how = sh(cxn, "test -e /etc/cron.d/certbot", warn=True).ok, "/etc/cron.d/certbot"
    if not timer:
        r.fail(f"certbot's renewal ({how}) is not active: `sudo systemctl enable --now certbot.timer`, then re-run")
    r.checked(f"renewal by {how}")
    check_from_here(r, address, domain, bundle)
    return f"https://{domain}/"


class Pinned(http.client.HTTPSConnection):
    """HTTPS to `domain` at a given address (before, or whatever, DNS says), verified for `domain`."""

    def __init__(self, address, domain, context):
        super().__init__(domain, 443, context=context, timeout=10)
        self.address = address

    def connect(self):
        raw = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)


def check_from_here(r, address, domain, bundle=None):
    """As a browser will: https://domain/ at the front-end's address, its certificate trusted
    (the system's roots, or frontend.acme_ca_bundle's), HSTS on; http:// redirected."""
    context = ssl.create_default_context(cafile=str(bundle) if bundle else None)
    connection = Pinned(address, domain, context)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        body, hsts = response.read().decode("utf-8", "replace"), response.getheader("Strict-Transport-Security")
        version = connection.sock.version()
    except (OSError, ssl.SSLError) as error:
        r.fail(f"https://{domain}/ at {address} does not answer from here with a trusted certificate: {error}\n"
               "  check that the security group opens 443 (fab create-vpc), then re-run")
    finally:
        connection.close()
    if response.status != 200 or "<canvas" not in body or not hsts:
        r.fail(f"https://{domain}/ answers {response.status} (HSTS: {hsts}) instead of the page")
    r.checked(f"https://{domain}/ answers from here ({version}, HSTS {hsts})")
    plain = http.client.HTTPConnection(address, 80, timeout=10)
    try:
        plain.request("GET", "/", headers={"Host": domain})
        answer = plain.getresponse()
        location = answer.getheader("Location")
    finally:
        plain.close()
    if answer.status != 301 or location != f"https://{domain}/":
        r.fail(f"http://{domain}/ answers {answer.status} (Location {location}), not a redirect to https://")
    r.checked(f"http://{domain}/ redirects to https://{domain}/")
