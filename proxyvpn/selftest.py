"""`proxyvpn selftest`: a DNS probe (UDP, or TCP through the proxy) and the routing state."""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import struct
import subprocess
import time
from pathlib import Path

import click

from proxyvpn.config import parse_proxy_url
from proxyvpn.errors import ConfigError, ProxyError, ProxyVpnError
from proxyvpn.relay.connect import ConnectResponseParser, build_connect_request


def dns_query(name: str) -> tuple[int, bytes]:
    """A minimal A query (RFC 1035 §4.1): returns (id, wire bytes)."""
    qid = secrets.randbits(16)
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    labels = b"".join(len(p).to_bytes(1, "big") + p.encode("idna")
                      for p in name.rstrip(".").split("."))
    return qid, header + labels + b"\x00" + struct.pack("!HH", 1, 1)


def parse_answers(qid: int, reply: bytes) -> list[str]:
    """IPv4 addresses from the answer section; raises ValueError on a malformed reply."""
    try:
        return _parse_answers(qid, reply)
    except (IndexError, struct.error):
        raise ValueError("truncated or malformed DNS reply") from None


def _parse_answers(qid: int, reply: bytes) -> list[str]:
    if len(reply) < 12:
        raise ValueError("short DNS reply")
    rid, flags, qd, an, _, _ = struct.unpack("!HHHHHH", reply[:12])
    if rid != qid:
        raise ValueError("DNS reply id mismatch")
    if flags & 0xF:
        raise ValueError(f"DNS error rcode {flags & 0xF}")
    pos = 12
    for _ in range(qd):
        pos = _skip_name(reply, pos) + 4
    found = []
    for _ in range(an):
        pos = _skip_name(reply, pos)
        rtype, _, _, rdlen = struct.unpack("!HHIH", reply[pos:pos + 10])
        pos += 10
        if rtype == 1 and rdlen == 4:
            found.append(str(ipaddress.IPv4Address(reply[pos:pos + 4])))
        pos += rdlen
    return found


def _skip_name(data: bytes, pos: int) -> int:
    while True:
        if pos >= len(data):
            raise ValueError("truncated name")
        length = data[pos]
        if length & 0xC0 == 0xC0:
            return pos + 2
        if length == 0:
            return pos + 1
        pos += length + 1


def first_resolver() -> str | None:
    try:
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver" and ":" not in parts[1]:
                return parts[1]
    except OSError:
        pass
    return None


def probe_udp(name: str, server: str, timeout: float, mark: int | None) -> list[str]:
    qid, query = dns_query(name)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.settimeout(timeout)
        sock.sendto(query, (server, 53))
        reply, _ = sock.recvfrom(4096)
    return parse_answers(qid, reply)


def probe_tcp_via_proxy(name: str, server: str, proxy_url: str, timeout: float,
                        mark: int | None) -> list[str]:
    proxy = parse_proxy_url(proxy_url)
    qid, query = dns_query(name)
    deadline = time.monotonic() + timeout
    infos = socket.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.settimeout(timeout)
        sock.connect(addr)
        sock.sendall(build_connect_request(server, 53, proxy.credentials))
        parser = ConnectResponseParser()
        response = None
        while response is None:
            chunk = sock.recv(4096)
            if not chunk:
                raise ProxyVpnError("proxy closed the connection during CONNECT")
            response = parser.feed(chunk)
        if not response.ok:
            raise ProxyError(response.status, response.reason, f"{server}:53")
        sock.sendall(struct.pack("!H", len(query)) + query)
        data = bytearray(response.leftover)
        while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            chunk = sock.recv(4096)
            if not chunk:
                raise ProxyVpnError("DNS server closed the TCP connection")
            data += chunk
    return parse_answers(qid, bytes(data[2:]))


def run(*, name: str, server: str | None, timeout_ms: int, no_ip: bool, proxy_url: str | None,
        socket_mark: str | None) -> int:
    """Print the probe result and, unless no_ip, the routing state. Exit 0 if DNS worked."""
    mark = int(socket_mark, 0) if socket_mark else None
    server = server or first_resolver()
    if not server:
        raise ConfigError("no IPv4 nameserver in /etc/resolv.conf: pass --server")
    timeout = timeout_ms / 1000
    how = f"TCP via proxy {parse_proxy_url(proxy_url).display()}" if proxy_url else "UDP"
    ok = True
    try:
        if proxy_url:
            answers = probe_tcp_via_proxy(name, server, proxy_url, timeout, mark)
        else:
            answers = probe_udp(name, server, timeout, mark)
        click.echo(f"DNS {name} @ {server} ({how}): OK {', '.join(answers) or '(no A records)'}")
    except (OSError, ValueError, ProxyVpnError) as exc:
        ok = False
        click.echo(f"DNS {name} @ {server} ({how}): FAILED: {exc}")
    if not no_ip:
        for cmd in (["ip", "rule", "show"], ["ip", "-6", "rule", "show"],
                    ["ip", "route", "show", "table", "all"], ["nft", "list", "table", "inet", "proxyvpn"],
                    ["iptables-save"], ["ip6tables-save"]):
            click.echo(f"$ {' '.join(cmd)}" + (" | grep PROXYVPN" if cmd[0].endswith("-save") else ""))
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=5,
                                     env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")})
                out = res.stdout or res.stderr
                if cmd[0].endswith("-save"):  # the iptables backend's chains, if any
                    out = "\n".join(line for line in res.stdout.splitlines() if "PROXYVPN" in line)
                click.echo(out.rstrip() or "(empty)")
            except (OSError, subprocess.TimeoutExpired) as exc:
                click.echo(f"(unavailable: {exc})")
    return 0 if ok else 1
