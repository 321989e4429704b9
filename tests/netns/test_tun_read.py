"""Reading a real TUN: a packet longer than the read buffer is dropped, by both twins.

read() on a TUN truncates such a packet to the buffer and returns the buffer's length
(tun_chr_read_iter clamps it), so nothing uninitialised is ever handed over; what is
left must not pass parse(): its IP total length overruns what was read, and it is
dropped as a bad IP header -- counted, like any malformed packet."""

from __future__ import annotations

import json

from nslib import REPO
from topology import PYTHON

SCRIPT = r"""
import json, socket, subprocess, time
from proxyvpn import _fastpath
from proxyvpn.netstack import wire
from proxyvpn.system.tun import open_tun

tun = open_tun("pvtread0", mtu=9000, offload=False)
for cmd in ("ip addr add 10.66.0.1/24 dev pvtread0", "ip link set pvtread0 up"):
    subprocess.run(cmd.split(), check=True)
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
src, dst = socket.inet_aton("10.66.0.1"), socket.inet_aton("10.66.0.2")
out = {}
for name, impl in (("c", _fastpath), ("python", wire)):
    for size in (4000, 100):  # an IP packet of 4040 bytes, then one that fits
        packet = wire.build(4, src, dst, 40000, 80, 1, 1, wire.ACK, 1000, payload=b"x" * size)
        raw.sendto(packet, ("10.66.0.2", 0))
    got = []
    for _ in range(100):  # the kernel may queue them a little later
        got += [p for p in impl.read_batch(tun.fd, 8, 1500) if p[9] == 6]  # TCP only
        if len(got) >= 2:
            break
        time.sleep(0.02)
    out[name] = [(len(p), wire.DROP_REASONS[r] if type(r := impl.parse(p)) is int else "ok")
                 for p in got]
print(json.dumps(out))
"""


def test_a_packet_longer_than_the_buffer_is_dropped_by_both_twins(ns):
    result = ns.run("env", f"PYTHONPATH={REPO}", PYTHON, "-c", SCRIPT, timeout=60)
    got = json.loads(result.stdout.strip().splitlines()[-1])
    expected = [[1500, "bad_ip_header"], [140, "ok"]]  # its total length overruns the read
    assert got == {"c": expected, "python": expected}, got
