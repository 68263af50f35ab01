"""One place for settings.

Defaults live here; a user overrides them in `fabric.yaml` (read by `fab`) or
`invoke.yaml` (read by `invoke`) next to this project, in environment variables
(`FABRIC_AWS_REGION=...`), or with task options. Tasks read `c.config.<section>`.
"""
import json
import os
from pathlib import Path

from .errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
FILES = ROOT / "Files"
# The back-end app: what setup-backend uploads and what a tier back-end pulls from S3 at boot.
APP_FILES = ("keras_flask.py", "feedback.py", "metrics.py", "gunicorn.conf.py")
ROLES = ("worker", "frontend", "backend")


def _local_mnist():
    """A local MNIST copy for machines without internet: $MNIST_NPZ, or the team's
    shared data folder beside this checkout. None lets Keras download it."""
    for candidate in (os.environ.get("MNIST_NPZ"), ROOT.parent / "shared" / "data" / "mnist.npz"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    return None


DEFAULTS = {
    # AWS: guide section "Architecture".
    "aws": {
        "stack": "mnist",  # value of the Project tag; two stacks can share an account
        "region": None,  # None: boto3's own (AWS_DEFAULT_REGION, profile)
        "profile": None,  # None: boto3's own (AWS_PROFILE)
        "vpc_cidr": "192.168.0.0/16",
        "subnet_cidr": "192.168.0.0/24",
        "private_subnet_cidr": "192.168.1.0/24",  # the back-end's, in backend.mode "private"
        "second_subnet_cidr": "192.168.2.0/24",  # the back-end tier's second zone (an ALB needs two)
        "ssh_cidr": None,  # None: detect the operator's public address
        "key_name": None,  # None: "<stack>-key", created and saved by `launch`
        "key_dir": str(ROOT / ".keys"),
        "ami": None,  # None: look up Canonical's Ubuntu image for each role's architecture
        "ubuntu_release": "24.04",
        # Canonical's public SSM parameter ({arch}: amd64 or arm64, from each role's instance type),
        # looked up first; then describe_images as a fallback.
        "ami_ssm_parameter": "/aws/service/canonical/ubuntu/server/{release}/stable/current/{arch}/hvm/ebs-gp3/ami-id",
        "key_type": "ed25519",  # of a key pair `launch` creates: ed25519 or rsa
        "ip_check_url": "https://checkip.amazonaws.com",  # answers the caller's public IP (ssh_cidr unset)
        "ip_check_timeout": 5,
        "instance_types": {"worker": "m5.xlarge", "frontend": "t2.micro", "backend": "t2.micro"},
        "state_file": str(ROOT / ".state" / "{stack}.json"),  # one cache file per stack
        "verbose": False,  # print every AWS call and each retry (FABRIC_AWS_VERBOSE=1)
    },
    # SSH: one inventory, filled from AWS state unless given here.
    "ssh": {
        "user": "ubuntu",
        "port": 22,
        "key": None,  # None: the key `launch` saved
        "timeout": 300,  # seconds to wait for SSH after launch
        "connect_timeout": 10,
        # Seconds between SSH keepalives on every connection (jump host included), so that a long
        # silent command (cloud-init's wait, a TensorFlow install) outlives NAT idle timeouts; 0: none.
        "keepalive": 15,
        "hosts": {"worker": None, "frontend": None, "backend": None},  # "user@host:port"
        # Host keys seen on first contact, then required (trust on first use); `destroy` deletes it.
        "known_hosts": str(ROOT / ".state" / "{stack}.known_hosts"),
    },
    # Guide section "Training the model on the Working Machine".
    "train": {
        "epochs": 15,
        "batch_size": 128,
        "data": _local_mnist(),  # a local mnist.npz (uploaded to the worker); None: Keras downloads it
        "artifacts": str(ROOT / "artifacts"),
        "limit": 0,  # train on the first N images only (0: all)
        "feedback": str(ROOT / "feedback"),  # where `pull-feedback` writes, `train --with-feedback` reads
    },
    # Guide section "Back-End Python Server".
    "backend": {
        # How the page reaches the back-end (README, "Modes"): "proxied" (apache on the front-end
        # forwards /predict/ and /health; 5000 open to the front-end only), "private" (that, and
        # the back-end in a private subnet behind a NAT gateway, reached over SSH through the
        # front-end), or "public" (the guide's: the page calls port 5000, open to the world, where
        # apache on the back-end host holds slow and abusive clients off gunicorn).
        "mode": "proxied",
        "port": 5000,
        # backend.mode public: apache on the back-end host answers the internet on `port` and
        # forwards to gunicorn on 127.0.0.1:app_port (docs/edge.md); other modes: gunicorn on `port`.
        "app_port": 5001,
        "workers": 2,
        "cors_origins": None,  # None: the front-end's origin when known, else "*"
        "dir": "digits-backend",  # on the host, under the SSH user's home: app, venv, models
        "service": "digits-backend",  # systemd unit, or init script where PID 1 is not systemd
        "keep_models": 3,  # model versions kept on the host for a rollback
        # Corrections from the page (POST /feedback) kept on the host: beyond either bound the
        # oldest are dropped (and counted). A correction is ~1 kB, or up to ~30 kB with its drawing.
        "feedback_max_rows": 50000,
        "feedback_max_mb": 200,
        # Corrections a minute from one address (per gunicorn worker; behind apache, the address it
        # forwards for) before POST /feedback answers 429; 0: no limit.
        "feedback_per_minute": 30,
        # Serve a model without .tflite with Keras: installs TensorFlow (backend_keras_requirements.txt).
        "keras_fallback": False,
        # More than one back-end (docs/backend-tier.md, `fab scale`): an Auto Scaling group behind an ALB.
        "count": 1,  # 1: the guide's single back-end, no balancer
        "max": None,  # > count: the group may grow to it (target tracking on average CPU)
        "cpu_target": 60,  # % average CPU the target tracking keeps
        "bucket": None,  # the models' bucket; None: <stack>-models-<account>-<region>
        "deregistration_delay": 30,  # seconds the balancer drains a back-end before it leaves
        "health_grace": 600,  # seconds a new back-end has to install itself before its health counts
        "tier_timeout": 900,  # seconds `scale` waits for the back-ends to pass the health check
        "s3_endpoint": None,  # where back-ends reach S3 when it is not AWS's (tests)
    },
    # The model registry (tasks/registry.py).
    "model": {
        # push-model refuses a model whose MNIST test accuracy is more than this many points
        # (0.2: 99.4% against 99.6%) below the serving model's, unless --force.
        "max_regression": 0.2,
    },
    # Guide section "Training the model on the Working Machine": the host side.
    "worker": {
        "venv": "myenv",  # under the SSH user's home; also the Jupyter kernel's name
        "dir": "mnist",  # notebook, data and training outputs, under the home
        "jupyter_port": 8888,  # on the worker, bound to localhost (reached by an SSH tunnel)
    },
    # Any remote host.
    "remote": {
        "apt_cache_valid": 3600,  # seconds before setup tasks run apt-get update again
        # How long a setup task waits for apt's locks (another apt: on a fresh instance apt-daily and
        # unattended-upgrades), and how long one apt-get may run on the host.
        "apt_lock_timeout": 1200,
        "apt_timeout": 1800,
    },
    # Guide section "Front-End Web Server".
    "frontend": {
        "docroot": "/var/www/html",
        "port": 80,
        # /predict/ per client address (docs/edge.md): this many requests/s on average, in bursts of
        # rate_burst; past that apache answers 429 for a while. 0: no limit.
        "rate_limit": 10,
        "rate_burst": 30,
        "max_connections_per_ip": 50,  # what one address may hold open (slowloris)
        # HTTPS (docs/https.md): the page's DNS name, pointing to the front-end; None: HTTP only.
        "domain": None,
        "email": None,  # the CA's expiry and policy mail; None: registered without one
        "acme_server": "https://acme-v02.api.letsencrypt.org/directory",  # Let's Encrypt (staging: acme-staging-v02)
        "acme_ca_bundle": None,  # a local PEM of a private ACME CA's roots (its API and its certificates)
    },
    # `fab local`
    "local": {
        "port": 8000,
        "backend_port": 5000,
        # With no model yet, a first one (the notebook, briefly: >= 99.0% in about a minute on 2 cores)
        # serves the page at once; the full one (train.epochs) trains meanwhile and replaces it.
        "first_epochs": 2,
        "first_limit": 0,
    },
}


def frontend_config_js(backend_url=None) -> str:
    """The front-end's generated `static/config.js` (the guide's step 6, never hand-edited).

    None keeps the page's default: the back-end on the page's own host, port 5000.
    "/" (backend.mode proxied or private) is the page's own origin, which forwards
    /predict/ and /health to the back-end.
    """
    value = "null" if backend_url is None else json.dumps(backend_url)
    return ("// Generated by the deploy tasks: the back-end this page talks to.\n"
            f"window.DIGITS_CONFIG = {{ backendUrl: {value} }};\n")


MODES = ("proxied", "private", "public")


def backend_mode(c) -> str:
    """backend.mode, checked: how the page reaches the back-end (README, "Modes")."""
    mode = str(c.config.backend.mode).strip().lower()
    if mode not in MODES:
        raise ConfigError(f"backend.mode={c.config.backend.mode!r}: one of {', '.join(MODES)}")
    return mode


def proxied(c) -> bool:
    """True when apache on the front-end forwards /predict/ and /health to the back-end."""
    return backend_mode(c) != "public"
