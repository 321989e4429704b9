"""SO_RCVLOWAT on proxy sockets (relay/transport.py): while the proxy streams, a wake-up
waits for a whole read, and a tail below the mark still arrives within the hold."""

from __future__ import annotations

import json

from nslib import REPO
from topology import PYTHON

from proxyvpn.relay.transport import READ_SIZE, STREAM_HOLD


def test_a_tail_below_the_read_mark_is_held_only_for_the_hold(ns):
    ns.run("ip", "link", "set", "lo", "mtu", "1500")
    result = ns.run("env", f"PYTHONPATH={REPO}:{REPO}/tests/netns:{REPO}/tests/unit", PYTHON, "-m",
                    "stream_mark_driver", timeout=60)
    got = json.loads(result.stdout.strip().splitlines()[-1])
    for name, case in got.items():
        assert "error" not in case, (name, case)
        assert case["marked"] == READ_SIZE and case["arrived"] and case["intact"], (name, case)
        assert case["mark_after"] == 1, (name, case)  # dropped once the stream paused
    # The kernel really holds a sub-mark tail (so the mark saves wake-ups), and the hold
    # releases it: without that, it would wait for bytes that never come.
    slow = got["held_then_read"]
    assert slow["held"] and 0.25 <= slow["waited"] < 2.0, slow
    assert got["default_hold"]["waited"] < STREAM_HOLD + 0.5, got["default_hold"]
    # The hold ran out while we did not read (back-pressure): resuming still gets it all,
    # within a hold of the last read (the rest of the stream may raise the mark again).
    paused = got["paused_past_the_hold"]
    assert paused["after_resume"] < 1.0, paused
