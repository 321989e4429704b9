"""Debugging aids of the data path: --pcap writes what the TUN saw; --pure-python runs the
same traffic on the pure-Python packet path."""

from __future__ import annotations

import json
import struct

import dpkt
from topology import SERVER4

from proxyvpn.netstack import wire
from proxyvpn.system.tun import takes_big_ipv4

MB = 1 << 20


def test_pcap_records_both_directions(lab):
    pcap = lab.workdir / "tun.pcap"
    lab.start_server()
    lab.start_vpn("--pcap", str(pcap))
    lab.tool(lab.client, "client", "--host", SERVER4, "--up", str(MB), "--down", str(MB))
    assert lab.stop_vpn() == 0
    assert pcap.stat().st_mode & 0o077 == 0  # may hold private payloads
    seen = {"to_server": 0, "from_server": 0, "syn": 0, "big": 0}
    payload = 0
    with open(pcap, "rb") as fh:
        reader = dpkt.pcap.Reader(fh)
        assert reader.datalink() in (dpkt.pcap.DLT_RAW, 101)
        for _, buf in reader:
            if buf[0] >> 4 != 4:
                continue  # e.g. the kernel's IPv6 router solicitations on the TUN
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
    assert payload >= MB  # every byte the app sent went through the TUN


def test_pure_python_path_moves_data_correctly(lab):
    lab.start_server()
    lab.start_vpn("--pure-python")
    out = lab.tool(lab.client, "client", "--host", SERVER4, "--up", str(4 * MB),
                   "--down", str(4 * MB), "--conns", "2")
    assert json.loads(out.stdout)["ok"]
    import time
    time.sleep(1.2)
    assert lab.stats()["fast_path"] == "python"
