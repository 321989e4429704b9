"""When an app's half-close reaches the proxy (aio/flow.py): only once the proxy has
acknowledged every byte the app sent, and the reply has then been quiet for
half_close_delay. Time is a fake loop's; the tunnel reports what the kernel would."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from proxyvpn.aio.flow import EOF_POLL_MAX, Flow
from proxyvpn.netstack.events import PeerClosed
from proxyvpn.netstack.tcp import TcpConnection, TcpParams

# The engine and tunnel below are stand-ins for compiled classes' typed attributes.
pytestmark = pytest.mark.interpreted

DELAY = 1.0


@dataclass
class Loop:
    """call_at / time, run by hand."""

    now: float = 0.0
    timers: list = field(default_factory=list)
    seq: int = 0

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any) -> Any:
        self.seq += 1
        handle = SimpleNamespace(cancelled=False, cancel=lambda: setattr(handle, "cancelled", True))
        heapq.heappush(self.timers, (when, self.seq, callback, handle))
        return handle

    def run_until(self, t: float) -> None:
        while self.timers and self.timers[0][0] <= t:
            when, _, callback, handle = heapq.heappop(self.timers)
            self.now = when
            if not handle.cancelled:
                callback()
        self.now = t


class Tunnel:
    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.acked_at = 0.0  # the proxy's kernel acknowledges the app's bytes then
        self.eof_at: float | None = None

    def unacknowledged(self) -> int:
        return 0 if self.loop.now >= self.acked_at else 4096

    def write_eof(self) -> None:
        assert self.eof_at is None
        self.eof_at = self.loop.now

    def write_buffer_size(self) -> int:
        return 0

    def attach(self, sink: Any) -> None:
        pass


def half_closed_flow(acked_at: float) -> tuple[Loop, Tunnel, Flow]:
    loop = Loop()
    engine = SimpleNamespace(config=SimpleNamespace(half_close_delay=DELAY), _loop=loop,
                             params=TcpParams(), poller=None)
    conn = TcpConnection(TcpParams(), iss=1, irs=1, peer_window=65535)
    flow = Flow(engine, (b"\x0a\x00\x00\x02", 1, b"\x0a\x00\x00\x03", 2), 4, conn,
                "10.0.0.3", 2)  # type: ignore[arg-type]
    tunnel = Tunnel(loop)
    tunnel.acked_at = acked_at
    flow.tunnel = tunnel  # type: ignore[assignment]
    conn._events.append(PeerClosed())
    flow.handle_events(loop.now)  # the app's FIN, at t = 0
    return loop, tunnel, flow


@pytest.mark.parametrize("acked_at", [0.0, 0.3, 0.99, 1.0, 2.7, 30.0])
def test_the_fin_waits_the_delay_after_the_proxy_acknowledged_everything(acked_at: float) -> None:
    loop, tunnel, _ = half_closed_flow(acked_at)
    loop.run_until(acked_at + 60)
    assert tunnel.eof_at is not None
    after_ack = tunnel.eof_at - max(acked_at, 0.0)
    # The full quiet period after the ACK, noticed within one poll.
    assert DELAY <= after_ack <= DELAY + min(DELAY / 4, EOF_POLL_MAX) + 1e-9, tunnel.eof_at
    assert not loop.timers or all(h.cancelled for *_, h in loop.timers)  # nothing left armed


def test_reply_data_while_held_pushes_the_fin_back() -> None:
    loop, tunnel, flow = half_closed_flow(0.0)
    loop.run_until(0.8)
    flow.last_rx = loop.now  # tunnel_data() does this when the reply moves
    loop.run_until(1.5)
    assert tunnel.eof_at is None
    loop.run_until(5)
    assert tunnel.eof_at == pytest.approx(1.8)


def test_no_fin_while_the_proxy_never_acknowledges() -> None:
    """A proxy that stops reading: the FIN stays held (it could not be delivered behind
    the unread bytes anyway), polled at most every EOF_POLL_MAX."""
    loop, tunnel, _ = half_closed_flow(float("inf"))
    loop.run_until(100)
    assert tunnel.eof_at is None
    assert len(loop.timers) >= 1 and loop.timers[0][0] - loop.now <= EOF_POLL_MAX


def test_no_fin_while_we_have_stopped_reading_the_reply() -> None:
    """The app half-closed, then takes the reply slower than the proxy sends it: we stop
    reading the proxy (back-pressure), so no reply arrives, which is no quiet. A FIN then
    would make the proxy drop the tunnel with the rest of the reply (squid does)."""
    loop, tunnel, flow = half_closed_flow(0.0)
    flow._reading_paused = True
    loop.run_until(10 * DELAY)
    assert tunnel.eof_at is None
    flow._reading_paused = False  # _push_pending() resumes reading; then the reply ends
    resumed = loop.now
    loop.run_until(resumed + 60)
    assert tunnel.eof_at is not None
    assert DELAY <= tunnel.eof_at - resumed <= DELAY + EOF_POLL_MAX + 1e-9
