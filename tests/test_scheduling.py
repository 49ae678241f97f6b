"""The scheduler's bookkeeping: caps on what runs, limits on what is claimed ahead, turn-taking."""

from __future__ import annotations

from datetime import UTC, datetime

from dispatcher.claiming import Job
from dispatcher.scheduling import Scheduler

_ids = iter(range(1, 1_000_000))


def job(endpoint_id: int) -> Job:
    n = next(_ids)
    return Job(
        n, 1, endpoint_id, 1, f"evt_{n}", "shop", "points.earned", "{}", datetime.now(UTC), None
    )


def scheduler(concurrency: int = 4, caps: dict[int, int] | None = None) -> Scheduler:
    caps = caps or {}
    return Scheduler(concurrency, 2, lambda eid: caps.get(eid, 2))


def start_all(s: Scheduler) -> list[Job]:
    started = []
    while (j := s.next()) is not None:
        started.append(j)
    return started


def test_running_jobs_never_exceed_the_global_or_the_endpoint_cap() -> None:
    s = scheduler(concurrency=4, caps={1: 3})
    for _ in range(5):
        s.add(job(1))
    s.add(job(2))
    started = start_all(s)
    assert [j.endpoint_id for j in started].count(1) == 3
    assert len(started) == 4
    assert (s.running, s.waiting) == (4, 2)


def test_a_finished_job_makes_room_for_the_next_one_of_its_endpoint() -> None:
    s = scheduler(concurrency=8, caps={1: 1})
    first, second = job(1), job(1)
    s.add(first)
    s.add(second)
    assert start_all(s) == [first]
    s.done(1)
    assert start_all(s) == [second]


def test_endpoints_take_turns_when_slots_are_scarce() -> None:
    s = scheduler(concurrency=1, caps={1: 5, 2: 5})
    for _ in range(3):
        s.add(job(1))
    for _ in range(3):
        s.add(job(2))
    order = []
    for _ in range(6):
        started = start_all(s)
        order += [j.endpoint_id for j in started]
        s.done(started[0].endpoint_id)
    assert order == [1, 2, 1, 2, 1, 2]


def test_claims_run_ahead_by_at_most_the_concurrency_and_twice_each_cap() -> None:
    s = scheduler(concurrency=4, caps={1: 2})
    assert s.claimable().free == 8
    for _ in range(3):
        s.add(job(1))
    start_all(s)
    slots = s.claimable()
    assert slots.free == 8 - 3
    assert slots.by_endpoint == {1: 4 - 3}
    s.add(job(1))
    assert s.claimable().saturated == [1]


def test_a_claim_is_wanted_when_a_batch_of_room_opens_or_the_queue_runs_dry() -> None:
    s = scheduler(concurrency=16)
    assert s.batch == 2
    for n in range(32):
        s.add(job(1000 + n))  # distinct endpoints, so only the global cap binds
    start_all(s)
    assert (s.running, s.waiting) == (16, 16)
    assert not s.hungry()
    s.done(1000)
    start_all(s)
    assert not s.hungry()  # one slot of room: not worth a round trip yet
    s.done(1001)
    start_all(s)
    assert s.hungry()


def test_take_waiting_hands_back_what_never_started() -> None:
    s = scheduler(concurrency=1, caps={1: 5})
    jobs = [job(1) for _ in range(3)]
    for j in jobs:
        s.add(j)
    started = start_all(s)
    assert started == jobs[:1]
    assert s.take_waiting() == jobs[1:]
    assert (s.running, s.waiting) == (1, 0)
    assert s.next() is None


def test_limited_endpoints_are_named_in_the_claimable_slots_even_with_nothing_held() -> None:
    s = scheduler(concurrency=8, caps={7: 1})
    assert s.claimable().by_endpoint == {}
    assert s.claimable(limited=[7]).by_endpoint == {7: 2}
    s.add(job(7))
    assert s.claimable(limited=[7]).by_endpoint == {7: 1}
