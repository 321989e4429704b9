"""A stop signal never lands inside a pyroute2 request (system/netlink.py)."""

from __future__ import annotations

import os
import signal

from proxyvpn.system.netlink import _signals_deferred


def test_a_stop_signal_waits_for_the_request_then_arrives():
    seen: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with _signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # bytecodes enough for a delivered signal to run its handler
                pass
            assert seen == []
            assert signal.SIGTERM in signal.sigpending()
        assert seen == [signal.SIGTERM]
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.signal(signal.SIGTERM, old)
