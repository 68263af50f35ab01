"""The task suite: one module per guide section, assembled into one flat Collection.

`fab --list` (via fabfile.py) and `invoke --list` both load `ns` from here.
"""
from invoke import Collection, Task

from . import (
    backend,
    corrections,
    deploy,
    frontend,
    instances,
    local,
    network,
    preflight,
    registry,
    teardown,
    tier,
    worker,
)
from .config import DEFAULTS

# Guide order: Architecture, Working Machine, Front-End, Back-End; then the whole thing.
MODULES = (preflight, network, instances, teardown, tier, worker, frontend, backend, corrections, registry, deploy,
           local)

ns = Collection()
for _module in MODULES:
    for _task in vars(_module).values():
        if isinstance(_task, Task) and _task.__module__ == _module.__name__:
            ns.add_task(_task)
ns.configure(DEFAULTS)
