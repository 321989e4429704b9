"""BusyPollSelector: polls before it sleeps, only when no bulk data moves, and keeps the
caller's timeout. CPU time of this thread tells polling (CPU spent) from sleeping (none)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from proxyvpn.aio.busypoll import BULK_HOLD, DEFAULT_WINDOW_US, BusyPollSelector, window_seconds


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def _timed_select(selector: BusyPollSelector, timeout: float | None) -> tuple[list, float, float]:
    wall, cpu = time.monotonic(), time.thread_time()
    ready = selector.select(timeout)
    return ready, time.monotonic() - wall, time.thread_time() - cpu


def test_polls_for_a_packet_that_comes_within_the_window(pair):
    a, b = pair
    selector = BusyPollSelector(window=1.0)
    selector.register(a, 1)  # EVENT_READ
    timer = threading.Timer(0.1, b.send, (b"x",))
    timer.start()
    ready, wall, cpu = _timed_select(selector, None)
    timer.join()
    assert [key.fileobj for key, _ in ready] == [a]
    assert wall < 0.9
    assert cpu > 0.03, "the wait was slept, not polled"


def test_sleeps_after_the_window_and_keeps_the_timeout(pair):
    a, _ = pair
    selector = BusyPollSelector(window=0.02)
    selector.register(a, 1)
    ready, wall, cpu = _timed_select(selector, 0.3)
    assert ready == []
    assert 0.3 <= wall < 1.0
    assert cpu < 0.15, "it polled for the whole timeout, not only the window"


def test_no_polling_while_bulk_data_moves(pair):
    a, b = pair
    selector = BusyPollSelector(window=1.0)
    selector.register(a, 1)
    selector.bulk()
    ready, wall, cpu = _timed_select(selector, BULK_HOLD / 2)
    assert ready == [] and wall >= BULK_HOLD / 2
    assert cpu < BULK_HOLD / 4
    time.sleep(BULK_HOLD)  # the hold is over: polling again
    _, _, cpu = _timed_select(selector, 0.1)
    assert cpu > 0.03


def test_zero_timeout_and_zero_window_never_poll(pair):
    a, _ = pair
    selector = BusyPollSelector(window=1.0)
    selector.register(a, 1)
    ready, wall, _ = _timed_select(selector, 0)
    assert ready == [] and wall < 0.1
    off = BusyPollSelector(window=0)
    off.register(a, 1)
    ready, wall, cpu = _timed_select(off, 0.2)
    assert ready == [] and wall >= 0.2 and cpu < 0.05


def test_an_event_loop_on_it_runs_readers_and_timers(pair):
    a, b = pair
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


def test_default_window_needs_a_second_cpu_and_a_given_one_is_kept():
    assert window_seconds(None, cpus=4) == DEFAULT_WINDOW_US / 1e6
    assert window_seconds(None, cpus=1) == 0
    assert window_seconds(50, cpus=1) == 50e-6
    assert window_seconds(0, cpus=8) == 0
