"""Guide, "Architecture" step 5: the key pair `launch` logs in with.

A new key is made here, its private half saved 0600 on this machine first, then its public
half imported to AWS (tagged with the stack, so `destroy` removes it); an existing pair is
used as it is, if its private key is here.
"""
import os

from . import cloud, state


def named(ec2, name):
    """The key pairs AWS has by this name (none or one): a user's own pair is found by name, not tag."""
    return ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [name]}])["KeyPairs"]


def ensure_key_pair(aws):
    """The key pair's name. A new one is made here and its private key saved 0600 first, then
    its public half imported to AWS: a run killed in between finds the saved key and imports it
    (had AWS made the pair, its private key would have died with the process)."""
    name, path = state.key_name(aws.c), state.key_file(aws.c)
    if named(aws.ec2, name):
        if not path.is_file():
            raise cloud.ConfigError(
                f"key pair {name!r} exists in AWS but its private key is not at {path}: "
                "set ssh.key to the .pem file, or another aws.key_name"
            )
        aws.ok(f"key-pair {name} exists ({path})")
        return name
    if path.exists():
        # Never overwrite a private key: it may be the only copy for other machines. Only
        # launch's own file (aws.key_dir, no ssh.key) is imported: `destroy` deletes it with the pair.
        if aws.c.config.ssh.key:
            raise cloud.ConfigError(f"{path} exists but AWS has no key pair {name!r}: move the file away")
        key = _saved_private_key(path, name)
        if aws.dry_run:
            aws.would(f"import key-pair {name} from {path}")
            return name
        _import_key_pair(aws, name, key)
        aws.changed(f"key-pair {name} imported from {path} (saved by an interrupted launch)")
        return name
    key_type = aws.c.config.aws.key_type
    if key_type not in KEY_TYPES:
        raise cloud.ConfigError(f"aws.key_type={key_type!r} is not a key type AWS imports: ed25519 or rsa")
    if aws.dry_run:
        aws.would(f"create key-pair {name} (saved to {path})")
        return name
    key = _new_private_key(key_type)
    _save_private_key(path, key)
    _import_key_pair(aws, name, key)
    aws.changed(f"key-pair {name} created (saved to {path})")
    return name


# aws.key_type -> a new private key. RSA 4096: the largest ImportKeyPair takes.
KEY_TYPES = ("ed25519", "rsa")


def _new_private_key(key_type):
    # cryptography (paramiko's own dependency) only here, so `fab --list` stays quick.
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=4096)
    return ed25519.Ed25519PrivateKey.generate()


def _save_private_key(path, key):
    """Write the key in OpenSSH format, 0600 from the first byte (ssh refuses keys others can
    read), whole or not at all: written to a new file beside it, then linked to `path`, which
    fails rather than overwrite a key that appeared meanwhile."""
    import tempfile

    from cryptography.hazmat.primitives import serialization

    material = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkstemp: a new file (O_EXCL), mode 0600.
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as out:
        out.write(material)
        out.flush()
        os.fsync(out.fileno())
    try:
        os.link(temp, path)
    except FileExistsError as error:
        raise cloud.ConfigError(f"{path} appeared while launch was making a key: move it away, then re-run") from error
    finally:
        os.unlink(temp)


def _saved_private_key(path, name):
    """The private key at `path` (OpenSSH or PEM), or a clear error if it is none AWS can import."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    try:
        data = path.read_bytes()
        if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as error:
        why = str(error) or type(error).__name__
        raise cloud.ConfigError(
            f"{path} exists but AWS has no key pair {name!r}, and it is no private key to import ({why}): "
            "move the file away"
        ) from error
    if not isinstance(key, (ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey)):
        raise cloud.ConfigError(
            f"{path} exists but AWS has no key pair {name!r}, and AWS imports ed25519 or rsa keys only: "
            "move the file away"
        )
    return key


def _import_key_pair(aws, name, key):
    """AWS gets the public half only, with the stack's tags (so `destroy` removes it)."""
    from cryptography.hazmat.primitives import serialization

    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    with aws.step(f"key pair {name}"):
        aws.ec2.import_key_pair(
            KeyName=name, PublicKeyMaterial=public, TagSpecifications=aws.tag_spec("key-pair", "key")
        )
