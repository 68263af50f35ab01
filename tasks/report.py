"""What every task prints, AWS or SSH, in Ansible's words.

`TASK [name] role (where)`, then one line per step: `  ok: ...` (already right),
`  changed: ...` (made right), `  checked: ...` (a live check passed); a
--dry-run's plan is `  would ...` and counts as none of them. On leaving, a
`RECAP [name] role: ok=N changed=N checked=N` line (`STOPPED` after an error).
`result` is the dict that `deploy` adds up across tasks.
"""

KINDS = ("ok", "changed", "checked")


class Tally:
    def __init__(self, task, role, where="", dry_run=False):
        self.task, self.role, self.dry_run = task, role, dry_run
        self.counts = dict.fromkeys(KINDS, 0)
        self.planned = 0
        suffix = f" ({where}{', dry run' if dry_run else ''})" if where or dry_run else ""
        print(f"TASK [{task}] {role}{suffix}", flush=True)

    def _line(self, kind, message):
        self.counts[kind] += 1
        print(f"  {kind}: {message}", flush=True)

    def ok(self, message):
        self._line("ok", message)

    def changed(self, message):
        self._line("changed", message)

    def checked(self, message):
        self._line("checked", message)

    def either(self, changed, message):
        """`changed` or `ok`, as `changed` says; returns it."""
        (self.changed if changed else self.ok)(message)
        return changed

    def would(self, message):
        """What a --dry-run would do: `would create vpc 192.168.0.0/16`."""
        self.planned += 1
        print(f"  would {message}", flush=True)

    def note(self, message):
        print(f"  {message}", flush=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        counts = " ".join(f"{k}={v}" for k, v in self.counts.items())
        if self.dry_run:
            counts += f" (dry run: {self.planned} planned)"
        print(f"{'RECAP' if error is None else 'STOPPED'} [{self.task}] {self.role}: {counts}", flush=True)

    @property
    def result(self):
        return dict(self.counts, task=self.task, role=self.role)


def summary(results):
    """Add up the `result`s of several tasks."""
    return {kind: sum(r[kind] for r in results) for kind in KINDS}
