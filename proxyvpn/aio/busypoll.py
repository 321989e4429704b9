"""Poll briefly before sleeping, so an interactive exchange does not pay a CPU wake-up.

Each request/reply crosses proxyvpn twice; when the event loop sleeps in epoll between
them, the next packet has to wake this process (and, on a VM, an idle vCPU) first:
tens of µs per hop, measured as most of the latency proxyvpn adds. Polling the ready
list for a short window before blocking catches the next packet without that wake-up,
the trade the kernel's own busy polling (SO_BUSY_POLL) and cpuidle-haltpoll (200 µs by
default) make.

The window is spent only where it pays: once each time the loop is about to block (an
idle engine wakes once a second, for the stats file: 200 µs of polling a second), and
not while bulk data flows (a bulk transfer keeps the loop busy anyway, and polling
between its reads took CPU the proxy and the app needed: +15 % CPU per GB).
"""

from __future__ import annotations

import selectors
import time
from collections.abc import Callable

DEFAULT_WINDOW_US = 200
"""The window when the user gave none and there is more than one CPU to run on."""

BULK_BYTES = 16 * 1024
"""A read this large (one TUN batch, one proxy recv) means bulk data is moving."""

BULK_HOLD = 0.05
"""Seconds after the last bulk-sized read during which the loop does not poll."""


def window_seconds(setting_us: int | None, cpus: float) -> float:
    """The polling window for ``--busy-poll`` (µs; None: not given) on ``cpus`` usable CPUs.

    By default there is no polling on a single CPU: the packet being waited for would
    mostly come from a process (the app, a local proxy) that needs that CPU to send it."""
    if setting_us is None:
        setting_us = DEFAULT_WINDOW_US if cpus > 1 else 0
    return setting_us / 1e6


class BusyPollSelector(selectors.EpollSelector):
    """An epoll selector that polls for up to ``window`` seconds before it blocks."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window = window
        self._clock = clock
        self._quiet_from = 0.0  # clock time from which polling is allowed again

    def bulk(self) -> None:
        """Tell the selector bulk data is moving: no polling for a while."""
        self._quiet_from = self._clock() + BULK_HOLD

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if self.window > 0 and (timeout is None or timeout > 0):
            clock = self._clock
            start = clock()
            if start >= self._quiet_from:
                poll = super().select
                deadline = start + (self.window if timeout is None else min(self.window, timeout))
                while True:
                    ready = poll(0)
                    if ready:
                        return ready
                    if clock() >= deadline:
                        break
                if timeout is not None:
                    timeout = max(0.0, timeout - (clock() - start))
        return super().select(timeout)
