"""Where there is no ALB (the machines tier, a test): apache's mod_proxy_balancer with
mod_proxy_hcheck stands in for it, its members the target group's registered targets, never a
hand-written list. `members` reads them from AWS; `render` writes the configuration; `Sync`
re-renders it and reloads apache gracefully whenever the registered set changes, as the ALB
follows registrations (push-model's deregister/register, the group's replacements).
"""
import os
import signal
import threading

from . import cloud, tier

BALANCER = "digits-backends"
PATHS = ("/predict/", "/health", "/feedback")  # what the front-end forwards; never /metrics


def members(c, address_of=None):
    """["host:port", ...] of the registered targets: their private address and backend.port, or
    what `address_of(instance)` says (a test maps moto's instances onto loopback ports)."""
    aws = {"ec2": cloud.client(c), "elb": cloud.client(c, "elbv2")}
    port = int(c.config.backend.port)
    found = tier.registered(c, aws)
    return [address_of(i) if address_of else f"{i['private_ip']}:{port}" for i in found]


def render(found, health_interval=1):
    """The balancer's configuration: /predict/, /health and /feedback to the members, each health-checked on
    /health (out at the first failure, back at the first pass). A request whose member cannot be
    connected to (refused, or no answer within `connectiontimeout`: a machine gone dark drops
    packets) is tried on another (maxattempts): nothing of it was sent, so even a POST is safe to
    send elsewhere. One the member took and never answered is not resent (a POST, as the ALB):
    504 after `timeout` (a prediction takes milliseconds; the ALB waits its idle timeout, 60 s)."""
    lines = [f'<Proxy "balancer://{BALANCER}">']
    lines += [f'    BalancerMember "http://{member}" hcmethod=GET hcuri=/health hcinterval={health_interval}'
              " hcfails=1 hcpasses=1 retry=1 connectiontimeout=2 timeout=10" for member in found]
    # A member that refused is out for a second (retry=1): the next attempt goes to another one,
    # even with 2 members (retry=0 let the retry land on the same dead one).
    lines += [f"    ProxySet lbmethod=byrequests maxattempts={max(1, len(found))}", "</Proxy>"]
    for path in PATHS:
        lines.append(f'ProxyPass "{path}" "balancer://{BALANCER}{path}"')
    if not found:  # no member: 503 from apache itself (mod_alias), as an ALB with no healthy target
        lines = [f'Redirect 503 "{path}"' for path in PATHS]
    return "\n".join(lines) + "\n"


class Sync:
    """A thread: every `interval` seconds, the registered targets; on a change, the file rewritten
    and apache (its PID in `pid_file`) reloaded gracefully (SIGUSR1: running requests finish)."""

    def __init__(self, c, path, pid_file, address_of=None, interval=0.3):
        self.c, self.path, self.pid_file, self.address_of, self.interval = c, path, pid_file, address_of, interval
        self.current, self.reloads = None, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def once(self):
        found = members(self.c, self.address_of)
        if found == self.current:
            return False
        self.path.write_text(render(found))
        self.current = found
        if self.pid_file.is_file():
            os.kill(int(self.pid_file.read_text().split()[0]), signal.SIGUSR1)
            self.reloads += 1
        return True

    def _run(self):
        while not self.stop.wait(self.interval):
            self.once()

    def __enter__(self):
        self.once()
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.stop.set()
        self.thread.join()
