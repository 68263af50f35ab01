"""The back-end's model registry and the accuracy gate (issue 15).

    fab models                      the versions on the back-end: checksum, date, source, accuracies, serving
    fab rollback-model [VERSION]    serve an earlier version again (default: the one before), no failed request
    fab push-model [--force]        refuses a model whose MNIST test accuracy is below the serving one's
                                    by more than model.max_regression points, unless --force

Each version is models/<id>/ on the host (tasks/backend.py), with the notebook's metrics.json
beside the model files: its MNIST test accuracy, and its accuracy on the held-out corrections
when it was trained with them (`fab train --with-feedback`). push-model also keeps a local
mirror of what it pushed in <train.artifacts>/registry/<id>/.
"""
import json as jsonlib
import shutil
import time
from pathlib import Path, PurePosixPath

from invoke import task

from . import backend
from .remote import Report, ensure_file, q, sh

METRICS = "metrics.json"
VERSION_PATTERN = "^[0-9a-f]{12}$"


# --- The gate -------------------------------------------------------------------------------


def local_metrics(sources):
    """The metrics.json beside the local model files being pushed, or None (from the worker: none)."""
    for source in sources.values():
        if isinstance(source, Path) and (source.parent / METRICS).is_file():
            return jsonlib.loads((source.parent / METRICS).read_text())
    return None


def remote_metrics(cxn, folder):
    out = sh(cxn, f"cat {q(PurePosixPath(folder) / METRICS)} 2>/dev/null; true").stdout
    try:
        return jsonlib.loads(out) if out.strip() else None
    except ValueError:
        return None


def mnist_accuracy(metrics):
    return None if not metrics else metrics.get("test_accuracy")


def corrections_accuracy(metrics):
    return ((metrics or {}).get("after") or {}).get("corrections_accuracy")


def gate_verdict(new, old, max_regression_points):
    """(passes, text) for MNIST test accuracies `new` against the serving `old` (fractions)."""
    drop = (old - new) * 100
    text = (f"MNIST test accuracy {new:.2%} against the serving model's {old:.2%}"
            f" ({-drop:+.2f} points; model.max_regression {max_regression_points:g})")
    return drop <= max_regression_points + 1e-9, text


def gate(c, r, paths, metrics, force):
    """Refuse (unless `force`) a model whose MNIST accuracy regresses past model.max_regression."""
    new, old = mnist_accuracy(metrics), mnist_accuracy(remote_metrics(r.cxn, paths["current"]))
    if new is None or old is None:
        which = "the new model's" if new is None else "the serving model's"
        r.ok(f"accuracy gate: {which} MNIST test accuracy is not known (no {METRICS}): not compared")
        return
    passes, text = gate_verdict(new, old, float(c.config.model.max_regression))
    if passes:
        r.checked(f"accuracy gate: {text}")
    elif force:
        r.ok(f"accuracy gate overridden by --force: {text}")
    else:
        r.fail(f"accuracy gate: {text}: refused, the back-end keeps serving its model.\n"
               f"  Train longer (fab train), or push it anyway with --force")


def record(c, r, paths, version, metrics, sources):
    """metrics.json into models/<version>/ on the host, and the local mirror of the version."""
    if metrics is not None:  # (part of the swap the caller reports)
        data = jsonlib.dumps(metrics, indent=1, sort_keys=True).encode() + b"\n"
        ensure_file(r.cxn, data, paths["models"] / version / METRICS)
    mirror = Path(c.config.train.artifacts).expanduser() / "registry" / version
    if not (mirror / "pushed.json").is_file():
        mirror.mkdir(parents=True, exist_ok=True)
        for name, source in sources.items():
            if isinstance(source, bytes):
                (mirror / name).write_bytes(source)
            else:
                shutil.copyfile(source, mirror / name)
        if metrics is not None:
            (mirror / METRICS).write_text(jsonlib.dumps(metrics, indent=1, sort_keys=True) + "\n")
        (mirror / "pushed.json").write_text(jsonlib.dumps({"version": version, "host": r.cxn.host,
                                                        "pushed": time.time()}) + "\n")


# --- Listing and rolling back ----------------------------------------------------------------

LIST = """
import hashlib, json, os, re, sys
models = sys.argv[1]
current = os.path.basename(os.readlink(os.path.join(models, "current"))) if os.path.islink(
    os.path.join(models, "current")) else None
found = []
for name in os.listdir(models):
    folder = os.path.join(models, name)
    if not re.fullmatch(r"[0-9a-f]{12}", name) or not os.path.isdir(folder):
        continue
    served = next((os.path.join(folder, f) for f in ("cnn-mnist.tflite", "cnn-mnist.keras")
                   if os.path.isfile(os.path.join(folder, f))), None)
    try:
        metrics = json.load(open(os.path.join(folder, "metrics.json")))
    except (OSError, ValueError):
        metrics = None
    found.append({"version": name, "date": os.stat(folder).st_mtime, "metrics": metrics,
                  "file": served and os.path.basename(served),
                  "sha256": served and hashlib.sha256(open(served, "rb").read()).hexdigest(),
                  "serving": name == current})
print(json.dumps(sorted(found, key=lambda v: -v["date"])))
"""


def versions(c, cxn, paths):
    """The versions on the host, newest first: dicts with version, date, sha256, metrics, serving."""
    python = q(paths["venv"] / "bin/python")
    return jsonlib.loads(sh(cxn, f"{python} -c {q(LIST)} {q(paths['models'])}").stdout)


def source_of(metrics):
    if not metrics:
        return "unknown (no metrics.json)"
    feedback = metrics.get("feedback")
    if not feedback:
        return "MNIST only"
    return f"MNIST + {feedback.get('corrections', '?')} corrections" + (" (fine-tuned)" if metrics.get("fine_tuned")
                                                                          else "")


def describe(version):
    metrics = version["metrics"]
    mnist, fixes = mnist_accuracy(metrics), corrections_accuracy(metrics)
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(version["date"]))
    return (f"{'*' if version['serving'] else ' '} {version['version']}  sha256 {(version['sha256'] or '-')[:16]}"
            f"  {when} UTC  {source_of(metrics)}  MNIST {'-' if mnist is None else f'{mnist:.2%}'}"
            f"  corrections {'-' if fixes is None else f'{fixes:.2%}'}" + ("  (serving)" if version["serving"] else ""))


@task(help={"json": "print machine-readable JSON instead"})
def models(c, json=False):
    """List the model versions on the back-end: checksum, date, source, accuracies, which one serves."""
    with Report(c, "models", "backend") as r:
        found = versions(c, r.cxn, backend.layout(c, r.cxn))
        if json:
            print(jsonlib.dumps(found, indent=1))
        elif not found:
            r.ok("no model on the back-end yet: `fab push-model`")
        for version in found if not json else ():
            print(f"  {describe(version)}", flush=True)
    return dict(r.result, versions=found)


@task(help={"version": "the version (models/<id>, see `fab models`) to serve; default: the one before the"
                       " serving one"})
def rollback_model(c, version=None):
    """Serve an earlier model version again: the link swapped atomically, a graceful reload, checked."""
    with Report(c, "rollback-model", "backend") as r:
        paths = backend.layout(c, r.cxn)
        found = versions(c, r.cxn, paths)
        serving = next((v for v in found if v["serving"]), None)
        if version is None:
            older = [v for v in found if not v["serving"] and (serving is None or v["date"] <= serving["date"])]
            if not older:
                r.fail("no earlier version on the back-end to go back to (`fab models` lists them)")
            target = older[0]
        else:
            target = next((v for v in found if v["version"] == str(version)), None)
            if target is None:
                r.fail(f"no version {version} on the back-end: it has {', '.join(v['version'] for v in found)}")
        if target["serving"]:
            r.ok(f"model {target['version']} is already serving")
            return r.result
        backend.point(r.cxn, paths, target["version"])
        r.changed(f"models/current -> {target['version']} (was {serving['version'] if serving else 'none'})")
        backend.start_or_reload(c, r, reload=True)
        if not backend.wait_for_model(c, r.cxn, paths, target["sha256"]):
            if serving:
                backend.point(r.cxn, paths, serving["version"])
                backend.start_or_reload(c, r, reload=True)
            r.fail(f"/health did not report model {target['version']} after the reload; back to"
                   f" {serving['version'] if serving else 'nothing'}")
        r.checked(f"/health on port {backend.local_port(c)} serves model sha256 {target['sha256'][:12]}")
    return r.result
