"""BusyPollSelector: polls before it sleeps, only when no bulk data moves, and keeps the
caller's timeout; the default window and the CPU count it depends on.

The selector's own decisions are checked on a fake clock against a recording epoll (what
it asked the kernel for, with which timeouts), so a loaded CI machine cannot change them;
one test runs a real event loop on it."""

from __future__ import annotations

import asyncio
import selectors
import socket

import pytest

from proxyvpn.aio.busypoll import (
    BULK_HOLD,
    DEFAULT_WINDOW_US,
    BusyPollSelector,
    window_seconds,
)
from proxyvpn.system.cgroups import cpu_limit, parse_cpu_max

STEP = 10e-6
"""The fake clock advances this much per reading (one poll costs about that)."""


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += STEP
        return self.now


@pytest.fixture
def epoll(monkeypatch):
    """Records every timeout the selector passes to epoll; ``ready_after`` polls with
    timeout 0 come back empty before one returns an event."""
    calls: list[float | None] = []
    state = {"ready_after": None}

    def select(self, timeout=None):
        calls.append(timeout)
        n = state["ready_after"]
        if n is not None and timeout == 0 and calls.count(0) > n:
            return [("key", selectors.EVENT_READ)]
        return []

    monkeypatch.setattr(selectors.EpollSelector, "select", select)
    return calls, state


def test_polls_until_an_event_comes_within_the_window(epoll):
    calls, state = epoll
    state["ready_after"] = 5
    selector = BusyPollSelector(window=1e-3, clock=FakeClock())
    assert selector.select(None) == [("key", selectors.EVENT_READ)]
    assert calls == [0] * 6, "it blocked instead of polling, or polled past the event"


def test_after_the_window_it_blocks_for_the_rest_of_the_timeout(epoll):
    calls, _ = epoll
    clock = FakeClock()
    selector = BusyPollSelector(window=100e-6, clock=clock)
    start = clock.now
    assert selector.select(0.3) == []
    polls, blocking = calls[:-1], calls[-1]
    assert polls == [0] * len(polls) and 5 <= len(polls) <= 11  # ~100 µs of 10 µs polls
    assert blocking is not None
    assert 0.3 - 2 * 100e-6 < blocking < 0.3, "the polling time was not taken off the timeout"
    assert abs((clock.now - start) + blocking - 0.3) < 3 * STEP


def test_a_timeout_shorter_than_the_window_bounds_the_polling(epoll):
    calls, _ = epoll
    selector = BusyPollSelector(window=1.0, clock=FakeClock())
    assert selector.select(50e-6) == []
    assert len(calls) <= 7, f"polled {len(calls) - 1} times for a 50 µs timeout"
    assert calls[-1] == 0.0


def test_without_a_timeout_it_polls_then_blocks_indefinitely(epoll):
    calls, _ = epoll
    selector = BusyPollSelector(window=50e-6, clock=FakeClock())
    selector.select(None)
    assert calls[0] == 0 and calls[-1] is None and len(calls) >= 3


def test_no_polling_while_bulk_data_moves(epoll):
    calls, _ = epoll
    clock = FakeClock()
    selector = BusyPollSelector(window=100e-6, clock=clock)
    selector.bulk()
    selector.select(0.01)
    assert calls == [0.01], "it polled during the bulk hold"
    clock.now += BULK_HOLD
    calls.clear()
    selector.select(0.01)
    assert calls.count(0) >= 5, "it did not poll again once the hold was over"


def test_zero_timeout_and_zero_window_never_poll(epoll):
    calls, _ = epoll
    BusyPollSelector(window=1.0, clock=FakeClock()).select(0)
    assert calls == [0]
    calls.clear()
    BusyPollSelector(window=0, clock=FakeClock()).select(0.2)
    assert calls == [0.2]


def test_an_event_loop_on_a_real_epoll_runs_readers_and_timers():
    a, b = socket.socketpair()
    a.setblocking(False)
    loop = asyncio.SelectorEventLoop(BusyPollSelector(window=0.001))
    try:
        got: list[bytes] = []
        done = loop.create_future()
        loop.add_reader(a, lambda: got.append(a.recv(10)))
        loop.call_later(0.05, lambda: b.send(b"ping"))
        loop.call_later(0.2, done.set_result, None)
        loop.run_until_complete(done)
        assert got == [b"ping"]
    finally:
        loop.remove_reader(a)
        loop.close()
        a.close()
        b.close()


def test_default_window_needs_a_second_cpu_and_a_given_one_is_kept():
    assert window_seconds(None, cpus=4) == DEFAULT_WINDOW_US / 1e6
    assert window_seconds(None, cpus=1) == 0
    assert window_seconds(None, cpus=0.5) == 0  # a CPU quota below one CPU
    assert window_seconds(50, cpus=1) == 50e-6
    assert window_seconds(0, cpus=8) == 0


def test_cpu_quota_of_the_cgroup_and_its_ancestors(tmp_path):
    assert parse_cpu_max("max 100000\n") is None
    assert parse_cpu_max("50000 100000\n") == 0.5
    assert parse_cpu_max("200000 100000") == 2.0
    assert parse_cpu_max("") is None and parse_cpu_max("x y") is None
    root = tmp_path
    (root / "system.slice" / "pv.service").mkdir(parents=True)
    assert cpu_limit(str(root), "/system.slice/pv.service") is None  # no cpu.max anywhere
    (root / "system.slice" / "pv.service" / "cpu.max").write_text("max 100000\n")
    (root / "system.slice" / "cpu.max").write_text("150000 100000\n")
    assert cpu_limit(str(root), "/system.slice/pv.service") == 1.5  # the parent's quota
    (root / "system.slice" / "pv.service" / "cpu.max").write_text("100000 100000\n")
    assert cpu_limit(str(root), "/system.slice/pv.service") == 1.0  # the tighter one
    assert cpu_limit(str(root), "/") is None
