"""The machines themselves (tests/fixtures/machines.py): systemd as PID 1, a first boot by
cloud-init like an EC2 instance's, their own cgroup and network. The tasks run on them in
tests/test_machines_deploy.py."""
import base64
import time

import paramiko
import pytest

from tests.fixtures.machines import PREFIX, VPC, cgroup_roots, nft_rules, run

pytestmark = pytest.mark.slow


def ssh(lab, machine, command, timeout=60):
    """(exit status, output) of `command` as `ubuntu` over SSH, with the key pair cloud-init installed."""
    client = paramiko.SSHClient()  # the host key the machine made, read from its disk: nothing else accepted
    public = machine.exec("cat", "/etc/ssh/ssh_host_ed25519_key.pub").stdout.split()
    client.get_host_keys().add(machine.ip, public[0], paramiko.Ed25519Key(data=base64.b64decode(public[1])))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(machine.ip, username="ubuntu", key_filename=str(lab.key), timeout=10,
                   allow_agent=False, look_for_keys=False)
    try:
        _, stdout, stderr = client.exec_command(command, timeout=timeout)
        status = stdout.channel.recv_exit_status()
        return status, stdout.read().decode() + stderr.read().decode()
    finally:
        client.close()


@pytest.fixture(scope="module")
def pair(machine_lab):
    """Two machines on the public subnet, booted in parallel."""
    import threading

    found = {}

    def boot(name, ip):
        found[name] = machine_lab.machine(name, ip)

    threads = [threading.Thread(target=boot, args=item) for item in (("m1", "192.168.0.61"), ("m2", "192.168.0.62"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    yield found["m1"], found["m2"]
    for name in ("m1", "m2"):
        machine_lab.remove(name)


def test_systemd_is_pid_1_and_the_system_is_running(pair):
    for machine in pair:
        assert machine.wait_until_running() == "running"
        assert machine.exec("cat", "/proc/1/comm").stdout.strip() == "systemd"
        print(f"{machine.id}: SSH answered {machine.boot_seconds:.1f}s after nspawn started")


def test_cloud_init_made_ubuntu_with_the_key_and_sudo_and_new_host_keys(machine_lab, pair):
    m1, m2 = pair
    status, out = ssh(machine_lab, m1, "id -un; sudo -n id -u; cloud-init status; hostname")
    assert status == 0 and out.split() == ["ubuntu", "0", "status:", "done", "m1"], out
    keys = [m.exec("cat", "/etc/ssh/ssh_host_ed25519_key.pub").stdout.split()[1] for m in pair]
    assert keys[0] != keys[1]  # made on each machine's first boot, not in the image
    assert not list((machine_lab.image / "etc/ssh").glob("ssh_host_*"))


def test_like_a_fresh_ami_nothing_more_is_installed(machine_lab, pair):
    status, out = ssh(machine_lab, pair[0], "dpkg-query -W -f='${Package} ${Status}\\n' apache2 python3-venv"
                                           " python3-pip 2>/dev/null; command -v pip pip3 apache2 || true")
    assert status == 0 and " installed" not in out and "/pip" not in out, out
    status, out = ssh(machine_lab, pair[0], "python3 -c 'import ensurepip' 2>&1; true")
    assert "No module named" in out  # Debian's python3 without python3-venv: `python3 -m venv` fails


def test_each_machine_has_its_own_cgroup(pair):
    for machine in pair:
        for root in cgroup_roots():
            procs = set()
            for procs_file in (root / machine.name).rglob("cgroup.procs"):
                procs |= {int(pid) for pid in procs_file.read_text().split()}
            assert machine.leader() in procs and machine._process.pid in procs
            other = pair[1] if machine is pair[0] else pair[0]
            assert other.leader() not in procs


def test_the_network_lets_through_the_registries_and_drops_the_rest(machine_lab, pair):
    m1, m2 = pair
    # The machines reach each other on their subnet, and the registries through NAT.
    status, out = ssh(machine_lab, m1, f"python3 -c \"import socket; socket.create_connection(('{m2.ip}', 22), 5)\"")
    assert status == 0, out
    status, out = ssh(machine_lab, m1, "python3 -c \"import urllib.request as u;"
                                       " print(u.urlopen('https://pypi.org/simple/pip/', timeout=30).status)\"")
    assert status == 0 and out.strip() == "200", out
    # What leaves is only DNS to the resolvers and TCP 80/443 beyond the private ranges.
    rules = run("nft", "list", "table", "ip", "dgt").stdout
    private = next(line for line in rules.splitlines() if "ip daddr {" in line and line.endswith(" drop"))
    assert private.split()[:2] == ["iifname", '"dgt-*"'], rules
    assert all(cidr in private for cidr in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")), rules
    for expected in ('iifname "dgt-*" tcp dport { 80, 443 } accept', 'iifname "dgt-*" counter packets'):
        assert expected in rules, rules
    assert nft_rules(list(machine_lab.subnets.values())).count("drop") >= 3
    # A test range never falls onto the default route: the VPC is blackholed here.
    assert run("ip", "route", "show", VPC).stdout.startswith("blackhole 192.168.0.0/16")
    route = run("ip", "route", "get", "192.168.7.9", check=False)
    assert route.returncode != 0 or "blackhole" in route.stdout + route.stderr


def test_reboot_inside_comes_back(machine_lab, pair):
    m2 = pair[1]
    boots = m2.boots
    ssh(machine_lab, m2, "sudo systemctl reboot")
    deadline = time.monotonic() + 60
    while m2.boots == boots and time.monotonic() < deadline:
        time.sleep(0.2)
    started = time.monotonic()
    m2.wait_for_ssh(60)
    assert m2.boots == boots + 1
    assert m2.wait_until_running() == "running"
    print(f"{m2.id}: rebooted, SSH again {time.monotonic() - started:.1f}s after nspawn restarted")


def test_stop_keeps_the_disk_and_start_boots_it_again(machine_lab, pair):
    m1 = pair[0]
    ssh(machine_lab, m1, "echo kept > ~/marker")
    m1.stop()
    assert m1._process.poll() is not None
    m1.start()
    status, out = ssh(machine_lab, m1, "cat ~/marker; cloud-init status --wait | tail -1")
    assert status == 0 and out.split() == ["kept", "status:", "done"], out


def test_names_have_the_prefix(pair):
    links = run("ip", "-o", "link", "show").stdout
    for machine in pair:
        assert f"{PREFIX}{machine.name}@" in links
        assert machine.id in run("ip", "netns", "list").stdout
