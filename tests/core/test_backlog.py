"""The rules of bootherd.backlog, one test each (the order an overloaded server serves in)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bootherd.backlog import Backlog


def test_started_work_first():
    b: Backlog[str] = Backlog([None, None])
    b.add("new-1", "n1", 1, at=1.0)
    b.add("started", "s", 0, at=5.0)
    b.add("new-2", "n2", 1, at=2.0)
    assert list(b.take(now=6.0)) == ["started", "new-1", "new-2"]


def test_oldest_first_within_a_class_by_stamp_not_by_arrival():
    b: Backlog[str] = Backlog([None])
    b.add("b", "b", 0, at=2.0)
    b.add("c", "c", 0, at=3.0)
    b.add("a", "a", 0, at=1.0)  # read later, but the kernel stamped it first
    assert list(b.take(now=4.0)) == ["a", "b", "c"]


def test_a_repeat_is_queued_once_and_keeps_the_older_place():
    b: Backlog[str] = Backlog([None])
    assert b.add("first", ("mac", 7), 0, at=1.0)
    b.add("other", "x", 0, at=1.5)
    assert not b.add("retransmission", ("mac", 7), 0, at=2.0)
    assert list(b.take(now=3.0)) == ["first", "other"]
    assert b.counters.duplicates == 1
    # Once served, the same key is a new request again.
    assert b.add("later", ("mac", 7), 0, at=4.0)


def test_too_old_is_dropped_not_served_late():
    b: Backlog[str] = Backlog([None, 3.0])
    b.add("old discover", "d1", 1, at=0.0)
    b.add("fresh discover", "d2", 1, at=2.5)
    b.add("old request", "r1", 0, at=0.0)  # no deadline: finished whatever its age
    assert list(b.take(now=4.0)) == ["old request", "fresh discover"]
    assert b.counters.expired == 1


def test_a_retransmission_renews_the_deadline_of_the_request_it_joins():
    """A firmware DISCOVER still waiting when its 4 s retransmission arrives: the copy is
    folded into the waiting one (rule 3), which must then be answered (the client waits
    for that xid until its next retry at 12 s), not dropped with it as 5 s old."""
    b: Backlog[str] = Backlog([None, 3.0])
    b.add("discover", ("mac", 7), 1, at=0.0)
    b.add("other", "x", 1, at=0.5)
    assert not b.add("discover again", ("mac", 7), 1, at=4.0)
    assert list(b.take(now=5.0)) == ["discover"]  # its place kept, "other" expired
    assert b.counters.expired == 1 and b.counters.duplicates == 1


def test_take_limit_leaves_the_rest_in_order():
    b: Backlog[int] = Backlog([None])
    for i in range(10):
        b.add(i, i, 0, at=float(i))
    assert list(b.take(now=20.0, limit=4)) == [0, 1, 2, 3]
    b.add(99, 99, 0, at=0.5)
    assert list(b.take(now=20.0)) == [99, 4, 5, 6, 7, 8, 9]
    assert len(b) == 0


def test_full_backlog_sheds_new_work_for_started_work():
    b: Backlog[str] = Backlog([None, None], capacity=2)
    b.add("new-1", "n1", 1, at=1.0)
    b.add("new-2", "n2", 1, at=2.0)
    assert not b.add("new-3", "n3", 1, at=3.0)  # no room, nothing less urgent to drop
    assert b.add("started", "s", 0, at=4.0)  # takes the place of the youngest new one
    assert list(b.take(now=5.0)) == ["started", "new-1"]
    assert b.counters.overflow == 2


def test_discard():
    b: Backlog[str] = Backlog([None])
    b.add("gone", "g", 0, at=1.0)
    b.add("kept", "k", 0, at=2.0)
    assert b.discard("g") == "gone"
    assert b.discard("g") is None
    assert b.waiting() == [1]
    assert list(b.take(now=3.0)) == ["kept"]


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 2), st.floats(0, 100)),
                max_size=60), st.floats(0, 200))
def test_any_backlog_serves_by_class_then_age_each_key_once(reqs, now):
    b: Backlog[tuple] = Backlog([None, 50.0, 10.0], capacity=40)
    for key, cls, at in reqs:
        b.add((key, cls, at), key, cls, at)
    out = list(b.take(now))
    keys = [k for k, _, _ in out]
    assert len(keys) == len(set(keys))
    assert [(c, a) for _, c, a in out] == sorted((c, a) for _, c, a in out)
    for key, cls, _at in out:  # a deadline runs from the key's latest copy
        latest = max(a for k, _, a in reqs if k == key)
        assert b.deadlines[cls] is None or now - latest <= b.deadlines[cls]
    assert len(b) == 0
