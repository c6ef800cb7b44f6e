"""The scheduler of `make test` under pytest-xdist (`--dist loadgroup`, tests/conftest.py).

pytest-xdist's own loadgroup scheduler reads each test's group from a `@group` suffix that
its worker plugin appends to the test's node id. pytest 9.2 keeps node ids in a structured
field that suffix no longer reaches (pytest-xdist issue 1386), so the groups are silently
dropped: every test becomes its own unit, a file's tests run in both processes (each builds
the module fixtures), and two SLURM clusters or two 1.5 GB tables can run side by side.

This scheduler takes the groups from the workers through a file instead: each worker
writes `{node id: group}` (tests/conftest.py, `write_groups`) to the path in
`TML_TEST_GROUPS` before it reports its collection, and the scheduler reads it when it
splits the collection into units. The units go out in collection order, which the workers
sort costliest group first; a process gets its next unit only when its last queued test
starts (xdist's default hands it out two tests earlier, which can leave a long group queued
behind a long test while the other process runs out of work).
"""

from __future__ import annotations

import json
import os

from xdist.scheduler import LoadScopeScheduling

GROUPS_ENV = "TML_TEST_GROUPS"


class GroupScheduling(LoadScopeScheduling):
    """LoadScopeScheduling whose scopes are the groups the workers wrote."""

    _groups: dict[str, str] | None = None

    def _split_scope(self, nodeid: str) -> str:
        if self._groups is None:
            path = os.environ.get(GROUPS_ENV)
            if not path or not os.path.isfile(path):
                raise RuntimeError(f"{GROUPS_ENV}: the workers wrote no test groups to {path!r}")
            with open(path) as f:
                self._groups = json.load(f)
        group = self._groups.get(nodeid)
        return group if group is not None else nodeid.split("::", 1)[0]

    def _reschedule(self, node) -> None:  # noqa: ANN001 (xdist's WorkerController)
        if node.shutting_down:
            return
        if not self.workqueue:
            node.shutdown()
            return
        # A worker runs a test once it knows the next one (or is told to stop): with one
        # test left it waits, and that is when it gets the next unit.
        if self._pending_of(self.assigned_work[node]) > 1:
            return
        self._assign_work_unit(node)
