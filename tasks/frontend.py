"""Guide, "Front-End Web Server": apache2 serving index.html and static/, and (backend.mode
proxied or private) forwarding /predict/ and /health to the back-end's private address."""
import json
import math
import re
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from invoke import task

from . import hosts, https
from .config import FILES, frontend_config_js, proxied
from .errors import ConfigError
from .remote import Report, ensure_apt, ensure_file, ensure_running, fetch, http_get, q, service, sh

PROXY = "digits-backend-proxy"  # /etc/apache2/conf-available/<PROXY>.conf
PROXY_TEMPLATE = Path(__file__).resolve().parent / "templates" / f"{PROXY}.conf"
EDGE = "digits-frontend-edge"  # the security headers and caching of every answer
EDGE_TEMPLATE = Path(__file__).resolve().parent / "templates" / f"{EDGE}.conf"
LOADED = PurePosixPath("/var/lib/digits-frontend/proxy-loaded")  # touched once apache has read our confs
SAME_ORIGIN = "/"  # config.js's backendUrl: the page's own server


def default_backend_url(c):
    """The back-end as the user's browser reaches it: the page's own origin when apache
    forwards to it, else (backend.mode public) its address and backend.port."""
    if proxied(c):
        return SAME_ORIGIN
    if not hosts.inventory(c).get("backend"):
        from . import tier

        balancer = tier.balancer_address(c)  # N back-ends: the internet-facing balancer, port 80
        if balancer:
            return hosts.http_url(balancer, 80)
    _, host, _, _ = hosts.address(c, "backend")
    return hosts.http_url(host, c.config.backend.port)


def shown(url):
    return "/ (the page's own origin)" if url == SAME_ORIGIN else url


def proxy_target(c):
    """host:port apache forwards to: the back-end tier's internal balancer (tasks/tier.py), else the
    back-end's private address (IPv6 in brackets)."""
    if not hosts.inventory(c).get("backend"):
        from . import tier

        balancer = tier.balancer_address(c)
        if balancer:
            return f"{balancer}:80"
    host = hosts.private_address(c, "backend")
    return f"{f'[{host}]' if ':' in host else host}:{int(c.config.backend.port)}"


def ensure_conf(cxn, r, name, text, modules, what, loaded=LOADED):
    """/etc/apache2/conf-available/<name>.conf holding `text`, enabled, with the apache `modules`
    it needs; True when apache must reload (changed here, or changed by a run cut short
    before its reload: `loaded` is touched once apache has read it). A configuration apache
    refuses is disabled again, and the task fails."""
    conf = PurePosixPath("/etc/apache2/conf-available") / f"{name}.conf"
    enabled = f"/etc/apache2/conf-enabled/{name}.conf"
    changed = False
    missing = [m for m in modules if not sh(cxn, f"test -e /etc/apache2/mods-enabled/{m}.load", warn=True).ok]
    if missing:
        cxn.sudo(f"a2enmod -q {' '.join(missing)}", hide=True)  # (proxy_http brings mod_proxy, which it needs)
        changed = r.either(True, f"apache modules {', '.join(MODULE_NAMES.get(m, m) for m in missing)} enabled")
    changed |= r.either(ensure_file(cxn, text.encode(), conf, sudo=True), f"{conf} -> {what}")
    if not sh(cxn, f"test -e {q(enabled)}", warn=True).ok:
        cxn.sudo(f"a2enconf -q {name}", hide=True)
        changed = r.either(True, f"apache conf {name} enabled")
    if changed:
        check = cxn.sudo("apache2ctl configtest", hide=True, warn=True)
        if not check.ok:  # never left enabled: apache's next restart would fail on it
            cxn.sudo(f"a2disconf -q {name}", hide=True, warn=True)
            r.fail(f"apache refuses the new configuration (disabled again): "
                   f"{(check.stderr or check.stdout).strip()[-500:]}")
    unread = sh(cxn, f"test ! -e {q(loaded)} -o {q(conf)} -nt {q(loaded)}", warn=True).ok
    return changed or unread


MODULE_NAMES = {"proxy_http": "proxy, proxy_http"}


def ensure_proxy(c, cxn, r):
    """The forwarding enabled (proxied, private) or gone (public); True when apache must reload."""
    conf = PurePosixPath("/etc/apache2/conf-available") / f"{PROXY}.conf"
    if not proxied(c):
        if not sh(cxn, f"test -e {q(conf)}", warn=True).ok:
            return False
        cxn.sudo(f"sh -c {q(f'a2disconf -q {PROXY} >/dev/null; rm -f {conf}')}", hide=True)
        return r.either(True, f"{conf} removed (backend.mode public: the page calls the back-end itself)")
    target = proxy_target(c)
    text = PROXY_TEMPLATE.read_text().replace("@BACKEND@", target)
    return ensure_conf(cxn, r, PROXY, text, ["proxy_http", "request"], f"back-end {target}")


def connect_origin(r, backend_url):
    """The origin the page's Content-Security-Policy lets it call besides its own: the
    back-end's (backend.mode public), or none ("/": the page's own origin forwards)."""
    if backend_url == SAME_ORIGIN:
        return None
    parts = urlsplit(backend_url)
    if parts.scheme not in ("http", "https") or not ORIGIN_HOST.fullmatch(parts.netloc):
        r.fail(f"the back-end URL {backend_url!r} is not http(s)://host[:port]: the page could not call it")
    return f"{parts.scheme}://{parts.netloc}"


ORIGIN_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def edge_limits(c):
    """{placeholder: value} of the edge's limits, checked: frontend.rate_limit (requests/s),
    rate_burst, max_connections_per_ip."""
    settings = c.config.frontend
    try:
        rate, burst = float(settings.rate_limit), int(settings.rate_burst)
        per_ip = int(settings.max_connections_per_ip)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"frontend.rate_limit, rate_burst, max_connections_per_ip: numbers ({error})") from None
    if rate < 0 or burst < 1 or per_ip < 1 or (rate and burst < rate):
        raise ConfigError(f"frontend.rate_limit={rate:g} (>= 0), rate_burst={burst} (>= rate_limit),"
                          f" max_connections_per_ip={per_ip} (>= 1)")
    window = math.ceil(burst / rate) if rate else 0
    return {"@RATE_LIMIT@": f"{rate:g}", "@RATE_BURST@": str(burst), "@RATE_WINDOW@": str(window),
            "@CONN_PER_IP@": str(per_ip)}


def ensure_qos(cxn, r):
    """mod_qos loadable: Debian 12's build of it still calls the old PCRE library's functions,
    which its apache (built with PCRE2) no longer brings: loaded first, from libpcre3 (a
    dependency of the package), where apache says so. True when apache must reload."""
    shim = "/etc/apache2/mods-available/digits-pcre.load"
    changed = False
    if not sh(cxn, "test -e /etc/apache2/mods-enabled/qos.load", warn=True).ok:
        cxn.sudo("a2enmod -q qos", hide=True)
        changed = r.either(True, "apache module qos enabled")
    check = cxn.sudo("apache2ctl configtest", hide=True, warn=True)
    if "undefined symbol: pcre_" not in check.stdout + check.stderr:
        return changed
    library = cxn.sudo("ldconfig -p", hide=True).stdout  # (ldconfig: in sbin, on root's PATH only)
    library = next((line.split()[-1] for line in library.splitlines() if "libpcre.so.3 " in line), None)
    if not library:
        r.fail("mod_qos needs the old PCRE library (libpcre.so.3), which is not installed: apt-get install libpcre3")
    ensure_file(cxn, f"# mod_qos calls PCRE (not PCRE2): loaded before it (tasks/frontend.py)\nLoadFile {library}\n"
                .encode(), shim, sudo=True)
    cxn.sudo("a2enmod -q digits-pcre", hide=True)
    return r.either(True, f"apache loads {library} before mod_qos (built for the old PCRE)")


def ensure_edge(c, cxn, r, backend_url):
    """The security headers every answer carries, config.js never cached unchecked, slow and
    abusive clients held off (templates/digits-frontend-edge.conf); True when apache must reload."""
    origin = connect_origin(r, backend_url)
    text = EDGE_TEMPLATE.read_text().replace("@CONNECT_SRC@", f" {origin}" if origin else "")
    limits = edge_limits(c)
    for placeholder, value in limits.items():
        text = text.replace(placeholder, value)
    limited = limits["@RATE_WINDOW@"] != "0"
    if not limited:  # frontend.rate_limit 0: no limit
        text = "\n".join(f"# (frontend.rate_limit 0) {line}" if line.startswith(UNLIMITED) else line
                         for line in text.splitlines()) + "\n"
    reload = ensure_qos(cxn, r)
    rate = (f"/predict/ at most {limits['@RATE_LIMIT@']}/s (bursts of {limits['@RATE_BURST@']}) per address"
            if limited else "/predict/ not rate limited")
    what = f"headers: CSP connect-src 'self'{f' {origin}' if origin else ''}; {rate}"
    return ensure_conf(cxn, r, EDGE, text, ["headers", "reqtimeout", "setenvif"], what) or reload


UNLIMITED = ("QS_ClientEventLimitCount", "Header always set Retry-After")  # the lines rate_limit 0 leaves out


def page_files():
    """(local file, path under the docroot) of the page, except the generated config.js."""
    yield FILES / "index.html", "index.html"
    for path in sorted((FILES / "static").rglob("*")):
        relative = path.relative_to(FILES).as_posix()
        if path.is_file() and relative != "static/config.js":
            yield path, relative


@task(help={"backend-url": "URL the page calls for predictions (default: http://<back-end address>:<backend.port>)"})
def setup_frontend(c, backend_url=None):
    """Install apache2, deploy the page with its generated config.js, check it as a browser will;
    with frontend.domain, HTTPS with a certificate from an ACME CA."""
    url = backend_url or default_backend_url(c)
    with Report(c, "setup-frontend", "frontend") as r:
        cxn = r.cxn
        # libapache2-mod-qos: the per-address limits (docs/edge.md)
        ensure_apt(cxn, r, ["apache2", "libapache2-mod-qos"], c.config.remote.apt_cache_valid)
        docroot = PurePosixPath(c.config.frontend.docroot)
        for local, relative in page_files():
            r.either(ensure_file(cxn, local, docroot / relative, sudo=True), f"{docroot / relative}")
        config_js = frontend_config_js(url).encode()
        r.either(ensure_file(cxn, config_js, docroot / "static/config.js", sudo=True),
                 f"{docroot}/static/config.js -> back-end {shown(url)}")
        # A new or changed edge: a restart, not a reload: mod_qos takes a per-client limit added or
        # removed at a start only (a graceful reload leaves apache without it, and says so in its log).
        restart = ensure_edge(c, cxn, r, url)
        reload = ensure_proxy(c, cxn, r)
        if not ensure_running(cxn, r, "apache2") and (restart or reload):  # (a start reads the new conf anyway)
            service(cxn, "apache2", "restart" if restart else "reload")
            r.changed("apache2 restarted" if restart else "apache2 reloaded")
        # what apache has read: a run cut short before the reload is seen by the next
        cxn.sudo(f"sh -c {q(f'mkdir -p {LOADED.parent} && touch {LOADED}')}", hide=True)
        port = c.config.frontend.port
        status, body = http_get(cxn, f"http://127.0.0.1:{port}/", attempts=10)
        if status != 200 or "<canvas" not in body:
            r.fail(f"the page does not answer on port {port}: {body[:300]}")
        page = hosts.http_url(cxn.host, port)
        r.checked(f"the page answers on port {port}: {page}")
        check_from_here(r, page, url)
        # frontend.domain: a certificate, https://, http:// redirected (docs/https.md); a failed
        # issuance stops here, with the HTTP site above working
        https.ensure_https(c, cxn, r, cxn.host)
    return r.result


def check_from_here(r, page, backend_url):
    """What the user's browser will do, from the operator's machine: load the page and its
    config.js from the front-end's address, then call the back-end from the page's origin."""
    where = "from here (check that the firewall or security group lets you in)"
    status, headers, body = fetch(f"{page}/", attempts=5)
    if status != 200 or "<canvas" not in body:
        r.fail(f"the page answers on the host but not at {page}/ {where}: {status or body}")
    r.checked(f"the page answers from here: {page}/")
    policy = headers.get("Content-Security-Policy") or ""
    origin = connect_origin(r, backend_url)
    if "frame-ancestors 'none'" not in policy or (origin and f" {origin};" not in policy):
        r.fail(f"{page}/ does not carry the security headers apache was given (Content-Security-Policy:"
               f" {policy or 'none'}): is something else answering on that port?")
    r.checked(f"the page carries its Content-Security-Policy (connect-src 'self'{f' {origin}' if origin else ''})")
    status, _, body = fetch(f"{page}/static/config.js")
    if status != 200 or json.dumps(backend_url) not in body:
        r.fail(f"{page}/static/config.js does not name the back-end {backend_url}: {status} {body[:300]}")
    r.checked(f"{page}/static/config.js names the back-end {shown(backend_url)}")
    if backend_url == SAME_ORIGIN:
        status, _, body = fetch(f"{page}/health", attempts=10)
        if status != 200 or '"model"' not in body:
            r.fail(f"{page}/health does not reach the back-end through apache: {status} {body[:300]}\n"
                   "  set it up with `fab deploy-backend`, and check that its port is open to the front-end")
        r.checked(f"the back-end answers through the page's origin: {page}/health")
        return
    status, headers, body = fetch(f"{backend_url}/health", headers={"Origin": page}, attempts=5)
    if status != 200:
        r.fail(f"the back-end {backend_url}/health does not answer {where}: {status or body}\n"
               "  set it up with `fab deploy-backend`, then re-run")
    allowed = headers.get("Access-Control-Allow-Origin")
    if allowed not in (page, "*"):
        r.fail(f"the back-end {backend_url} does not allow requests from the page's origin {page}"
               f" (Access-Control-Allow-Origin: {allowed}): set backend.cors_origins, or re-run"
               " `fab setup-backend` now that the front-end's address is known")
    r.checked(f"the back-end answers the page's origin: {backend_url}/health allows {page}")
