"""The whole guide in order, resumable: every step is idempotent, and a failed
run says which step to resume from."""
from invoke import task
from invoke.exceptions import Exit, UnexpectedExit

from . import backend, cost, frontend, hosts, instances, network, preflight, worker
from .config import ROLES
from .report import summary

AWS_STEPS = ("preflight", "create-vpc", "launch")


def steps(c, epochs, limit, data):
    """(name, callable) of each step, in the guide's order."""
    return [
        ("preflight", lambda: preflight.preflight(c)),  # checks only: nothing is created if it fails
        ("create-vpc", lambda: network.create_vpc(c)),
        ("launch", lambda: instances.launch(c)),
        ("setup-worker", lambda: worker.setup_worker(c)),
        ("train", lambda: worker.train(c, epochs=epochs, limit=limit, data=data)),
        ("setup-backend", lambda: backend.setup_backend(c)),
        ("push-model", lambda: backend.push_model(c)),
        ("setup-frontend", lambda: frontend.setup_frontend(c)),
    ]


def app_url(c):
    _, host, _, _ = hosts.address(c, "frontend")
    return hosts.http_url(host, c.config.frontend.port, "/")


@task(help={"start-at": "resume from this step (preflight, create-vpc, launch, setup-worker, train, setup-backend,"
                        " push-model, setup-frontend); by default all run, each changing only what is not right",
            "skip-preflight": "don't run `fab preflight` first (its checks of limits, zones and images)",
            "epochs": "training epochs (default train.epochs)",
            "limit": "train on the first N images only (default train.limit)",
            "data": "a local mnist.npz to upload to the worker (default train.data)"})
def deploy(c, start_at=None, epochs=None, limit=None, data=None, skip_preflight=False):
    """The whole guide: preflight, create-vpc, launch, setup-worker, train, setup-backend, push-model,
    setup-frontend."""
    plan = steps(c, epochs, limit, data)
    names = [name for name, _ in plan]
    if start_at and start_at not in names:
        raise Exit(f"unknown step {start_at!r}: one of {', '.join(names)}")
    inventory = set(ROLES) <= set(hosts.inventory(c))
    results = []
    for index, (name, run) in enumerate(plan):
        if start_at and index < names.index(start_at):
            print(f"== {name}: skipped (--start-at {start_at})", flush=True)
            continue
        if skip_preflight and name == "preflight":
            print(f"== {name}: skipped (--skip-preflight)", flush=True)
            continue
        if inventory and name in AWS_STEPS:
            print(f"== {name}: skipped (hosts come from the inventory, ssh.hosts)", flush=True)
            continue
        print(f"== {name}", flush=True)
        try:
            result = run()
        except (Exit, UnexpectedExit) as error:
            message = getattr(error, "message", None) or str(error)
            raise Exit(f"{message}\ndeploy stopped at `{name}`: once fixed, resume with"
                       f" `fab deploy --start-at {name}`", code=getattr(error, "code", 1) or 1) from None
        if isinstance(result, dict):
            results.append(result)
    total = summary(results)
    url = app_url(c)
    print(f"DEPLOYED: ok={total['ok']} changed={total['changed']} checked={total['checked']}"
          f"\n  the app: {url}", flush=True)
    if not inventory:  # the stack's running cost (tasks/cost.py); an inventory's hosts are not ours to price
        print("\n".join(cost.lines(cost.figures(c))), flush=True)
    return dict(total, url=url)
