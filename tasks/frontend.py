"""Guide, "Front-End Web Server": apache2 serving index.html and static/."""
from pathlib import PurePosixPath

from invoke import task

from . import hosts
from .config import FILES, frontend_config_js
from .remote import Report, ensure_apt, ensure_file, ensure_running, http_get


def default_backend_url(c):
    """The back-end as the user's browser reaches it: its address, backend.port."""
    _, host, _, _ = hosts.address(c, "backend")
    return f"http://{host}:{c.config.backend.port}"


def page_files():
    """(local file, path under the docroot) of the page, except the generated config.js."""
    yield FILES / "index.html", "index.html"
    for path in sorted((FILES / "static").rglob("*")):
        relative = path.relative_to(FILES).as_posix()
        if path.is_file() and relative != "static/config.js":
            yield path, relative


@task(help={"backend-url": "URL the page calls for predictions (default: http://<back-end address>:<backend.port>)"})
def setup_frontend(c, backend_url=None):
    """Install apache2, deploy the page with its generated config.js, check port 80."""
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
        r.checked(f"the page answers on port {port}: http://{cxn.host}" + ("" if port == 80 else f":{port}"))
    return r.result
