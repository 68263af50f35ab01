"""backend.mode public's edge, read without a host: where gunicorn binds, and the conf apache gets."""
import pytest

from tasks import backend, public_edge
from tasks.errors import ConfigError
from tests.fixtures import context


def test_gunicorn_leaves_the_public_port_to_apache_in_public_mode_only():
    assert public_edge.app_address(context(backend={"mode": "public"})) == ("127.0.0.1", 5001)
    for mode in ("proxied", "private"):
        assert public_edge.app_address(context(backend={"mode": mode})) == ("0.0.0.0", 5000)
    env = backend.environment(context(backend={"mode": "public"}), {"current": "/m", "home": "/h", "state": "/s"},
                              public_edge.app_address(context(backend={"mode": "public"}))).decode()
    assert "HOST=127.0.0.1\nPORT=5001\n" in env
    with pytest.raises(ConfigError, match="backend.app_port=5000 is backend.port"):
        public_edge.app_address(context(backend={"mode": "public", "app_port": 5000}))


def test_apaches_own_refusals_name_only_the_pages_origins():
    assert public_edge.cors("*") == (".+", "*")
    pattern, allow = public_edge.cors("http://203.0.113.11, https://digits.example.org:8443")
    assert pattern == r"http://203\.0\.113\.11|https://digits\.example\.org:8443"
    assert allow == "%{DIGITS_PAGE_ORIGIN}e"
    with pytest.raises(ConfigError, match='backend.cors_origins: http://x" evil is not an origin'):
        public_edge.cors('http://x" evil')


def test_the_conf_forwards_the_apps_routes_to_the_loopback_with_the_limits():
    c = context(backend={"mode": "public", "port": 5000, "app_port": 5001}, frontend={"rate_limit": 5})
    text, what = public_edge.render(c, "http://203.0.113.11")
    assert what == "port 5000 -> gunicorn on 127.0.0.1:5001; /predict/ at most 5/s per address"
    assert "Listen 5000\n" in text and "<VirtualHost *:5000>" in text and "@" not in text.replace("%{", "")
    forwarded = sorted(line.split()[1] for line in text.splitlines() if line.strip().startswith("<Location "))
    assert forwarded == ['"/feedback">', '"/health">', '"/predict/">']  # never /metrics
    assert text.count('"http://127.0.0.1:5001/') == 6 and "ProxyPass " not in text.replace("    ProxyPass ", "")
    assert "QS_ClientEventLimitCount 30 6 DIGITS_BACKEND_LIMIT" in text
    unlimited, what = public_edge.render(context(backend={"mode": "public"}, frontend={"rate_limit": 0}), "*")
    assert what.endswith("/predict/ not rate limited")
    limited = [line for line in unlimited.splitlines() if not line.lstrip().startswith("#")
               and ("DIGITS_BACKEND_LIMIT" in line or "Retry-After" in line)]
    assert limited == [] and unlimited.count("# (frontend.rate_limit 0) ") == 3
