"""`launch`, `status`, `stop-worker`, `start-worker` against a moto server."""
import json
import os
import stat
import subprocess
import sys

import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from tasks import cloud, instances, network, state
from tasks.config import ROOT
from tests.fixtures.moto import NEWEST_NOBLE, OLDER_NOBLE, REGION, free_port, stack_resources

TYPES = {"worker": "m5.xlarge", "frontend": "t2.micro", "backend": "t2.micro"}


def role_of(resource):
    return next(t["Value"] for t in resource["Tags"] if t["Key"] == "Role")


@pytest.fixture
def network_ready(aws_context):
    """Factory: a Context whose stack already has its network."""

    def build(**sections):
        c = aws_context(**sections)
        network.create_vpc(c)
        return c

    return build


def test_launch_status_stop_start(network_ready, ec2, capsys):
    c = network_ready()
    capsys.readouterr()
    result = instances.launch(c)

    found = stack_resources(ec2, c.config.aws.stack)
    machines = {role_of(i): i for i in found["instances"]}
    addresses = {role_of(a): a for a in found["addresses"]}
    groups = {role_of(g): g["GroupId"] for g in found["security_groups"]}
    assert {role: i["InstanceType"] for role, i in machines.items()} == TYPES
    for role, machine in machines.items():
        assert machine["State"]["Name"] == "running"
        assert machine["ImageId"] == NEWEST_NOBLE  # moto has no Canonical SSM parameter: the fallback
        assert machine["SubnetId"] == found["subnets"][0]["SubnetId"]
        assert [g["GroupId"] for g in machine["SecurityGroups"]] == [groups[role]]
        assert machine["KeyName"] == f"{c.config.aws.stack}-key"
        assert addresses[role]["InstanceId"] == machine["InstanceId"]
        assert machine["PublicIpAddress"] == addresses[role]["PublicIp"]

    key = state.key_file(c)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    out = capsys.readouterr().out
    assert out.count("  checked: ssh login on the ") == 3  # a real login with the key, on each Elastic IP
    assert "  checked: limit EC2-VPC Elastic IPs: need 3, 0 in use, limit 5" in out
    # key pair, 3 instances, 3 addresses and their associations; the EIP limit, 3 SSH logins
    assert result == {"ok": 0, "changed": 10, "checked": 4, "task": "launch", "role": "aws"}
    assert out.endswith("RECAP [launch] aws: ok=0 changed=10 checked=4\n")

    saved = state.load(c)
    assert saved["key_path"] == str(key) and saved["key_created"] is True
    for role, machine in machines.items():
        assert saved["instances"][role] == {
            "id": machine["InstanceId"],
            "state": "running",
            "public_ip": addresses[role]["PublicIp"],
            "private_ip": machine["PrivateIpAddress"],
            "eip_allocation_id": addresses[role]["AllocationId"],
        }

    instances.status(c, json=True)
    shown = json.loads(capsys.readouterr().out)
    assert shown["instances"] == saved["instances"]
    assert shown["urls"]["app"] == f"http://{addresses['frontend']['PublicIp']}/"
    # backend.mode proxied: the back-end is reached through the front-end's /health
    assert shown["urls"]["backend"] == f"http://{addresses['frontend']['PublicIp']}/health"
    assert f"-L 8888:localhost:8888 ubuntu@{addresses['worker']['PublicIp']}" in shown["urls"]["jupyter"]
    instances.status(c)
    text = capsys.readouterr().out
    assert f"worker   {machines['worker']['InstanceId']} running public {addresses['worker']['PublicIp']}" in text

    worker_ip = addresses["worker"]["PublicIp"]
    stopped = instances.stop_worker(c)
    assert (stopped["changed"], stopped["task"], stopped["role"]) == (1, "stop-worker", "worker")
    assert state.load(c)["instances"]["worker"]["state"] == "stopped"
    assert ec2.describe_instances(InstanceIds=[machines["worker"]["InstanceId"]])["Reservations"][0][
        "Instances"][0]["State"]["Name"] == "stopped"
    assert state.load(c)["instances"]["frontend"]["state"] == "running"
    capsys.readouterr()
    assert instances.stop_worker(c)["changed"] == 0
    out = capsys.readouterr().out
    assert "  ok: instance" in out and "already stopped" in out
    assert "RECAP [stop-worker] worker: ok=1 changed=0 checked=0" in out

    started = instances.start_worker(c)
    assert state.load(c)["instances"]["worker"]["state"] == "running"
    assert state.load(c)["instances"]["worker"]["public_ip"] == worker_ip  # the Elastic IP stays
    assert f"  checked: ssh login on the worker (ubuntu@{worker_ip}:" in capsys.readouterr().out
    assert (started["changed"], started["checked"]) == (1, 1)


def test_second_launch_creates_nothing(network_ready, ec2, api_calls, capsys):
    c = network_ready()
    instances.launch(c, no_wait=True)
    before = stack_resources(ec2, c.config.aws.stack)
    capsys.readouterr()
    calls = api_calls(c)

    result = instances.launch(c, no_wait=True)

    assert stack_resources(ec2, c.config.aws.stack) == before
    out = capsys.readouterr().out
    assert out.count("  ok: instance ") == 3 and out.count("  ok: elastic-ip ") == 6  # exists, associated
    assert "  ok: key-pair" in out and "changed:" not in out
    assert (result["ok"], result["changed"]) == (10, 0)
    assert not [call for call in calls if not call.startswith("Describe")]


def test_launch_after_stop_worker_starts_it_again(network_ready, ec2, capsys):
    c = network_ready()
    instances.launch(c, no_wait=True)
    instances.stop_worker(c)
    capsys.readouterr()
    instances.launch(c, no_wait=True)
    assert "(worker) started" in capsys.readouterr().out
    assert len(stack_resources(ec2, c.config.aws.stack)["instances"]) == 3
    assert state.load(c)["instances"]["worker"]["state"] == "running"


def test_interrupted_launch_resumes(network_ready, ec2):
    c = network_ready()

    def quota_hit(**_):
        from botocore.exceptions import ClientError

        raise ClientError({"Error": {"Code": "AddressLimitExceeded", "Message": "quota"}}, "AllocateAddress")

    cloud.session(c).events.register("before-call.ec2.AllocateAddress", quota_hit, unique_id="quota")
    with pytest.raises(cloud.StepFailed, match=r"elastic ip of worker.*AddressLimitExceeded.*\n.*`fab launch`"):
        instances.launch(c, no_wait=True)
    assert len(stack_resources(ec2, c.config.aws.stack)["instances"]) == 3
    cloud.session(c).events.unregister("before-call.ec2.AllocateAddress", unique_id="quota")

    instances.launch(c, no_wait=True)
    found = stack_resources(ec2, c.config.aws.stack)
    assert len(found["instances"]) == 3 and len(found["addresses"]) == 3 and len(found["key_pairs"]) == 1


def test_ssm_parameter_comes_first(network_ready, ec2):
    c = network_ready(aws={"ami_ssm_parameter": "/test/canonical/ubuntu/{release}/ami-id"})
    # moto refuses writes under /aws/service, so the test parameter lives elsewhere.
    ssm = cloud.client(c, "ssm")
    ssm.put_parameter(Name="/test/canonical/ubuntu/24.04/ami-id", Value=OLDER_NOBLE, Type="String")
    instances.launch(c, no_wait=True)
    assert {i["ImageId"] for i in stack_resources(ec2, c.config.aws.stack)["instances"]} == {OLDER_NOBLE}


def test_explicit_ami_wins(network_ready, ec2):
    c = network_ready(aws={"ami": OLDER_NOBLE})
    instances.launch(c, no_wait=True)
    assert {i["ImageId"] for i in stack_resources(ec2, c.config.aws.stack)["instances"]} == {OLDER_NOBLE}


def test_instance_types_are_configurable(network_ready, ec2):
    c = network_ready(aws={"instance_types": {"worker": "c5.large"}})
    instances.launch(c, no_wait=True)
    found = {role_of(i): i["InstanceType"] for i in stack_resources(ec2, c.config.aws.stack)["instances"]}
    assert found == {**TYPES, "worker": "c5.large"}


@pytest.mark.parametrize(
    "aws, message",
    [
        ({"ami": "ami-00000000deadbeef0"}, "aws.ami='ami-00000000deadbeef0'"),
        ({"ubuntu_release": "26.04"}, "no Ubuntu 26.04 x86_64 image from Canonical here: set aws.ami"),
        ({"key_name": "team-key"}, r"key pair 'team-key' exists in AWS but its private key is not at .*team-key\.pem"),
    ],
)
def test_bad_config_fails_before_launching_anything(network_ready, ec2, aws, message):
    c = network_ready(aws=aws)
    ec2.create_key_pair(KeyName="team-key")  # someone else's key, not saved here
    with pytest.raises(cloud.ConfigError, match=message):
        instances.launch(c, no_wait=True)
    found = stack_resources(ec2, c.config.aws.stack)
    assert found["instances"] == [] and found["addresses"] == [] and found["key_pairs"] == []
    assert not state.key_file(c).exists()


@pytest.mark.parametrize(
    "release, message",
    [
        ("22.04", r"Ubuntu 22.04 ships Python 3.10.*\(numpy 2.4, TensorFlow 2.21\) need Python 3.11 or later:"
                  r" use 24.04 or later"),
        ("20.04", r"Ubuntu 20.04 ships Python 3.8,.* need Python 3.11"),
        ("18.04", r"Ubuntu 18.04 ships Python 3.6,.* need Python 3.11"),
        ("noble", r"aws.ubuntu_release='noble' is not an Ubuntu release like 24.04"),
    ],
)
def test_an_ubuntu_too_old_for_the_app_is_refused_before_any_call(network_ready, ec2, api_calls, release, message):
    c = network_ready()
    c.config.aws.ubuntu_release = release
    calls = api_calls(c)
    with pytest.raises(cloud.ConfigError, match=message):
        instances.launch(c, no_wait=True)
    assert calls == []
    found = stack_resources(ec2, c.config.aws.stack)
    assert found["instances"] == [] and found["key_pairs"] == []


@pytest.mark.parametrize("release, text",
                         [("24.04", "24.04"), ("24.10", "24.10"), (24.10, "24.10"), ("26.04", "26.04")])
def test_releases_from_24_04_on_are_accepted(aws_context, release, text):
    # 24.10 unquoted in fabric.yaml is the number 24.1.
    assert cloud.ubuntu_release(aws_context(aws={"ubuntu_release": release})) == text


def test_an_existing_key_named_in_config_is_used(network_ready, ec2, tmp_path):
    c = network_ready(aws={"key_name": "team-key"}, ssh={"key": str(tmp_path / "team.pem")})
    (tmp_path / "team.pem").write_text(ec2.create_key_pair(KeyName="team-key")["KeyMaterial"])
    instances.launch(c, no_wait=True)
    found = stack_resources(ec2, c.config.aws.stack)
    assert {i["KeyName"] for i in found["instances"]} == {"team-key"}
    assert found["key_pairs"] == []  # not the stack's: destroy will leave it
    assert state.load(c)["key_created"] is False and state.load(c)["key_path"] == str(tmp_path / "team.pem")


def test_a_stray_private_key_is_never_overwritten(network_ready, ec2):
    c = network_ready()
    state.key_file(c).parent.mkdir(parents=True)
    state.key_file(c).write_text("precious")
    with pytest.raises(cloud.ConfigError, match="exists but AWS has no key pair"):
        instances.launch(c, no_wait=True)
    assert state.key_file(c).read_text() == "precious"
    assert stack_resources(ec2, c.config.aws.stack)["instances"] == []


def public_half(key):
    """A private key's public half in OpenSSH's one-line form, without a comment."""
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def aws_public_key(ec2, name):
    [pair] = ec2.describe_key_pairs(KeyNames=[name], IncludePublicKey=True)["KeyPairs"]
    return " ".join(pair["PublicKey"].split()[:2]), pair


def test_the_key_is_made_here_and_only_its_public_half_imported(network_ready, ec2, api_calls):
    """Saved before AWS hears of it, so a launch killed in between has not lost it."""
    c = network_ready()
    calls = api_calls(c)
    instances.launch(c, no_wait=True)
    assert "ImportKeyPair" in calls and "CreateKeyPair" not in calls
    key = serialization.load_ssh_private_key(state.key_file(c).read_bytes(), password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)  # aws.key_type's default
    public, pair = aws_public_key(ec2, state.key_name(c))
    assert public == public_half(key)
    assert {"Key": "Project", "Value": c.config.aws.stack} in pair["Tags"]  # destroy's to delete
    assert [p.name for p in state.key_file(c).parent.iterdir()] == [state.key_file(c).name]  # no temp file left


def test_an_rsa_key_when_asked(network_ready, ec2):
    c = network_ready(aws={"key_type": "rsa"})
    instances.launch(c, no_wait=True)
    text = state.key_file(c).read_text()
    assert text.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert stat.S_IMODE(os.stat(state.key_file(c)).st_mode) == 0o600
    key = serialization.load_ssh_private_key(text.encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 4096
    public, pair = aws_public_key(ec2, state.key_name(c))
    assert public == public_half(key) and pair["KeyType"] == "rsa"


def test_an_unknown_key_type_is_refused_before_launching_anything(network_ready, ec2):
    c = network_ready(aws={"key_type": "dsa"})
    with pytest.raises(cloud.ConfigError, match=r"aws.key_type='dsa' is not a key type AWS imports: ed25519 or rsa"):
        instances.launch(c, no_wait=True)
    found = stack_resources(ec2, c.config.aws.stack)
    assert found["instances"] == [] and found["key_pairs"] == [] and not state.key_file(c).exists()


@pytest.mark.parametrize("key_type", ["ed25519", "rsa"])
def test_a_saved_key_without_its_pair_is_imported(network_ready, ec2, capsys, key_type):
    """What a launch killed between saving the key and importing it leaves: the next one imports
    that key (it used to refuse), in OpenSSH or, as AWS made them, PEM format."""
    c = network_ready()
    if key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        saved = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption())
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        saved = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                  serialization.NoEncryption())
    path = state.key_file(c)
    path.parent.mkdir(parents=True)
    path.write_bytes(saved)
    capsys.readouterr()

    assert instances.launch(c, no_wait=True, dry_run=True)["changed"] == 0
    assert f"  would import key-pair {state.key_name(c)} from {path}\n" in capsys.readouterr().out
    assert ec2.describe_key_pairs()["KeyPairs"] == []

    instances.launch(c, no_wait=True)

    assert f"  changed: key-pair {state.key_name(c)} imported from {path}" in capsys.readouterr().out
    assert path.read_bytes() == saved  # used as it is, never rewritten
    public, pair = aws_public_key(ec2, state.key_name(c))
    assert public == public_half(key)
    assert {"Key": "Project", "Value": c.config.aws.stack} in pair["Tags"]
    assert len(stack_resources(ec2, c.config.aws.stack)["instances"]) == 3
    assert state.load(c)["key_path"] == str(path) and state.load(c)["key_created"] is True


def test_a_key_named_by_ssh_key_is_never_imported(network_ready, ec2, tmp_path):
    """ssh.key may be someone's own key: imported with the stack's tags, `destroy` would delete it."""
    own = tmp_path / "own.pem"
    own.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    c = network_ready(ssh={"key": str(own)})
    with pytest.raises(cloud.ConfigError, match=r"own.pem exists but AWS has no key pair '.*-key': move the file away"):
        instances.launch(c, no_wait=True)
    assert ec2.describe_key_pairs()["KeyPairs"] == []
    assert stack_resources(ec2, c.config.aws.stack)["instances"] == []


def test_launch_needs_the_network(aws_context, ec2):
    c = aws_context()
    with pytest.raises(instances.Exit, match="run `fab create-vpc` first"):
        instances.launch(c)
    assert ec2.describe_key_pairs()["KeyPairs"] == []


def test_launch_dry_run_changes_nothing(network_ready, ec2, api_calls, capsys):
    c = network_ready()
    calls = api_calls(c)
    instances.launch(c, dry_run=True)
    assert not [call for call in calls if not call.startswith("Describe")]
    found = stack_resources(ec2, c.config.aws.stack)
    assert found["instances"] == [] and found["addresses"] == [] and ec2.describe_key_pairs()["KeyPairs"] == []
    out = capsys.readouterr().out
    assert "would create instance worker (m5.xlarge" in out and out.count("would create elastic-ip") == 3
    assert not state.key_file(c).exists()


def test_ssh_that_never_answers_fails_naming_the_step(network_ready):
    c = network_ready(ssh={"port": free_port(), "timeout": 1})  # nothing listens there
    with pytest.raises(cloud.StepFailed, match=r"ssh login on the worker: none within 1s") as failed:
        instances.launch(c)
    # What to check next: who the security group lets in, and the setting that changes it.
    assert "allows SSH (22) from 203.0.113.7/32 (aws.ssh_cidr" in failed.value.message
    instances.launch(c, no_wait=True)  # the machines are there; only the wait is skipped


def test_stop_worker_needs_a_worker(aws_context):
    with pytest.raises(instances.Exit, match="run `fab launch` first"):
        instances.stop_worker(aws_context())


def test_fab_cli_status_json(network_ready, aws_env):
    """The same through `fab`, settings from the environment: flags and config wiring are real."""
    c = network_ready()
    env = {
        **os.environ,
        "FABRIC_AWS_STACK": c.config.aws.stack,
        "FABRIC_AWS_REGION": REGION,
        "FABRIC_AWS_STATE_FILE": c.config.aws.state_file,
    }
    answer = subprocess.run(
        [sys.executable, "-m", "fabric", "status", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["vpc_id"] == state.load(c)["vpc_id"]


@pytest.mark.parametrize("ami", [None, OLDER_NOBLE])  # root devices /dev/sda1 and /dev/xvda
def test_instances_are_hardened(network_ready, ec2, ami):
    """IMDSv2 only, and an encrypted gp3 root volume on the image's root device, as AWS describes them."""
    c = network_ready(aws={"ami": ami})
    instances.launch(c, no_wait=True)
    [image] = ec2.describe_images(ImageIds=[ami or NEWEST_NOBLE])["Images"]
    [image_root] = [m["Ebs"] for m in image["BlockDeviceMappings"] if m["DeviceName"] == image["RootDeviceName"]]
    for machine in stack_resources(ec2, c.config.aws.stack)["instances"]:
        assert machine["MetadataOptions"]["HttpTokens"] == "required"
        assert machine["MetadataOptions"]["HttpEndpoint"] == "enabled"
        assert machine["RootDeviceName"] == image["RootDeviceName"]
        [mapping] = machine["BlockDeviceMappings"]  # the root only, not a default one beside it
        assert mapping["DeviceName"] == image["RootDeviceName"] and mapping["Ebs"]["DeleteOnTermination"]
        [volume] = ec2.describe_volumes(VolumeIds=[mapping["Ebs"]["VolumeId"]])["Volumes"]
        assert (volume["Encrypted"], volume["VolumeType"], volume["Size"]) == (True, "gp3", image_root["VolumeSize"])


def test_imdsv2_is_required_on_an_instance_launched_without_it(network_ready, ec2, capsys):
    c = network_ready()
    instances.launch(c, no_wait=True)
    worker = next(i for i in stack_resources(ec2, c.config.aws.stack)["instances"] if role_of(i) == "worker")
    ec2.modify_instance_metadata_options(InstanceId=worker["InstanceId"], HttpTokens="optional")
    capsys.readouterr()

    assert instances.launch(c, no_wait=True, dry_run=True)["changed"] == 0
    assert f"would change instance {worker['InstanceId']} (worker) metadata to IMDSv2" in capsys.readouterr().out
    assert instances.launch(c, no_wait=True)["changed"] == 1

    [again] = ec2.describe_instances(InstanceIds=[worker["InstanceId"]])["Reservations"][0]["Instances"]
    assert again["MetadataOptions"]["HttpTokens"] == "required"
    assert f"changed: instance {worker['InstanceId']} (worker) metadata IMDSv2 only" in capsys.readouterr().out


def test_start_worker_while_it_is_still_stopping(network_ready, ec2, api_calls):
    """moto stops an instance at once; AWS takes a while, and answers a start before the
    stop is done with IncorrectInstanceState. Here the task's first look at the worker
    says `stopping`, and StartInstances fails like AWS unless `instance_stopped` was
    waited for after that look."""
    c = network_ready()
    instances.launch(c, no_wait=True)
    instances.stop_worker(c)
    calls = api_calls(c)
    events = cloud.session(c).events
    looks = []

    def still_stopping(parsed, **_):
        looks.append(len(calls))
        if len(looks) == 1:
            for reservation in parsed["Reservations"]:
                for instance in reservation["Instances"]:
                    instance["State"] = {"Code": 64, "Name": "stopping"}

    def like_aws(**_):
        if "DescribeInstances" not in calls[looks[0]:]:
            raise ClientError({"Error": {"Code": "IncorrectInstanceState",
                                         "Message": "The instance is not in a state from which it can be started."}},
                              "StartInstances")

    events.register("after-call.ec2.DescribeInstances", still_stopping)
    events.register("before-call.ec2.StartInstances", like_aws)

    result = instances.start_worker(c, no_wait=True)

    assert result["changed"] == 1
    assert state.load(c)["instances"]["worker"]["state"] == "running"
    start = calls.index("StartInstances")
    assert "DescribeInstances" in calls[looks[0]:start]  # the wait for `stopped`
