"""Debugging aids of the data path: --pcap writes what the TUN saw; --pure-python runs the
same traffic on the pure-Python packet path."""

from __future__ import annotations

import json
import socket
import struct

import dpkt
from topology import SERVER4, SERVER6

from proxyvpn.netstack import wire
from proxyvpn.system.tun import takes_big_ipv4, takes_big_ipv6

MB = 1 << 20


def test_pcap_records_both_directions(lab):
    pcap = lab.workdir / "tun.pcap"
    # squid writes ~100 KB at a time, so segments over 64 KiB come every run; behind
    # tinyproxy's small writes they came only when data piled up (none, once in CI).
    lab.start_squid()
    lab.start_server()
    lab.start_vpn("--pcap", str(pcap))
    lab.tool(lab.client, "client", "--host", SERVER4, "--up", str(MB), "--down", str(MB))
    lab.tool(lab.client, "client", "--host", SERVER6, "--up", "0", "--down", str(MB))
    assert lab.stop_vpn() == 0
    assert pcap.stat().st_mode & 0o077 == 0  # may hold private payloads
    seen = {"to_server": 0, "from_server": 0, "syn": 0, "big": 0, "big6": 0}
    payload = 0
    server6 = socket.inet_pton(socket.AF_INET6, SERVER6)
    with open(pcap, "rb") as fh:
        reader = dpkt.pcap.Reader(fh)
        assert reader.datalink() in (dpkt.pcap.DLT_RAW, 101)
        for _, buf in reader:
            if buf[0] >> 4 == 6 and buf[6] == 0 and buf[8:24] == server6:
                # An IPv6 download segment over 64 KiB: length 0, a Hop-by-Hop header
                # whose Jumbo Payload option has the length, and a complete checksum.
                tcp = buf[48:]
                assert buf[4:6] == b"\0\0" and len(buf) > 0xFFFF + 40
                assert buf[40:48] == bytes([6, 0, 0xC2, 4]) + struct.pack("!I", len(buf) - 40)
                pseudo = buf[8:40] + struct.pack("!I", len(tcp)) + b"\0\0\0\x06"
                assert wire.checksum(pseudo + tcp) == 0
                seen["big6"] += 1
                continue
            if buf[0] >> 4 != 4:
                continue  # the IPv6 flow's other packets, the kernel's router solicitations
            if buf[2:4] == b"\0\0" and len(buf) > 0xFFFF:
                # A download segment over 64 KiB (BIG TCP, Linux 6.6+): its length field
                # is 0. Complete all the same: the TCP checksum over a pseudo-header
                # with the 32-bit length.
                tcp = buf[20:]
                pseudo = buf[12:20] + b"\x00\x06" + struct.pack("!I", len(tcp))
                assert buf[9] == 6 and wire.checksum(pseudo + tcp) == 0
                assert buf[12:16] == bytes([10, 77, 2, 2])
                seen["big"] += 1
                seen["from_server"] += 1
                continue
            # Complete packets with valid checksums, although on the offloaded TUN they
            # carry virtio headers and partial checksums (engine._complete_vnet).
            assert isinstance(wire.parse(buf), tuple), wire.parse(buf)
            ip = dpkt.ip.IP(buf)
            tcp = ip.data
            if ip.dst == bytes([10, 77, 2, 2]):
                seen["to_server"] += 1
                payload += len(tcp.data)
                seen["syn"] += bool(tcp.flags & dpkt.tcp.TH_SYN)
            elif ip.src == bytes([10, 77, 2, 2]):
                seen["from_server"] += 1
    assert seen["to_server"] and seen["from_server"] and seen["syn"] == 1, seen
    assert bool(seen["big"]) == takes_big_ipv4(), seen
    assert bool(seen["big6"]) == takes_big_ipv6(), seen
    assert payload >= MB  # every byte the app sent went through the TUN


def test_pure_python_path_moves_data_correctly(lab):
    lab.start_server()
    lab.start_vpn("--pure-python")
    for server in (SERVER4, SERVER6):  # IPv6: its segments over 64 KiB built in Python
        out = lab.tool(lab.client, "client", "--host", server, "--up", str(4 * MB),
                       "--down", str(4 * MB), "--conns", "2")
        assert json.loads(out.stdout)["ok"]
    import time
    time.sleep(1.2)
    assert lab.stats()["fast_path"] == "python"
