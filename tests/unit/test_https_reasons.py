"""A failed issuance is named by its cause, from certbot's own words (tasks/https.py)."""
import pytest

from tasks.https import why_not_issued

LE = "https://acme-v02.api.letsencrypt.org/directory"
RATE = ("An unexpected error occurred:\nError creating new order :: too many certificates (5) already issued for"
        " this exact set of domains in the last 168 hours: digits.example.org, retry after 2026-12-04T10:00:00Z")
CHALLENGE = ("Certbot failed to authenticate some domains (authenticator: apache). The Certificate Authority"
             " reported these problems:\n  Domain: digits.example.org\n  Type:   dns\n  Detail: DNS problem:"
             " NXDOMAIN looking up A for digits.example.org")
UNREACHABLE = ("An unexpected error occurred:\nrequests.exceptions.ConnectionError: HTTPSConnectionPool("
               "host='acme-v02.api.letsencrypt.org', port=443): Max retries exceeded with url: /directory")


def test_each_cause_gets_its_reason_and_what_to_do():
    assert why_not_issued(RATE, "digits.example.org", "203.0.113.9", LE).startswith("the CA's rate limit")
    dns = why_not_issued(CHALLENGE, "digits.example.org", "203.0.113.9", LE)
    assert "make the DNS name digits.example.org point to the front-end's public address 203.0.113.9" in dns
    assert why_not_issued(UNREACHABLE, "digits.example.org", "203.0.113.9", LE).startswith(f"the CA at {LE} cannot")
    assert why_not_issued("ValueError: Requesting 127.0.0.1/dir: Connection refused", "d.test", "127.0.0.3",
                          "https://127.0.0.1:1/dir").startswith("the CA at https://127.0.0.1:1/dir cannot")
    assert why_not_issued("something else", "d.test", "127.0.0.3", LE).startswith("certbot failed")


@pytest.mark.parametrize(
    ("frontend", "backend", "says"),
    [({"domain": "not a name"}, {}, "frontend.domain='not a name' is not a DNS name"),
     ({"domain": "digits.example.org", "acme_server": "http://ca"}, {}, "an ACME directory https:// URL"),
     ({"domain": "digits.example.org"}, {"mode": "public"}, "browsers block mixed content")],
)
def test_https_settings_are_refused_as_bad_config_before_any_connection(frontend, backend, says):
    from tasks import https
    from tasks.errors import ConfigError
    from tests.fixtures import context

    with pytest.raises(ConfigError) as error:
        https.settings(context(frontend=frontend, backend=backend))
    assert error.value.code == 2 and says in error.value.message


def test_no_domain_is_plain_http():
    from tasks import https
    from tests.fixtures import context

    assert https.settings(context()) == (None, None, None, None)
