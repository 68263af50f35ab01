"""Inventory parsing, URLs, names and modes: what a user types in fabric.yaml, read without a host."""
import pytest

from tasks import hosts, remote
from tasks.config import backend_mode, frontend_config_js, proxied
from tasks.errors import ConfigError
from tests.fixtures import context


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("ubuntu@203.0.113.12:2222", ("ubuntu", "203.0.113.12", 2222)),
        ("203.0.113.12", ("admin", "203.0.113.12", 22)),  # the defaults fill what is left out
        ("deploy@host.example", ("deploy", "host.example", 22)),
        ("[2001:db8::1]:2200", ("admin", "2001:db8::1", 2200)),
        ("2001:db8::1", ("admin", "2001:db8::1", 22)),  # a bare IPv6 address: its last group is no port
        ("a@b@c:1", ("a@b", "c", 1)),  # the last @ separates the user
    ],
)
def test_an_inventory_entry_is_user_host_and_port(spec, expected):
    assert hosts.parse(spec, "admin", 22) == expected


@pytest.mark.parametrize(
    ("host", "port", "path", "url"),
    [("203.0.113.11", 80, "/", "http://203.0.113.11/"), ("127.0.0.3", "8080", "", "http://127.0.0.3:8080"),
     ("2001:db8::1", 5000, "/health", "http://[2001:db8::1]:5000/health")],
)
def test_urls_leave_out_port_80_as_a_browser_shows_them(host, port, path, url):
    assert hosts.http_url(host, port, path) == url


def test_only_the_roles_given_are_the_inventory():
    c = context(ssh={"hosts": {"worker": "ubuntu@203.0.113.10", "frontend": "", "backend": None}})
    assert hosts.inventory(c) == {"worker": "ubuntu@203.0.113.10"}
    assert hosts.inventory(context()) == {}


@pytest.mark.parametrize("name", ["digits-backend", "myenv", "a.b_c-1"])
def test_plain_names_pass(name):
    assert remote.valid_name(name, "backend.service") == name


@pytest.mark.parametrize("name", ["digits; rm -rf ~", "../etc", ".", "..", "", "a b", "x/y", "é"])
def test_names_that_become_files_and_units_are_refused_as_bad_config(name):
    with pytest.raises(ConfigError) as error:
        remote.valid_name(name, "backend.service")
    assert error.value.code == 2
    assert error.value.message.startswith(f"bad config: backend.service = {name!r}")


@pytest.mark.parametrize(("mode", "expected"), [("proxied", True), ("PRIVATE ", True), ("public", False)])
def test_modes_are_read_loosely_and_say_whether_apache_forwards(mode, expected):
    c = context(backend={"mode": mode})
    assert backend_mode(c) == mode.strip().lower()
    assert proxied(c) is expected


def test_an_unknown_mode_is_bad_config_with_exit_2():
    with pytest.raises(ConfigError) as error:
        backend_mode(context(backend={"mode": "open"}))
    assert error.value.code == 2
    assert "backend.mode='open': one of proxied, private, public" in error.value.message


@pytest.mark.parametrize(
    ("url", "value"), [(None, "null"), ("/", '"/"'), ('http://x:5000/"', '"http://x:5000/\\""')]
)
def test_the_generated_config_js_names_the_back_end_as_a_js_string(url, value):
    assert f"window.DIGITS_CONFIG = {{ backendUrl: {value} }};" in frontend_config_js(url)
