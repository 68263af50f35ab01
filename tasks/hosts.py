"""The one SSH connection factory: role -> fabric.Connection.

A role's address comes from the explicit inventory when one is given
(`ssh.hosts.<role>: "user@host:port"` in fabric.yaml, plus `ssh.key`), or else
from the AWS state that `launch` wrote (public IP, `ssh.user`, `ssh.port`, the
saved key). Every remote task gets its connection here.
"""
import socket
import time

import fabric
import paramiko
from fabric import Connection
from invoke.exceptions import Exit

from .config import ROLES


def parse(spec, default_user, default_port):
    """Split "user@host:port" (user and port optional) into (user, host, port)."""
    user, _, hostport = spec.rpartition("@")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():  # no port given (or a bare IPv6 address)
        host, port = hostport, default_port
    return user or default_user, host.strip("[]"), int(port)


def address(c, role):
    """(user, host, port, key) of a role, from the inventory or the AWS state."""
    if role not in ROLES:
        raise Exit(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    ssh = c.config.ssh
    spec = (ssh.get("hosts") or {}).get(role)
    key = ssh.get("key")
    if spec:
        user, host, port = parse(spec, ssh.user, ssh.port)
        return user, host, port, key
    from . import state  # AWS: only needed when there is no inventory

    data = state.load(c) or {}
    instance = (data.get("instances") or {}).get(role) or {}
    host = instance.get("public_ip")
    if not host:
        raise Exit(
            f"no address for the {role}: give one in fabric.yaml "
            f"(ssh.hosts.{role}: user@host:port) or create the machines with `fab launch`"
        )
    return ssh.user, host, int(ssh.port), key or data.get("key_path")


def label(cxn):
    """How messages name a host: "backend (ubuntu@1.2.3.4:22)"."""
    return f"{cxn.role} ({cxn.user}@{cxn.host}:{cxn.port})"


class Host(Connection):
    """A Connection that knows its role and caches facts about its host.

    (Declared attributes: a Connection stores unknown attributes in its config.)
    """

    role = None
    facts = None


def connect(c, role):
    """An open Connection to a role's host, or an error that names the host."""
    user, host, port, key = address(c, role)
    timeout = int(c.config.ssh.connect_timeout)
    config = c.config.clone(into=fabric.Config)
    config.run.in_stream = False  # remote commands never read the operator's terminal
    cxn = Host(
        host,
        user=user,
        port=port,
        config=config,
        connect_timeout=timeout,
        connect_kwargs={
            "key_filename": [str(key)] if key else [],
            "look_for_keys": not key,
            "allow_agent": not key,
            "banner_timeout": timeout,
            "auth_timeout": timeout,
        },
    )
    cxn.role, cxn.facts = role, {}
    started = time.monotonic()
    try:
        cxn.open()
    except (OSError, socket.timeout, paramiko.SSHException) as error:
        silent = time.monotonic() - started >= timeout - 0.5 and not isinstance(error, paramiko.AuthenticationException)
        if isinstance(error, paramiko.ssh_exception.NoValidConnectionsError):
            error = next(iter(error.errors.values()))  # e.g. ConnectionRefusedError
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        if silent or isinstance(error, (socket.timeout, TimeoutError)) or "timed out" in reason.lower():
            reason = f"no answer within {timeout}s (ssh.connect_timeout)"
        raise Exit(
            f"cannot reach the {label(cxn)} over SSH: {reason}\n"
            f"  check the address, that sshd runs there, that port {port} is open to you"
            f" and that the key {key or '(agent/default keys)'} is authorised"
        ) from None
    return cxn
