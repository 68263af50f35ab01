"""Guide, "Front-End Web Server": apache2 serving index.html and static/, and (backend.mode
proxied or private) forwarding /predict/ and /health to the back-end's private address."""
import json
from pathlib import Path, PurePosixPath

from invoke import task

from . import hosts
from .config import FILES, frontend_config_js, proxied
from .remote import Report, ensure_apt, ensure_file, ensure_running, fetch, http_get, q, service, sh

PROXY = "digits-backend-proxy"  # /etc/apache2/conf-available/<PROXY>.conf
PROXY_TEMPLATE = Path(__file__).resolve().parent / "templates" / f"{PROXY}.conf"
LOADED = PurePosixPath("/var/lib/digits-frontend/proxy-loaded")  # touched once apache has read it
SAME_ORIGIN = "/"  # config.js's backendUrl: the page's own server


def default_backend_url(c):
    """The back-end as the user's browser reaches it: the page's own origin when apache
    forwards to it, else (backend.mode public) its address and backend.port."""
    if proxied(c):
        return SAME_ORIGIN
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


def ensure_proxy(c, cxn, r):
    """The forwarding enabled (proxied, private) or gone (public); True when apache must reload."""
    conf = PurePosixPath("/etc/apache2/conf-available") / f"{PROXY}.conf"
    enabled = f"/etc/apache2/conf-enabled/{PROXY}.conf"
    if not proxied(c):
        if not sh(cxn, f"test -e {q(conf)}", warn=True).ok:
            return False
        cxn.sudo(f"sh -c {q(f'a2disconf -q {PROXY} >/dev/null; rm -f {conf}')}", hide=True)
        return r.either(True, f"{conf} removed (backend.mode public: the page calls the back-end itself)")
    changed = False
    if not sh(cxn, "test -e /etc/apache2/mods-enabled/proxy_http.load", warn=True).ok:
        cxn.sudo("a2enmod -q proxy_http", hide=True)  # and mod_proxy, which it needs
        changed = r.either(True, "apache modules proxy, proxy_http enabled")
    target = proxy_target(c)
    text = PROXY_TEMPLATE.read_text().replace("@BACKEND@", target).encode()
    changed |= r.either(ensure_file(cxn, text, conf, sudo=True), f"{conf} -> back-end {target}")
    if not sh(cxn, f"test -e {q(enabled)}", warn=True).ok:
        cxn.sudo(f"a2enconf -q {PROXY}", hide=True)
        changed = r.either(True, f"apache conf {PROXY} enabled")
    if changed:
        check = cxn.sudo("apache2ctl configtest", hide=True, warn=True)
        if not check.ok:  # never left enabled: apache's next restart would fail on it
            cxn.sudo(f"a2disconf -q {PROXY}", hide=True, warn=True)
            r.fail(f"apache refuses the new configuration (disabled again): "
                   f"{(check.stderr or check.stdout).strip()[-500:]}")
    unread = sh(cxn, f"test ! -e {q(LOADED)} -o {q(conf)} -nt {q(LOADED)}", warn=True).ok
    return changed or unread


def page_files():
    """(local file, path under the docroot) of the page, except the generated config.js."""
    yield FILES / "index.html", "index.html"
    for path in sorted((FILES / "static").rglob("*")):
        relative = path.relative_to(FILES).as_posix()
        if path.is_file() and relative != "static/config.js":
            yield path, relative


@task(help={"backend-url": "URL the page calls for predictions (default: http://<back-end address>:<backend.port>)"})
def setup_frontend(c, backend_url=None):
    """Install apache2, deploy the page with its generated config.js, check it as a browser will."""
    url = backend_url or default_backend_url(c)
    with Report(c, "setup-frontend", "frontend") as r:
        cxn = r.cxn
        ensure_apt(cxn, r, ["apache2"], c.config.remote.apt_cache_valid)
        docroot = PurePosixPath(c.config.frontend.docroot)
        for local, relative in page_files():
            r.either(ensure_file(cxn, local, docroot / relative, sudo=True), f"{docroot / relative}")
        config_js = frontend_config_js(url).encode()
        r.either(ensure_file(cxn, config_js, docroot / "static/config.js", sudo=True),
                 f"{docroot}/static/config.js -> back-end {shown(url)}")
        reload = ensure_proxy(c, cxn, r)
        if not ensure_running(cxn, r, "apache2") and reload:  # (a start reads the new conf anyway)
            service(cxn, "apache2", "reload")
            r.changed("apache2 reloaded")
        if proxied(c):  # what apache has read: a run cut short before the reload is seen by the next
            cxn.sudo(f"sh -c {q(f'mkdir -p {LOADED.parent} && touch {LOADED}')}", hide=True)
        port = c.config.frontend.port
        status, body = http_get(cxn, f"http://127.0.0.1:{port}/", attempts=10)
        if status != 200 or "<canvas" not in body:
            r.fail(f"the page does not answer on port {port}: {body[:300]}")
        page = hosts.http_url(cxn.host, port)
        r.checked(f"the page answers on port {port}: {page}")
        check_from_here(r, page, url)
    return r.result


def check_from_here(r, page, backend_url):
    """What the user's browser will do, from the operator's machine: load the page and its
    config.js from the front-end's address, then call the back-end from the page's origin."""
    where = "from here (check that the firewall or security group lets you in)"
    status, _, body = fetch(f"{page}/", attempts=5)
    if status != 200 or "<canvas" not in body:
        r.fail(f"the page answers on the host but not at {page}/ {where}: {status or body}")
    r.checked(f"the page answers from here: {page}/")
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
