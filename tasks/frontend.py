"""Guide, "Front-End Web Server": apache2 serving index.html and static/."""
import json
from pathlib import PurePosixPath

from invoke import task

from . import hosts
from .config import FILES, frontend_config_js
from .remote import Report, ensure_apt, ensure_file, ensure_running, fetch, http_get


def default_backend_url(c):
    """The back-end as the user's browser reaches it: its address, backend.port."""
    _, host, _, _ = hosts.address(c, "backend")
    return hosts.http_url(host, c.config.backend.port)


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
                 f"{docroot}/static/config.js -> back-end {url}")
        ensure_running(cxn, r, "apache2")
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
    r.checked(f"{page}/static/config.js names the back-end {backend_url}")
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
