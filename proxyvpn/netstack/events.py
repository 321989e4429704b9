"""Events a :class:`~proxyvpn.netstack.tcp.TcpConnection` reports to its engine.

The engine drains them with ``next_event()`` after feeding segments or timers.
Each is a frozen, slotted dataclass so it is cheap to create on the hot path and
cannot be changed by whoever handles it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Established:
    """The app's ACK completed the three-way handshake (RFC 9293 §3.5)."""


@dataclass(frozen=True, slots=True)
class DataReceived:
    """In-order bytes from the app, ready to be written to the proxy socket."""

    data: bytes | memoryview
    """The bytes, in stream order, directly after those of the previous event (a
    read-only view when they lie in an immutable packet)."""


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The app's FIN was consumed in order: no more data will come from it.

    The engine shuts down the writing side of the proxy socket (half-close).
    """


@dataclass(frozen=True, slots=True)
class SendSpaceAvailable:
    """Acknowledged data freed send space after ``send()`` had run short.

    Emitted once per shortage, when at least half of ``snd_buf`` is free again, so
    the engine resumes reading from the proxy with hysteresis instead of
    flapping on every ACK.
    """


@dataclass(frozen=True, slots=True)
class ConnectionReset:
    """The app sent an acceptable RST (RFC 9293 §3.10.7.4, RFC 5961 §3)."""


@dataclass(frozen=True, slots=True)
class TimedOut:
    """The connection was aborted (with a RST) because the app stopped answering.

    Raised for exhausted retransmissions, an unanswered SYN-ACK, a zero window that
    the app stopped acknowledging, or the idle timeout.
    """


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection reached CLOSED; the engine forgets it. Exactly one per connection."""


TcpEvent = (
    Established
    | DataReceived
    | PeerClosed
    | SendSpaceAvailable
    | ConnectionReset
    | TimedOut
    | Closed
)
"""Union of everything ``TcpConnection.next_event()`` can return."""
