"""Userspace half of impair.py: drop, hold (reorder) and accept packets from NFQUEUEs.

Run inside a network namespace (impair.py starts it with Netns.popen). It speaks the
nfnetlink_queue protocol directly on an AF_NETLINK socket (no libnetfilter_queue), binds
one queue per impairment point (device + direction), and for every queued packet decides:

- drop (NF_DROP) with probability `loss`: real loss, the skb is freed by the kernel;
- hold with probability `reorder`: no verdict yet; the packet is released (NF_ACCEPT)
  once `--hold-after` later packets *of the same flow at the same point* were accepted,
  or when its `--hold-ms` deadline passes, whichever comes first. Verdicts are issued in
  that order, and the kernel reinjects each packet when its verdict arrives, so a packet
  that a later one of its flow overtook really leaves out of order ("reordered"); one
  released by its deadline with nothing overtaking it was only delayed ("delayed");
- accept (NF_ACCEPT) otherwise.

Queues are configured with copy mode PACKET and a copy range of 64 bytes (enough for the
IP and TCP/UDP port headers that name the flow; never the payload), with NFQA_CFG_F_GSO
(a 64 KiB TSO/GSO skb is one queued packet, not segmented for us), NFQA_CFG_F_FAIL_OPEN
(if we fall behind the kernel accepts instead of dropping uncounted) and a long queue.

Counters go to --stats (JSON, rewritten atomically every ~0.3 s and on exit). On SIGTERM
or SIGINT every held packet is accepted, the final counters are written, and it exits 0.

    nfqueue_impair.py --queue 4200:tun0/out --queue 4201:tun0/in --loss 0.05 \\
        --reorder 0.25 --seed 7 --stats /tmp/x/stats.json
"""

from __future__ import annotations

import argparse
import errno
import heapq
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 1
NLM_F_ACK = 4

NFQNL_CFG_CMD_BIND = 1
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_FAIL_OPEN = 1
NFQA_CFG_F_GSO = 4

NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_PAYLOAD = 10
NFQA_CAP_LEN = 13

NF_DROP = 0
NF_ACCEPT = 1

SO_RCVBUFFORCE = 33
COPY_RANGE = 64
QUEUE_MAXLEN = 65536
RCVBUF = 64 << 20

_NLMSG = struct.Struct("=IHHII")
_ATTR = struct.Struct("=HH")
_PKTHDR = struct.Struct(">IHB")
_VERDICT = struct.Struct(">II")
_BE32 = struct.Struct(">I")


def _attr(atype: int, payload: bytes) -> bytes:
    length = _ATTR.size + len(payload)
    return _ATTR.pack(length, atype) + payload + b"\0" * (-length % 4)


def _nfmsg(msg: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0,
           family: int = socket.AF_UNSPEC) -> bytes:
    body = struct.pack("=BB", family, 0) + struct.pack(">H", queue) + attrs
    return _NLMSG.pack(_NLMSG.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg, flags, seq, 0) + body


def _verdict(queue: int, packet_id: int, verdict: int) -> bytes:
    return _nfmsg(NFQNL_MSG_VERDICT, queue, _attr(NFQA_VERDICT_HDR, _VERDICT.pack(verdict, packet_id)))


def _flow_key(head: bytes) -> bytes:
    """Addresses + ports (when TCP/UDP) from the first bytes of an IP packet."""
    if not head:
        return b""
    version = head[0] >> 4
    if version == 4 and len(head) >= 20:
        ihl = (head[0] & 15) * 4
        ports = head[ihl:ihl + 4] if head[9] in (6, 17) else b""
        return head[12:20] + ports
    if version == 6 and len(head) >= 40:
        ports = head[40:44] if head[6] in (6, 17) else b""
        return head[8:40] + ports
    return head[:1]


def read_kernel_queues() -> dict[str, dict[str, int]]:
    """/proc/net/netfilter/nfnetlink_queue (this namespace's queues)."""
    out: dict[str, dict[str, int]] = {}
    try:
        with open("/proc/net/netfilter/nfnetlink_queue") as f:
            for line in f:
                v = [int(x) for x in line.split()]
                if len(v) >= 8:
                    out[str(v[0])] = {"queue_total": v[2], "queue_dropped": v[5],
                                      "user_dropped": v[6], "id_sequence": v[7]}
    except OSError:
        pass
    return out


class Held:
    __slots__ = ("queue", "pid", "flow", "order", "need", "passed", "released")

    def __init__(self, queue: int, pid: int, flow: bytes, order: int, need: int) -> None:
        self.queue, self.pid, self.flow, self.order = queue, pid, flow, order
        self.need, self.passed, self.released = need, 0, False


class Impairer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.labels: dict[int, str] = {}
        for spec in args.queue:
            num, _, label = spec.partition(":")
            self.labels[int(num)] = label or num
        self.stats = {q: {"queue": q, "seen": 0, "accepted": 0, "dropped": 0, "held": 0,
                          "reordered": 0, "delayed": 0, "max_len": 0, "bytes": 0,
                          "ipv6": 0}
                      for q in self.labels}
        self.held_by_flow: dict[tuple[int, bytes], list[Held]] = {}
        self.timers: list[tuple[float, int, Held]] = []
        self.out = bytearray()
        self.order = 0
        self.enobufs = 0
        self.verdict_errors = 0
        self.last_verdict_errno = 0
        self.stop = False
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.sock.bind((0, 0))

    # ---------------------------------------------------------------- setup

    def _config(self, queue: int, attrs: bytes, seq: int) -> None:
        self.sock.send(_nfmsg(NFQNL_MSG_CONFIG, queue, attrs, NLM_F_REQUEST | NLM_F_ACK, seq))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            data = self.sock.recv(65536)
            off = 0
            while off + _NLMSG.size <= len(data):
                length, mtype, _flags, mseq, _pid = _NLMSG.unpack_from(data, off)
                if mtype == NLMSG_ERROR and mseq == seq:
                    err = -struct.unpack_from("=i", data, off + _NLMSG.size)[0]
                    if err:
                        raise OSError(err, f"nfqueue config of queue {queue}: {os.strerror(err)}")
                    return
                off += (length + 3) & ~3
        raise TimeoutError(f"no ack configuring queue {queue}")

    def bind(self) -> None:
        seq = 1
        for queue in self.labels:
            self._config(queue, _attr(NFQA_CFG_CMD, struct.pack("=BxH", NFQNL_CFG_CMD_BIND, 0)), seq)
            self._config(queue, _attr(NFQA_CFG_PARAMS, struct.pack(">IB", COPY_RANGE, NFQNL_COPY_PACKET)),
                         seq + 1)
            self._config(queue, _attr(NFQA_CFG_QUEUE_MAXLEN, _BE32.pack(QUEUE_MAXLEN)), seq + 2)
            flags = NFQA_CFG_F_GSO | NFQA_CFG_F_FAIL_OPEN
            self._config(queue, _attr(NFQA_CFG_MASK, _BE32.pack(flags)) +
                         _attr(NFQA_CFG_FLAGS, _BE32.pack(flags)), seq + 3)
            seq += 4

    # ---------------------------------------------------------------- verdicts

    def _accept(self, queue: int, pid: int, flow: bytes, order: int) -> None:
        self.out += _verdict(queue, pid, NF_ACCEPT)
        held = self.held_by_flow.get((queue, flow))
        if not held:
            return
        for h in list(held):  # earlier packets of this flow that this one just overtook
            if h.order < order and not h.released:
                h.passed += 1
                if h.passed >= h.need:
                    self._release(h)

    def _release(self, h: Held) -> None:
        h.released = True
        key = (h.queue, h.flow)
        lst = self.held_by_flow[key]
        lst.remove(h)
        if not lst:
            del self.held_by_flow[key]
        self.stats[h.queue]["reordered" if h.passed else "delayed"] += 1
        self._accept(h.queue, h.pid, h.flow, h.order)

    def _packet(self, data: memoryview, off: int, end: int, queue: int) -> None:
        pid = -1
        head = b""
        cap_len = 0
        while off + 4 <= end:
            alen, atype = _ATTR.unpack_from(data, off)
            if alen < 4:
                break
            atype &= 0x7FFF
            if atype == NFQA_PACKET_HDR:
                pid = _PKTHDR.unpack_from(data, off + 4)[0]
            elif atype == NFQA_PAYLOAD:
                head = bytes(data[off + 4:off + alen])
            elif atype == NFQA_CAP_LEN:
                cap_len = _BE32.unpack_from(data, off + 4)[0]
            off += (alen + 3) & ~3
        if pid < 0 or queue not in self.stats:
            return
        st = self.stats[queue]
        st["seen"] += 1
        size = cap_len or len(head)
        st["bytes"] += size
        if size > st["max_len"]:
            st["max_len"] = size
        if head and head[0] >> 4 == 6:
            st["ipv6"] += 1
        self.order += 1
        flow = _flow_key(head)
        r = self.rng.random()
        a = self.args
        if r < a.loss:
            st["dropped"] += 1
            self.out += _verdict(queue, pid, NF_DROP)
        elif r < a.loss + a.reorder:
            st["held"] += 1
            h = Held(queue, pid, flow, self.order, self.rng.randint(a.hold_after[0], a.hold_after[1]))
            self.held_by_flow.setdefault((queue, flow), []).append(h)
            delay = self.rng.uniform(a.hold_ms[0], a.hold_ms[1]) / 1000
            heapq.heappush(self.timers, (time.monotonic() + delay, self.order, h))
        else:
            st["accepted"] += 1
            self._accept(queue, pid, flow, self.order)

    def _datagram(self, data: memoryview, n: int) -> None:
        off = 0
        while off + _NLMSG.size <= n:
            length, mtype, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
            if length < _NLMSG.size or off + length > n:
                break
            if mtype == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                queue = struct.unpack_from(">H", data, off + _NLMSG.size + 2)[0]
                self._packet(data, off + _NLMSG.size + 4, off + length, queue)
            elif mtype == NLMSG_ERROR:
                err = -struct.unpack_from("=i", data, off + _NLMSG.size)[0]
                if err:
                    self.verdict_errors += 1
                    self.last_verdict_errno = err
            off += (length + 3) & ~3

    def _expire(self) -> float | None:
        """Release held packets whose deadline passed; return seconds to the next one."""
        now = time.monotonic()
        while self.timers:
            deadline, _, h = self.timers[0]
            if h.released:
                heapq.heappop(self.timers)
                continue
            if deadline > now:
                return deadline - now
            heapq.heappop(self.timers)
            self._release(h)
        return None

    def _flush(self) -> None:
        if self.out:
            try:
                self.sock.send(self.out)
            except OSError as exc:
                self.verdict_errors += 1
                self.last_verdict_errno = exc.errno or 0
            self.out.clear()

    # ---------------------------------------------------------------- reporting

    def write_stats(self, *, final: bool = False) -> None:
        report = {
            "ready": True, "final": final, "pid": os.getpid(),
            "points": {self.labels[q]: st for q, st in self.stats.items()},
            "held_now": sum(len(v) for v in self.held_by_flow.values()),
            "enobufs": self.enobufs, "verdict_errors": self.verdict_errors,
            "last_verdict_errno": self.last_verdict_errno,
            "kernel": {k: v for k, v in read_kernel_queues().items()
                       if int(k) in self.labels},
        }
        tmp = self.args.stats + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f)
        os.replace(tmp, self.args.stats)

    # ---------------------------------------------------------------- loop

    def run(self) -> None:
        buf = bytearray(1 << 17)
        view = memoryview(buf)
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        next_report = 0.0
        while not self.stop:
            wait = self._expire()
            self._flush()
            now = time.monotonic()
            if now >= next_report:
                self.write_stats()
                next_report = now + 0.3
            timeout_ms = 50 if wait is None else min(50, max(0, wait * 1000))
            if not poller.poll(timeout_ms):
                continue
            for _ in range(512):
                try:
                    n = self.sock.recv_into(buf, len(buf), socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:  # the kernel overran our buffer: go on
                        self.enobufs += 1
                        continue
                    raise
                self._datagram(view, n)
                if len(self.out) > 32768:
                    self._flush()
                    self._expire()
        # Shutdown: nothing stays held (closing the socket would make the kernel drop it).
        for _, _, h in sorted(self.timers, key=lambda t: t[1]):
            if not h.released:
                self._release(h)
        self._flush()
        self.write_stats(final=True)
        self.sock.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queue", action="append", required=True, help="NUM[:LABEL], repeatable")
    p.add_argument("--loss", type=float, default=0.05)
    p.add_argument("--reorder", type=float, default=0.25)
    p.add_argument("--hold-ms", type=float, nargs=2, default=(1.0, 5.0), metavar=("MIN", "MAX"))
    p.add_argument("--hold-after", type=int, nargs=2, default=(1, 3), metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats", required=True)
    args = p.parse_args()
    imp = Impairer(args)

    def stop(*_: object) -> None:
        imp.stop = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    imp.bind()
    imp.write_stats()
    print("ready", flush=True)
    imp.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
