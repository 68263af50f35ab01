"""backend.mode public: apache on the back-end host between the internet and gunicorn.

In `public` mode the page calls the back-end's port itself. gunicorn's sync workers must not
face the internet (a client dribbling its body holds a worker; two of them hold the service), so
apache takes that port (templates/digits-backend-edge.conf: header/body timeouts, bodies read in
full before forwarding, a body limit, connections and /predict/ calls per address limited, JSON
refusals with CORS) and gunicorn listens on 127.0.0.1:backend.app_port only. Other modes: no
apache on the back-end, gunicorn on backend.port (open to the front-end only).
"""
import re
from pathlib import PurePosixPath

from . import frontend
from .config import FILES, backend_mode
from .errors import ConfigError
from .remote import ensure_apt, ensure_file, ensure_running, http_get, q, service, sh

EDGE = "digits-backend-edge"  # /etc/apache2/conf-available/<EDGE>.conf on the back-end host
TEMPLATE = frontend.EDGE_TEMPLATE.parent / f"{EDGE}.conf"
ERRORS = PurePosixPath("/var/www/digits-backend-edge")  # apache's JSON refusals (Files/static/*.json)
ERROR_FILES = ("too-large.json", "too-many-requests.json", "backend-down.json")
LOADED = PurePosixPath("/var/lib/digits-backend/edge-loaded")  # touched once apache has read the conf
MODULES = ["proxy_http", "request", "headers", "reqtimeout", "setenvif", "alias"]
ORIGIN = re.compile(r"https?://(" + frontend.ORIGIN_HOST.pattern + ")")


def in_front(c):
    """True when apache fronts gunicorn on the back-end host (backend.mode public)."""
    return backend_mode(c) == "public"


def app_address(c):
    """(host, port) gunicorn binds: 127.0.0.1:backend.app_port behind apache (public mode), else
    0.0.0.0:backend.port (the security group lets the front-end only in)."""
    b = c.config.backend
    if not in_front(c):
        return "0.0.0.0", int(b.port)  # noqa: S104  (the security group lets the front-end only in)
    if int(b.app_port) == int(b.port):
        raise ConfigError(f"backend.app_port={b.app_port} is backend.port: in backend.mode public apache"
                          " answers on backend.port and forwards to gunicorn on app_port, another port")
    return "127.0.0.1", int(b.app_port)


def cors(origins):
    """(the Origin regex apache matches, the Access-Control-Allow-Origin it sends) for its own
    refusals, from backend.cors_origins' value ("*" or comma-separated origins)."""
    listed = [o.strip() for o in str(origins).split(",") if o.strip()]
    if not listed or "*" in listed:
        return ".+", "*"
    bad = [o for o in listed if not ORIGIN.fullmatch(o)]
    if bad:
        raise ConfigError(f"backend.cors_origins: {', '.join(bad)} is not an origin (http(s)://host[:port])")
    return "|".join(re.escape(o) for o in listed), "%{DIGITS_PAGE_ORIGIN}e"


def render(c, origins):
    """The edge's conf for this back-end; (text, a line saying what it holds)."""
    port, (_, app_port) = int(c.config.backend.port), app_address(c)
    pattern, allow = cors(origins)
    limits = frontend.edge_limits(c)
    values = {"@PORT@": str(port), "@APP_PORT@": str(app_port), "@ERRORS@": str(ERRORS),
              "@ORIGINS@": pattern, "@ALLOW_ORIGIN@": allow, **limits}
    text = TEMPLATE.read_text()
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    if limits["@RATE_WINDOW@"] == "0":  # frontend.rate_limit 0: no limit
        text = "\n".join(f"# (frontend.rate_limit 0) {line}" if line.lstrip().startswith(UNLIMITED) else line
                         for line in text.splitlines()) + "\n"
    rate = (f"/predict/ at most {limits['@RATE_LIMIT@']}/s per address" if limits["@RATE_WINDOW@"] != "0"
            else "/predict/ not rate limited")
    return text, f"port {port} -> gunicorn on 127.0.0.1:{app_port}; {rate}"


UNLIMITED = ("QS_ClientEventLimitCount", "SetEnvIf Request_URI", "Header always set Retry-After")


def holder(cxn, port):
    """What listens on `port` on the host (its process name), or None."""
    out = cxn.sudo(f"ss -ltnpH 'sport = :{int(port)}'", hide=True, warn=True).stdout
    found = re.search(r'users:\(\("([^"]+)"', out)
    return (found.group(1) if found else "something") if out.strip() else None


def ensure(c, r, origins):
    """Apache on backend.port in front of gunicorn, its conf current and read; True when changed.
    Called once gunicorn has left backend.port for 127.0.0.1:app_port."""
    cxn = r.cxn
    ensure_apt(cxn, r, ["apache2", "libapache2-mod-qos"], c.config.remote.apt_cache_valid)
    changed = False
    for name in ERROR_FILES:
        changed |= r.either(ensure_file(cxn, FILES / "static" / name, ERRORS / name, sudo=True), f"{ERRORS / name}")
    text, what = render(c, origins)
    reload = frontend.ensure_qos(cxn, r)
    reload |= frontend.ensure_conf(cxn, r, EDGE, text, MODULES, what, loaded=LOADED)
    port = int(c.config.backend.port)
    held = holder(cxn, port)
    if held and held != "apache2":  # apache would fail to bind it, and stop altogether
        cxn.sudo(f"a2disconf -q {EDGE}", hide=True, warn=True)
        r.fail(f"port {port} is held by {held}, not apache: the back-end's service must have left it for"
               f" 127.0.0.1:{app_address(c)[1]} (re-run `fab setup-backend`; `sudo ss -ltnp` shows who holds it)")
    if not ensure_running(cxn, r, "apache2") and reload:
        service(cxn, "apache2", "restart")  # (not reload: mod_qos takes new per-client limits at a start only)
        changed = r.either(True, "apache2 restarted")
    cxn.sudo(f"sh -c {q(f'mkdir -p {LOADED.parent} && touch {LOADED}')}", hide=True)
    return changed or reload


def check(c, r):
    """/health through apache on the public port, from the host."""
    port, (_, app_port) = int(c.config.backend.port), app_address(c)
    status, body = http_get(r.cxn, f"http://127.0.0.1:{port}/health", attempts=10, delay=0.5)
    if status != 200 or '"model"' not in body:
        r.fail(f"apache on port {port} does not forward /health to gunicorn on 127.0.0.1:{app_port}:"
               f" {status} {body[:300]}")
    r.checked(f"port {port} answers /health through apache (gunicorn on 127.0.0.1:{app_port} only)")


def remove(c, r):
    """No apache in front of gunicorn (a mode other than public): the conf gone and apache restarted,
    so that backend.port is free for gunicorn again; True when changed."""
    cxn = r.cxn
    conf = PurePosixPath("/etc/apache2/conf-available") / f"{EDGE}.conf"
    if not sh(cxn, f"test -e {q(conf)}", warn=True).ok:
        return False
    cxn.sudo(f"sh -c {q(f'a2disconf -q {EDGE} >/dev/null; rm -f {conf}')}", hide=True)
    if service(cxn, "apache2", "status").ok:
        service(cxn, "apache2", "restart")  # (mod_qos drops a per-client limit at a start only)
    return r.either(True, f"{conf} removed, apache2 restarted (backend.mode {backend_mode(c)}: gunicorn"
                          f" answers on port {int(c.config.backend.port)} itself)")
