"""One place for settings.

Defaults live here; a user overrides them in `fabric.yaml` (read by `fab`) or
`invoke.yaml` (read by `invoke`) next to this project, in environment variables
(`FABRIC_AWS_REGION=...`), or with task options. Tasks read `c.config.<section>`.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ROOT / "Files"
ROLES = ("worker", "frontend", "backend")

DEFAULTS = {
    # AWS: guide section "Architecture".
    "aws": {
        "stack": "mnist",  # value of the Project tag; two stacks can share an account
        "region": None,  # None: boto3's own (AWS_DEFAULT_REGION, profile)
        "profile": None,  # None: boto3's own (AWS_PROFILE)
        "vpc_cidr": "192.168.0.0/16",
        "subnet_cidr": "192.168.0.0/24",
        "ssh_cidr": None,  # None: detect the operator's public address
        "key_name": None,  # None: "<stack>-key", created and saved by `launch`
        "key_dir": str(ROOT / ".keys"),
        "ami": None,  # None: look up Canonical's Ubuntu image
        "ubuntu_release": "24.04",
        "instance_types": {"worker": "m5.xlarge", "frontend": "t2.micro", "backend": "t2.micro"},
        "state_file": str(ROOT / ".state" / "stack.json"),
    },
    # SSH: one inventory, filled from AWS state unless given here.
    "ssh": {
        "user": "ubuntu",
        "port": 22,
        "key": None,  # None: the key `launch` saved
        "timeout": 300,  # seconds to wait for SSH after launch
        "connect_timeout": 10,
        "hosts": {"worker": None, "frontend": None, "backend": None},  # "user@host:port"
    },
    # Guide section "Training the model on the Working Machine".
    "train": {
        "epochs": 15,
        "batch_size": 128,
        "data": None,  # a local mnist.npz to upload; None: Keras downloads it
        "artifacts": str(ROOT / "artifacts"),
        "limit": 0,  # train on the first N images only (0: all)
    },
    # Guide section "Back-End Python Server".
    "backend": {
        "port": 5000,
        "workers": 2,
        "cors_origins": None,  # None: the front-end's origin when known, else "*"
    },
    # Guide section "Front-End Web Server".
    "frontend": {"docroot": "/var/www/html", "port": 80},
    # `fab local`
    "local": {"port": 8000, "backend_port": 5000},
}
