"""The selftest's DNS query builder and answer parser, against dpkt."""

from __future__ import annotations

import contextlib

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxyvpn.selftest import dns_query, parse_answers


def test_query_is_valid_dns():
    qid, wire = dns_query("ifconfig.me")
    msg = dpkt.dns.DNS(wire)
    assert msg.id == qid and msg.qd[0].name == "ifconfig.me" and msg.qd[0].type == dpkt.dns.DNS_A


def reply_for(wire: bytes, addresses: list[bytes], rcode: int = 0) -> bytes:
    msg = dpkt.dns.DNS(wire)
    msg.op = dpkt.dns.DNS_RA
    msg.qr = dpkt.dns.DNS_R
    msg.rcode = rcode
    msg.an = [dpkt.dns.DNS.RR(name=msg.qd[0].name, type=dpkt.dns.DNS_A, cls=1, ttl=60,
                              rdata=addr) for addr in addresses]
    return bytes(msg)


def test_parses_a_records():
    qid, wire = dns_query("example.test")
    reply = reply_for(wire, [bytes([192, 0, 2, 1]), bytes([198, 51, 100, 7])])
    assert parse_answers(qid, reply) == ["192.0.2.1", "198.51.100.7"]


def test_rejects_wrong_id_error_rcode_and_short_replies():
    qid, wire = dns_query("example.test")
    with pytest.raises(ValueError, match="id mismatch"):
        parse_answers(qid ^ 1, reply_for(wire, []))
    with pytest.raises(ValueError, match="rcode 3"):
        parse_answers(qid, reply_for(wire, [], rcode=3))
    with pytest.raises(ValueError, match="short"):
        parse_answers(qid, b"\x00" * 5)


@given(st.binary(max_size=300))
def test_garbage_raises_only_valueerror(data):
    with contextlib.suppress(ValueError):
        parse_answers(int.from_bytes(data[:2] or b"\0\0", "big"), data)
