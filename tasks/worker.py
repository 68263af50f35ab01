"""Guide, "Training the model on the Working Machine": environment, training, Jupyter.

On the host, under the SSH user's home: the venv `worker.venv` (also the kernel
"Python 3 (myenv)"), and `worker.dir` holding the notebook, 9.png, data/ and
artifacts/ (the training outputs).
"""
import hashlib
import io
import json
import time
from pathlib import Path

from invoke import task
from invoke.exceptions import Exit

from . import hosts
from .config import FILES
from .remote import Report, ensure_apt, ensure_file, ensure_venv, home, q, sh, sha256_file, valid_name

NOTEBOOK = "00-mnist-cnn.ipynb"
OUTPUTS = ("cnn-mnist.keras", "cnn-mnist.tflite", "metrics.json", "training_curves.png",
           "confusion_matrix.png", "00-mnist-cnn.out.ipynb")


def venv_name(c):
    """worker.venv: a folder under the home, and the Jupyter kernel's name."""
    return valid_name(c.config.worker.venv, "worker.venv")


def layout(c, cxn):
    base = home(cxn) / c.config.worker.dir
    venv = home(cxn) / venv_name(c)
    return {"base": base, "venv": venv, "data": base / "data", "out": base / "artifacts"}


@task(help={})
def setup_worker(c):
    """apt update, the venv with the worker's requirements and the myenv kernel, notebook and 9.png."""
    with Report(c, "setup-worker", "worker") as r:
        cxn = r.cxn
        paths = layout(c, cxn)
        ensure_apt(cxn, r, ["python3-venv"], c.config.remote.apt_cache_valid)
        ensure_venv(cxn, r, paths["venv"], FILES / "wm_requirements.txt")
        name = venv_name(c)
        spec = home(cxn) / ".local/share/jupyter/kernels" / name.lower() / "kernel.json"
        found = sh(cxn, f"cat {q(spec)} 2>/dev/null; true").stdout
        if str(paths["venv"] / "bin/python") in found:
            r.ok(f'kernel "Python 3 ({name})"')
        else:
            sh(cxn, f"{q(paths['venv'] / 'bin/python')} -m ipykernel install --user --name {q(name)}"
                    f" --display-name {q(f'Python 3 ({name})')}")
            r.changed(f'kernel "Python 3 ({name})" registered')
        for local in (FILES / NOTEBOOK, FILES / "9.png"):
            if not local.is_file() and local.name == "9.png":
                r.note(f"skipped: {local} is not in this checkout")
                continue
            r.either(ensure_file(cxn, local, paths["base"] / local.name), f"{paths['base']}/{local.name}")
    return r.result


def inputs_key(parameters, data):
    """What a training run depends on: the notebook, its parameters and the data."""
    digest = hashlib.sha256((FILES / NOTEBOOK).read_bytes())
    digest.update(json.dumps(parameters, sort_keys=True).encode())
    digest.update((sha256_file(data) if data else "keras-download").encode())
    return digest.hexdigest()


@task(help={"epochs": "training epochs (default train.epochs)",
            "batch-size": "batch size (default train.batch_size)",
            "limit": "train on the first N images only (default train.limit; 0: all)",
            "data": "a local mnist.npz to upload for an offline worker (default train.data)",
            "artifacts": "local folder for the results (default train.artifacts)",
            "with-feedback": "add the page's corrections (feedback/corrections.npz, from `fab pull-feedback`):"
                             " weighted, a held-out part measured before and after",
            "fine-tune": "with --with-feedback: start from the current model (<artifacts>/cnn-mnist.keras)"
                         " instead of from scratch",
            "force": "train again even if the artifacts come from the same notebook, data and parameters"})
def train(c, epochs=None, batch_size=None, limit=None, data=None, artifacts=None, force=False, with_feedback=False,
          fine_tune=False):
    """Run the notebook headless on the worker, progress streamed; bring the model and plots back."""
    t = c.config.train
    parameters = {"epochs": int(epochs or t.epochs), "batch_size": int(batch_size or t.batch_size),
                  "limit": int(t.limit if limit is None else limit)}
    local = Path(artifacts or t.artifacts).expanduser()
    extra_inputs = feedback_inputs(local, fine_tune, Path(t.feedback).expanduser()) if with_feedback else {}
    data = data or t.data
    if data and not Path(data).expanduser().is_file():
        raise Exit(f"no dataset at {data}: give --data PATH to a local mnist.npz")
    data = data and Path(data).expanduser()
    key = inputs_key(dict(parameters, **{name: sha256_file(path) for name, path in extra_inputs.items()}), data)
    with Report(c, "train", "worker") as r:
        cxn = r.cxn
        paths = layout(c, cxn)
        if not sh(cxn, f"test -f {q(paths['base'] / NOTEBOOK)} -a -x {q(paths['venv'] / 'bin/papermill')}",
                  warn=True).ok:
            r.fail("the worker is not set up: run `fab setup-worker` first")
        stamp = local / "train.json"
        done = stamp.is_file() and json.loads(stamp.read_text()).get("key") == key
        if done and not force and (local / "cnn-mnist.keras").is_file():
            r.ok(f"model in {local} comes from this notebook, data and parameters (--force to train again)")
            report_accuracy(local)
            return r.result
        if data:
            remote_data = paths["data"] / "mnist.npz"
            r.either(ensure_file(cxn, data, remote_data), f"dataset uploaded to {remote_data}")
            parameters["data_path"] = str(remote_data)
        for name, path in extra_inputs.items():  # the corrections, and the model they correct
            remote = paths["data"] / f"{name}{path.suffix}"
            r.either(ensure_file(cxn, path, remote), f"{path.name} uploaded to {remote}")
            parameters[name] = str(remote)
        if fine_tune and with_feedback:
            parameters["fine_tune"] = True
        parameters["output_dir"] = str(paths["out"])
        options = " ".join(f"-p {name} {q(value)}" for name, value in parameters.items())
        sh(cxn, f"rm -rf {q(paths['out'])} && mkdir -p {q(paths['out'])}")
        print(f"  training on {cxn.host}: {parameters}", flush=True)
        started = time.monotonic()
        cxn.run(f"cd {q(paths['base'])} && PYTHONUNBUFFERED=1 {q(paths['venv'] / 'bin/papermill')} {NOTEBOOK}"
                f" {q(paths['out'] / '00-mnist-cnn.out.ipynb')} -k {q(venv_name(c))} {options}"
                f" --log-output --no-progress-bar 2>&1", pty=False)
        r.changed(f"trained in {time.monotonic() - started:.0f}s")
        local.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS:
            if sh(cxn, f"test -f {q(paths['out'] / name)}", warn=True).ok:
                cxn.get(str(paths["out"] / name), str(local / name))
        stamp.write_text(json.dumps({"key": key, "parameters": parameters, "host": cxn.host}, indent=2) + "\n")
        r.changed(f"results brought back to {local}")
        report_accuracy(local)
    return r.result


def feedback_inputs(artifacts, fine_tune, folder):
    """{notebook parameter: local file} for --with-feedback: the pulled corrections, and the
    current model (measured "before", and the start when fine-tuning)."""
    from .corrections import NPZ_NAME

    corrections = folder / NPZ_NAME
    if not corrections.is_file():
        raise Exit(f"no corrections at {corrections}: run `fab pull-feedback` first")
    inputs = {"feedback_path": corrections}
    current = artifacts / "cnn-mnist.keras"
    if current.is_file():
        inputs["base_model"] = current
    elif fine_tune:
        raise Exit(f"--fine-tune starts from {current}, which is not there: train without it, or `fab train` first")
    return inputs


def report_accuracy(folder):
    metrics = json.loads((folder / "metrics.json").read_text())
    print(f"  test accuracy: {metrics['test_accuracy']:.4f}", flush=True)
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    for name, label in (("mnist_test_accuracy", "MNIST test"), ("corrections_accuracy", "held-out corrections")):
        if before.get(name) is not None or after.get(name) is not None:
            print(f"  {label} accuracy: before {_percent(before.get(name))}, after {_percent(after.get(name))}",
                  flush=True)


def _percent(value):
    return "-" if value is None else f"{value:.2%}"


def fetch_model(c):
    """{file name: bytes} of the model the worker trained last (for push-model --from-worker)."""
    cxn = hosts.connect(c, "worker")
    try:
        out = layout(c, cxn)["out"]
        found = {}
        for name in ("cnn-mnist.keras", "cnn-mnist.tflite"):
            if sh(cxn, f"test -f {q(out / name)}", warn=True).ok:
                buffer = io.BytesIO()
                cxn.get(str(out / name), buffer)
                found[name] = buffer.getvalue()
        if not found:
            raise Exit(f"no model on the {hosts.label(cxn)} in {out}: run `fab train` first")
        print(f"  fetched {', '.join(found)} from the {hosts.label(cxn)}", flush=True)
        return found
    finally:
        cxn.close()


def jupyter_servers(cxn, paths):
    out = sh(cxn, f"{q(paths['venv'] / 'bin/jupyter')} server list --json 2>/dev/null; true").stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@task(help={"port": "local port of the SSH tunnel (default worker.jupyter_port)",
            "seconds": "close the tunnel after this many seconds (default: stay until Ctrl-C)",
            "stop": "stop Jupyter on the worker (the guide's `jupyter notebook stop`)"})
def notebook(c, port=None, seconds=0, stop=False):
    """Start Jupyter on the worker (localhost only) and reach it through an SSH tunnel."""
    remote_port = int(c.config.worker.jupyter_port)
    with Report(c, "notebook", "worker") as r:
        cxn = r.cxn
        paths = layout(c, cxn)
        running = [s for s in jupyter_servers(cxn, paths) if int(s["port"]) == remote_port]
        if stop:
            if running:
                sh(cxn, f"{q(paths['venv'] / 'bin/jupyter')} server stop {remote_port}")
            r.either(bool(running), f"Jupyter on port {remote_port} " + ("stopped" if running else "not running"))
            return r.result
        if running:
            r.ok(f"Jupyter running on the worker's 127.0.0.1:{remote_port}")
        else:
            # Detached (own session, no inherited descriptors): it outlives this SSH session.
            sh(cxn, f"cd {q(paths['base'])} && (setsid nohup {q(paths['venv'] / 'bin/jupyter')} notebook"
                    f" --no-browser --ip=127.0.0.1 --port={remote_port} --port-retries=0"
                    f" > {q(paths['base'] / 'jupyter.log')} 2>&1 < /dev/null &)", pty=False)
            deadline = time.monotonic() + 60
            while not running and time.monotonic() < deadline:
                time.sleep(1)
                running = [s for s in jupyter_servers(cxn, paths) if int(s["port"]) == remote_port]
            if not running:
                log = sh(cxn, f"tail -n 20 {q(paths['base'] / 'jupyter.log')}; true").stdout
                r.fail(f"Jupyter did not start on port {remote_port}:\n{log}")
            r.changed(f"Jupyter started on the worker's 127.0.0.1:{remote_port} (log: {paths['base']}/jupyter.log)")
        local_port = int(port or remote_port)
        token = running[0].get("token", "")
        with cxn.forward_local(local_port, remote_port=remote_port, remote_host="127.0.0.1"):
            r.checked(f"tunnel open: http://localhost:{local_port}/tree?token={token}")
            print(f"  browse http://localhost:{local_port}/tree?token={token}"
                  f" ({'for ' + str(seconds) + 's' if seconds else 'Ctrl-C to close the tunnel'})", flush=True)
            pid = running[0]["pid"]
            try:
                deadline = time.monotonic() + float(seconds) if seconds else None
                while deadline is None or time.monotonic() < deadline:
                    time.sleep(2)
                    if not sh(cxn, f"kill -0 {int(pid)}", warn=True).ok:
                        print("  Jupyter stopped on the worker: tunnel closed", flush=True)
                        break
            except KeyboardInterrupt:
                print("  tunnel closed; Jupyter keeps running (fab notebook --stop stops it)")
    return r.result
