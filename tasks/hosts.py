"""The one SSH connection factory: role -> fabric.Connection.

A role's address comes from the explicit inventory when one is given
(`ssh.hosts.<role>: "user@host:port"` in fabric.yaml, plus `ssh.key`), or else
from the AWS state that `launch` wrote (public IP, `ssh.user`, `ssh.port`, the
saved key), rebuilt from AWS tags when that file has lost the address. Every
remote task gets its connection here, and with it the stack's known host keys.
In backend.mode private the back-end has no public address: it is reached at its
private one, through the front-end as an SSH jump host (Fabric's `gateway`).
"""
import threading
import time
from pathlib import Path

import fabric
import paramiko
from fabric import Connection
from invoke.exceptions import Exit

from . import cloud
from .config import ROLES, backend_mode
from .errors import HostKeyChanged


def parse(spec, default_user, default_port):
    """Split "user@host:port" (user and port optional) into (user, host, port)."""
    user, _, hostport = spec.rpartition("@")
    host, sep, port = hostport.rpartition(":")
    bare_ipv6 = hostport.count(":") > 1 and not hostport.startswith("[")  # 2001:db8::1 has no port
    if not sep or not port.isdigit() or bare_ipv6:
        host, port = hostport, default_port
    return user or default_user, host.strip("[]"), int(port)


def http_url(host, port, path=""):
    """http://host[:port]path, leaving out the default port 80 (what a browser shows)."""
    host = f"[{host}]" if ":" in host else host  # IPv6 literal
    return f"http://{host}{'' if int(port) == 80 else f':{port}'}{path}"


def inventory(c):
    """The roles given explicitly in ssh.hosts ({} when the hosts come from AWS)."""
    return {role: spec for role, spec in (c.config.ssh.get("hosts") or {}).items() if spec}


def address(c, role, refresh=True):
    """(user, host, port, key) of a role, from the inventory or the AWS state; with
    `refresh`, a state file without that address is first rebuilt from AWS."""
    if role not in ROLES:
        raise Exit(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    ssh = c.config.ssh
    key = Path(ssh.key).expanduser() if ssh.get("key") else None  # "~/.ssh/digits.pem" works
    given = inventory(c)
    if role in given:
        user, host, port = parse(given[role], ssh.user, ssh.port)
        return user, host, port, key
    missing = (f"no address for the {role}: give one in fabric.yaml "
               f"(ssh.hosts.{role}: user@host:port) or create the machines with `fab launch`")
    if given:  # an inventory without this role: never ask AWS behind the user's back
        raise Exit(missing)
    host, data = _from_state(c, role, "private_ip" if gateway_role(c, role) else "public_ip", refresh, missing)
    saved = data.get("key_path")
    return ssh.user, host, int(ssh.port), key or (Path(saved).expanduser() if saved else None)


def private_address(c, role):
    """Where the stack's other machines reach a role: its private address in AWS (the
    security groups name each other there), or its inventory address."""
    given = inventory(c)
    if role in given:
        return parse(given[role], c.config.ssh.user, c.config.ssh.port)[1]
    missing = f"no private address for the {role}: create the machines with `fab launch`"
    if given:  # as in `address`: an inventory is never completed from AWS
        raise Exit(f"{missing}, or give ssh.hosts.{role} in fabric.yaml")
    return _from_state(c, role, "private_ip", True, missing)[0]


def _from_state(c, role, kind, refresh, missing):
    """(address, state) of a role from the AWS state; a state file without it is first
    rebuilt from AWS when `refresh`."""
    from . import state  # AWS: only needed when there is no inventory

    data = state.load(c) or {}
    host = _ip(data, role, kind)
    if not host and refresh:
        # The state file is a cache: AWS's tags are the truth (a lost or stale file is rebuilt).
        try:
            data = state.refresh(c)
        except Exit as error:
            raise Exit(f"{missing}\n  (the state file has none, and reading it back from AWS failed:"
                       f" {error.message})") from None
        host = _ip(data, role, kind)
    if not host:
        raise Exit(missing)
    return host, data


def _ip(data, role, kind):
    return ((data.get("instances") or {}).get(role) or {}).get(kind)


def gateway_role(c, role):
    """The role whose host is the SSH jump host to this one, or None (a direct connection)."""
    return "frontend" if role == "backend" and backend_mode(c) == "private" else None


def label(cxn):
    """How messages name a host: "backend (ubuntu@1.2.3.4:22)", plus " via frontend" through a jump host."""
    via = f" via {cxn.gateway.role}" if isinstance(cxn.gateway, Host) else ""
    return f"{cxn.role} ({cxn.user}@{cxn.host}:{cxn.port}{via})"


# --- Known hosts: trust on first use, per stack ---------------------------------


def known_hosts_file(c):
    """ssh.known_hosts, "{stack}" standing for aws.stack: one file per stack."""
    return Path(c.config.ssh.known_hosts.format(stack=cloud.stack(c))).expanduser()


class TrustOnFirstUse(paramiko.MissingHostKeyPolicy):
    """Like `ssh -o StrictHostKeyChecking=accept-new`: record an unknown host's key;
    paramiko itself refuses a key that differs from the recorded one."""

    lock = threading.Lock()  # tasks may connect from several threads (a tunnel, a fetch)

    def __init__(self, path):
        self.path = path

    def missing_host_key(self, client, hostname, key):
        with self.lock:
            keys = paramiko.HostKeys()
            if self.path.is_file():
                keys.load(str(self.path))  # another connection may have recorded it meanwhile
            recorded = (keys.lookup(hostname) or {}).get(key.get_name())
            if recorded is not None and recorded != key:
                raise paramiko.BadHostKeyException(hostname, key, recorded)
            keys.add(hostname, key.get_name(), key)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temp = self.path.with_name(f".{self.path.name}.tmp")
            keys.save(str(temp))
            temp.replace(self.path)  # atomic: a reader sees the old file or the new one
        client.get_host_keys().add(hostname, key.get_name(), key)
        print(f"  known host: recorded {hostname}'s key {key.fingerprint} in {self.path}", flush=True)


def trust(cxn, path):
    """Check the host's key against `path`, recording it there on first contact."""
    if path.is_file():
        cxn.client.load_host_keys(str(path))
    cxn.client.set_missing_host_key_policy(TrustOnFirstUse(path))


# --- The factory ----------------------------------------------------------------


class Host(Connection):
    """A Connection that knows its role and caches facts about its host.

    (Declared attributes: a Connection stores unknown attributes in its config.)
    """

    role = None
    facts = None
    keepalive = 0  # seconds between SSH keepalives (ssh.keepalive); 0: none

    def open(self):
        """Connect; every transport, a reconnection's too, sends keepalives (NAT idle timeouts)."""
        result = super().open()
        if self.keepalive and self.transport is not None:
            self.transport.set_keepalive(int(self.keepalive))
        return result

    def open_gateway(self):
        """The tunnel through the jump host, as Fabric opens it, but within ssh.connect_timeout
        (Fabric waits for paramiko's default, an hour, for the jump host to reach this one)."""
        self.gateway.open()
        return self.gateway.transport.open_channel(
            "direct-tcpip", dest_addr=(self.host, int(self.port)), src_addr=("", 0), timeout=self.connect_timeout)

    def close(self):
        super().close()
        if isinstance(self.gateway, Connection):  # the jump host's connection is ours too
            self.gateway.close()


def connect(c, role):
    """An open Connection to a role's host, or an error that names the host."""
    user, host, port, key = address(c, role)
    timeout = int(c.config.ssh.connect_timeout)
    config = c.config.clone(into=fabric.Config)
    config.run.in_stream = False  # remote commands never read the operator's terminal
    jump = gateway_role(c, role)
    cxn = Host(
        host,
        user=user,
        port=port,
        config=config,
        gateway=connect(c, jump) if jump else None,  # the same checks (host key...) as any host
        connect_timeout=timeout,
        connect_kwargs={
            "key_filename": [str(key)] if key else [],
            "look_for_keys": not key,
            "allow_agent": not key,
            "banner_timeout": timeout,
            "auth_timeout": timeout,
        },
    )
    cxn.role, cxn.facts, cxn.keepalive = role, {}, int(c.config.ssh.get("keepalive") or 0)
    known = known_hosts_file(c)
    trust(cxn, known)
    started = time.monotonic()
    try:
        cxn.open()
    except paramiko.BadHostKeyException as error:
        cxn.close()
        entry = host if port == 22 else f"[{host}]:{port}"  # how known_hosts names it
        raise HostKeyChanged(
            f"refusing to connect to the {label(cxn)}: its host key has changed since it was"
            f" recorded in {known}\n  got {error.key.get_name()} {error.key.fingerprint},"
            f" recorded {error.expected_key.fingerprint}\n"
            f"  someone may be intercepting the connection, or the machine was replaced: if you know"
            f" it was replaced, delete the line for {entry} from {known} and re-run"
        ) from None
    except (OSError, paramiko.SSHException) as error:  # (a timeout is an OSError)
        cxn.close()
        silent = time.monotonic() - started >= timeout - 0.5 and not isinstance(error, paramiko.AuthenticationException)
        if isinstance(error, paramiko.ssh_exception.NoValidConnectionsError):
            error = next(iter(error.errors.values()))  # e.g. ConnectionRefusedError
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        if silent or isinstance(error, TimeoutError) or "timed out" in reason.lower():
            reason = f"no answer within {timeout}s (ssh.connect_timeout)"
        raise Exit(
            f"cannot reach the {label(cxn)} over SSH: {reason}\n"
            f"  check the address, that sshd runs there, that port {port} is open to"
            f" {'the ' + jump if jump else 'you'}"
            f" and that the key {key or '(agent/default keys)'} is authorised"
            + ("" if role in inventory(c) or jump else f"\n  {ssh_hint(c, role)}")
        ) from None
    return cxn


def ssh_hint(c, role):
    """What to check when an AWS machine's SSH stays silent: who its security group lets in (as
    the state file last read it from AWS), and how to change that."""
    from . import state  # AWS: only for machines that come from it

    if gateway_role(c, role):
        return (f"the {role} takes SSH from the front-end's group only: check that the front-end answers,"
                " then re-run `fab launch`")
    allowed = state.load(c).get("ssh_sources", {}).get(role) or ["(unknown: run `fab status`)"]
    return (f"its security group allows SSH (22) from {', '.join(allowed)} (aws.ssh_cidr, else your address as"
            f" detected by `fab create-vpc`): if you are not there now (a VPN, a proxy, a new address), set"
            f" aws.ssh_cidr or re-run `fab create-vpc` to follow your address; if you are, the machine may still"
            f" be booting: re-run `fab launch`")
