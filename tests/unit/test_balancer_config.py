"""The ALB stand-in's configuration (tasks/balancer.render): what it forwards, and with no member."""
import re

from tasks import balancer


def test_members_get_what_the_front_end_forwards_and_never_metrics():
    conf = balancer.render(["10.0.0.5:5000", "10.0.1.7:5000"])
    assert re.findall(r'ProxyPass "([^"]+)"', conf) == ["/predict/", "/health", "/feedback"]
    assert conf.count("BalancerMember") == 2 and "hcuri=/health" in conf
    assert "/metrics" not in conf


def test_no_member_answers_503_as_an_alb_with_no_healthy_target():
    conf = balancer.render([])
    assert re.findall(r'Redirect 503 "([^"]+)"', conf) == ["/predict/", "/health", "/feedback"]
    assert "ProxyPass" not in conf and "denied" not in conf  # 503, not 403
