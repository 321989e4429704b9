"""Traffic tool for the lab: a checksum server and client, run inside namespaces.

Protocol per connection: the client sends 16 bytes (up: u64, down: u64), then `up`
bytes while the server sends `down` bytes; when the client has sent everything it shuts
down writing (half-close). The server, once it has read all `up` bytes, appends
sha256(received) and sha256(sent) and closes. Both sides' digests must match.

    tools.py serve --port 9000 [--bind ::] [--mode checksum|close-first|echo]
    tools.py client --host H --port 9000 --up N --down M [--conns K] [--family 4|6]
prints one JSON line; exit status 0 only if every connection verified.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import struct
import sys
import threading
import time

CHUNK = 256 * 1024


def _pattern(seed: int, size: int) -> bytes:
    """Deterministic pseudo-random bytes (cheap: a hashed block repeated with a counter)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:size])


def _stream(sock: socket.socket, total: int, seed: int) -> bytes:
    """Send `total` bytes and return their sha256."""
    digest = hashlib.sha256()
    block = _pattern(seed, CHUNK + 4096)
    sent = 0
    while sent < total:
        n = min(CHUNK - (sent % 4096), total - sent)
        data = block[sent % 4096: sent % 4096 + n]
        sock.sendall(data)
        digest.update(data)
        sent += n
    return digest.digest()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(CHUNK, n - len(buf)))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _drain(sock: socket.socket, n: int) -> bytes:
    digest = hashlib.sha256()
    left = n
    while left:
        chunk = sock.recv(min(CHUNK, left))
        if not chunk:
            raise ConnectionError(f"EOF with {left} of {n} bytes missing")
        digest.update(chunk)
        left -= len(chunk)
    return digest.digest()


# ---------------------------------------------------------------- server


def _serve_checksum(conn: socket.socket, mode: str) -> None:
    with conn:
        up, down = struct.unpack("!QQ", _recv_exact(conn, 16))
        if mode == "close-first":
            _stream(conn, down, seed=2)
            return  # close without reading: the server closes first
        sent_digest: list[bytes] = []
        sender = threading.Thread(target=lambda: sent_digest.append(_stream(conn, down, seed=2)))
        sender.start()
        got = _drain(conn, up)
        sender.join()
        if mode == "wait-eof" and conn.recv(1):
            return  # the client's FIN (half-close) must reach us, and nothing more
        conn.sendall(got + sent_digest[0])


def serve(args: argparse.Namespace) -> None:
    family = socket.AF_INET6 if ":" in args.bind else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind((args.bind, args.port))
    srv.listen(1024)
    while True:
        conn, _ = srv.accept()
        if args.mode == "echo":
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()
        else:
            threading.Thread(target=_serve_checksum, args=(conn, args.mode), daemon=True).start()


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(CHUNK):
            conn.sendall(data)


# ---------------------------------------------------------------- client


def one_client(host: str, port: int, up: int, down: int, seed: int, mode: str,
               timeout: float) -> dict:
    started = time.monotonic()
    result: dict = {"ok": False}
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        return {"ok": False, "error": f"connect: {exc.strerror or exc}", "errno": exc.errno,
                "seconds": round(time.monotonic() - started, 3)}
    with sock:
        sock.sendall(struct.pack("!QQ", up, down))
        if mode == "close-first":
            got = _drain(sock, down)
            result.update(ok=got == hashlib.sha256(_pattern_stream(2, down)).digest() and
                          sock.recv(1) == b"")
            return result
        sent: list[bytes] = []

        def send() -> None:
            sent.append(_stream(sock, up, seed))
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            got = _drain(sock, down)
            tail = _recv_exact(sock, 64)
            eof = sock.recv(1) == b""
        except OSError as exc:
            sender.join()
            return {"ok": False, "error": str(exc)}
        sender.join()
        server_got, server_sent = tail[:32], tail[32:]
        result.update(ok=bool(sent) and server_got == sent[0] and server_sent == got and eof,
                      up_ok=bool(sent) and server_got == sent[0], down_ok=server_sent == got,
                      eof=eof)
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


def _pattern_stream(seed: int, total: int) -> bytes:
    block = _pattern(seed, CHUNK + 4096)
    out = bytearray()
    sent = 0
    while sent < total:
        n = min(CHUNK - (sent % 4096), total - sent)
        out += block[sent % 4096: sent % 4096 + n]
        sent += n
    return bytes(out)


def client(args: argparse.Namespace) -> int:
    results: list[dict] = [{}] * args.conns
    started = time.monotonic()

    def run(i: int) -> None:
        results[i] = one_client(args.host, args.port, args.up, args.down, seed=1000 + i,
                                mode=args.mode, timeout=args.timeout)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(args.conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = sum(1 for r in results if r.get("ok"))
    elapsed = time.monotonic() - started
    print(json.dumps({"ok": ok == args.conns, "passed": ok, "conns": args.conns,
                      "seconds": round(elapsed, 3),
                      "failures": [r for r in results if not r.get("ok")][:5]}))
    return 0 if ok == args.conns else 1


def reset_client(args: argparse.Namespace) -> int:
    """Connect, send a little, then abort with RST (SO_LINGER 0)."""
    sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
    sock.sendall(struct.pack("!QQ", 10**9, 10**9))
    sock.sendall(b"x" * 100000)
    sock.recv(1000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    print(json.dumps({"ok": True}))
    return 0


def _dns_answer(query: bytes) -> bytes:
    """Answer any A question with 192.0.2.1 (RFC 5737 documentation address)."""
    qid, _flags, qd = struct.unpack("!HHH", query[:6])
    pos = 12
    while query[pos]:
        pos += query[pos] + 1
    question = query[12:pos + 5]
    header = struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0)
    answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([192, 0, 2, 1])
    return header + question + answer


def dns(args: argparse.Namespace) -> None:
    """A DNS responder on UDP and TCP (RFC 1035 §4.2.2 length prefix) for selftest."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((args.bind, args.port))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((args.bind, args.port))
    tcp.listen(16)

    def serve_tcp() -> None:
        while True:
            conn, _ = tcp.accept()
            with conn:
                size = struct.unpack("!H", _recv_exact(conn, 2))[0]
                reply = _dns_answer(_recv_exact(conn, size))
                conn.sendall(struct.pack("!H", len(reply)) + reply)

    threading.Thread(target=serve_tcp, daemon=True).start()
    while True:
        query, peer = udp.recvfrom(4096)
        udp.sendto(_dns_answer(query), peer)


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, default=9000)
    s.add_argument("--bind", default="::")
    s.add_argument("--mode", default="checksum",
                   choices=["checksum", "wait-eof", "close-first", "echo"])
    d = sub.add_parser("dns")
    d.add_argument("--port", type=int, default=53)
    d.add_argument("--bind", default="0.0.0.0")
    for name in ("client", "reset"):
        c = sub.add_parser(name)
        c.add_argument("--host", required=True)
        c.add_argument("--port", type=int, default=9000)
        c.add_argument("--up", type=int, default=1 << 20)
        c.add_argument("--down", type=int, default=1 << 20)
        c.add_argument("--conns", type=int, default=1)
        c.add_argument("--timeout", type=float, default=60)
        c.add_argument("--mode", default="checksum", choices=["checksum", "close-first"])
    args = parser.parse_args()
    if args.cmd == "serve":
        serve(args)
        return 0
    if args.cmd == "dns":
        dns(args)
        return 0
    if args.cmd == "reset":
        return reset_client(args)
    return client(args)


if __name__ == "__main__":
    sys.exit(main())
