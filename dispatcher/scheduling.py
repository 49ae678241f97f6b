"""Slots: which claimed jobs run now, which wait for a slot, and how much more to claim.

The daemon claims ahead of its slots (up to `concurrency` jobs waiting beside `concurrency`
running), so a finished request is followed by the next one at once instead of after a database
round trip. Caps hold for what runs: `concurrency` in all and each endpoint's own cap; what is
claimed per endpoint is held to twice its cap, so one endpoint's backlog cannot fill the queue.
Pure bookkeeping, no I/O: the daemon starts the tasks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from .claiming import Job, Slots


class Scheduler:
    """Running and waiting jobs, per endpoint, with the caps that bound both."""

    def __init__(self, concurrency: int, default_cap: int, cap: Callable[[int], int]) -> None:
        self.concurrency = concurrency
        self.default_cap = default_cap
        self._cap = cap
        self.running = 0
        self.waiting = 0
        self._running: dict[int, int] = {}
        self._waiting: dict[int, deque[Job]] = {}
        # Endpoints with a waiting job and a free slot of their own, oldest first (an ordered set).
        self._startable: dict[int, None] = {}

    @property
    def batch(self) -> int:
        """The smallest claim worth a round trip while the queue is still fed."""
        return max(1, self.concurrency // 8)

    def claimable(self, limited: Iterable[int] = ()) -> Slots:
        """How much more to claim: up to `concurrency` waiting in all, twice its cap each.
        `limited` endpoints are named even with nothing held here, so that a cap lower than
        their max_in_flight (see daemon.FAILING_CAP) holds for what is claimed too."""
        held = dict(self._running)
        for eid, jobs in self._waiting.items():
            held[eid] = held.get(eid, 0) + len(jobs)
        for eid in limited:
            held.setdefault(eid, 0)
        per_endpoint = {eid: 2 * self._cap(eid) - n for eid, n in held.items()}
        free = 2 * self.concurrency - self.running - self.waiting
        return Slots(free, per_endpoint, self.default_cap)

    def hungry(self) -> bool:
        """Whether a claim is due: the queue ran dry, or a batch's worth of room opened up."""
        free = 2 * self.concurrency - self.running - self.waiting
        return free >= self.batch or (self.waiting == 0 and free > 0)

    def add(self, job: Job) -> None:
        """Queue a claimed job for its endpoint."""
        eid = job.endpoint_id
        self._waiting.setdefault(eid, deque()).append(job)
        self.waiting += 1
        if self._running.get(eid, 0) < self._cap(eid):
            self._startable[eid] = None

    def next(self) -> Job | None:
        """Take the next job to start now, if a slot allows; endpoints take turns."""
        if self.running >= self.concurrency or not self._startable:
            return None
        eid = next(iter(self._startable))
        del self._startable[eid]
        queue = self._waiting[eid]
        job = queue.popleft()
        self.waiting -= 1
        running = self._running.get(eid, 0) + 1
        self._running[eid] = running
        self.running += 1
        if not queue:
            del self._waiting[eid]
        elif running < self._cap(eid):
            self._startable[eid] = None  # to the back: the other endpoints go first
        return job

    def done(self, endpoint_id: int) -> None:
        """Free a running job's slot."""
        left = self._running[endpoint_id] - 1
        if left:
            self._running[endpoint_id] = left
        else:
            del self._running[endpoint_id]
        self.running -= 1
        # Below its cap again (a lowered cap may leave it over for a while).
        if self._waiting.get(endpoint_id) and left < self._cap(endpoint_id):
            self._startable[endpoint_id] = None

    def resize(self, concurrency: int, default_cap: int) -> None:
        """New limits for what starts next; running jobs are left to finish, so with lower
        limits nothing starts until enough of them have."""
        self.concurrency = concurrency
        self.default_cap = default_cap
        self._startable = {
            eid: None for eid in self._waiting if self._running.get(eid, 0) < self._cap(eid)
        }

    def take_waiting(self, keep: Callable[[Job], bool] | None = None) -> list[Job]:
        """Remove waiting jobs (all, or those `keep` rejects) and return them, to release."""
        removed: list[Job] = []
        for eid in list(self._waiting):
            queue = self._waiting[eid]
            kept = deque(j for j in queue if keep is not None and keep(j))
            removed.extend(j for j in queue if keep is None or not keep(j))
            if kept:
                self._waiting[eid] = kept
            else:
                del self._waiting[eid]
                self._startable.pop(eid, None)
        self.waiting -= len(removed)
        return removed
