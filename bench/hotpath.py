"""`python -m bench.hotpath`: proxyvpn's own CPU per GB of one flow, without the kernel.

The namespace suite (`python -m bench`) measures what users get, but on a shared 2-vCPU
host its CPU-per-GB figures vary by ±25 %, too much to see a change of a few per cent
in the stack. This drives the real Engine, Flow, TcpConnection and C fast path of one
established flow, in one process, with the TUN replaced by a SOCK_SEQPACKET socket pair
(one message, one packet: what a TUN read and write are) and the proxy tunnel by an
in-process sink that takes everything. What is left is proxyvpn's per-byte work: Python,
the C fast path and one read/write per batch, with the app's TCP and the proxy socket
left out. Its CPU time per GB repeats to a few per cent, so optimisations of the stack
can be compared here before they are confirmed on the namespace suite.

- `down`: the proxy delivers reads of 110-160 KB (what squid's socket gives a 256 KiB
  recv); the engine segments them into 64 KiB GSO segments; the "app" ACKs every segment,
  the way a Linux receiver ACKs each 64 KiB segment a TUN hands it, and the engine reads
  those ACKs every second proxy read (about five a TUN read, as in the suite).
- `up`: the "app" sends batches of four 64 KiB GSO segments; the engine delivers them to
  the sink and ACKs each batch.

The driver's own work (draining the socket, building ACKs or segments with the C
builder) is inside the figure, the same in every run. No privileges needed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time

from proxyvpn.aio.engine import Engine
from proxyvpn.aio.flow import Flow
from proxyvpn.config import Config
from proxyvpn.netstack import fast
from proxyvpn.netstack.tcp import TcpConnection
from proxyvpn.netstack.wire import VNET_HDR_LEN as VNET
from proxyvpn.relay.dial import ProxyEndpoint

APP, DST = socket.inet_aton("10.0.0.2"), socket.inet_aton("10.9.9.9")
APP_PORT, DST_PORT = 40000, 443
APP_ISN = 1_000_000
APP_MSS = 1460
WINDOW = 0xFFFF  # with the app's window scale 7: 8 MiB
READS = (150_000, 110_000, 160_000, 120_000)  # proxy recv() sizes, cycled
ACK_BATCH_READS = 2
"""Proxy reads between two TUN reads of the app's ACKs: ~5 ACKs a TUN read, as the
namespace suite's 1-flow download shows (its bulk lines' `engine` counters)."""
UNUSED_PROXY = ProxyEndpoint(scheme="http", host="proxy.invalid", port=3128, addresses=("192.0.2.1",))
"""The flow is made established by hand: nothing dials the proxy."""
SEG = 65_483  # the app's GSO segment payload (64 KiB less headers and timestamps)


class Sink:
    """The proxy tunnel's stand-in: takes every byte at once."""

    def __init__(self) -> None:
        self.received = 0

    def attach(self, flow: Flow) -> None:
        self.flow = flow

    def write(self, data: bytes) -> None:
        self.received += len(data)

    def writelines(self, chunks: list) -> None:
        self.received += sum(map(len, chunks))

    def write_buffer_size(self) -> int:
        return 0

    def unacknowledged(self) -> int:
        return 0

    def read_in_units(self, unit: int) -> None:
        pass  # its reads are READS, cut to fixed sizes

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class Lab:
    """One established flow between a socket-pair "TUN" and a Sink."""

    def __init__(self, pure: bool, sack: bool = True) -> None:
        """``sack``: the app's SYN offers SACK, as Linux's does by default."""
        ours, self.tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (ours, self.tun):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self._ours = ours
        self.wire = fast.select(pure=pure)
        self.engine = Engine(Config(proxy=None, pure_python=pure),
                             UNUSED_PROXY, ours.fileno(), vnet=True)
        engine = self.engine
        now = engine._loop.time()
        self.ts = 1
        conn = TcpConnection(engine.params, iss=7, irs=APP_ISN, peer_window=WINDOW,
                             peer_mss=engine.params.mss, peer_wscale=7, now=now, peer_tsval=self.ts,
                             peer_sack_permitted=sack)
        key = (APP, APP_PORT, DST, DST_PORT)
        self.flow = Flow(engine, key, 4, conn, "10.9.9.9", DST_PORT, gso_size=APP_MSS - 12)
        engine.flows[key] = self.flow
        self.sink = Sink()
        self.flow.attach(self.sink)  # type: ignore[arg-type]
        conn.accept(now)
        engine.touch(self.flow)
        engine.transmit()
        self._head = bytearray(128)
        ((synack_seq, _),) = self.drain()
        self.our_seq = (synack_seq + 1) & 0xFFFFFFFF  # next byte we send, on the wire
        self.app_seq = (APP_ISN + 1) & 0xFFFFFFFF
        self.ack_in = self.our_seq
        self.app_send(b"", self.our_seq)  # the handshake's ACK: ESTABLISHED
        engine._on_readable()

    def app_send(self, payload: bytes, ack: int, window: int = WINDOW,
                 sack: tuple[int, ...] = ()) -> None:
        """The app's next segment into the "TUN": ``payload`` at its next sequence number;
        ``sack``: SACK block edges (wire values)."""
        self.ts += 1
        # split: headers and payload gathered by sendmsg, so the driver copies nothing
        parts = self.wire.build(4, APP, DST, APP_PORT, DST_PORT, self.app_seq, ack, fast.ACK,
                                window, payload, tsval=self.ts, tsecr=1, sack=sack,
                                gso_size=APP_MSS - 12 if len(payload) > APP_MSS else 0,
                                split=True)
        self.tun.sendmsg(parts if type(parts) is tuple else (parts,))
        self.app_seq = (self.app_seq + len(payload)) & 0xFFFFFFFF

    def drain(self) -> list[tuple[int, int]]:
        """(seq, payload length) of every packet the engine wrote. Only the headers are
        copied out (MSG_TRUNC gives the packet's real length): the driver's cost stays
        small beside the engine's."""
        out = []
        head = self._head
        while True:
            try:
                n = self.tun.recv_into(head, len(head), socket.MSG_TRUNC)
            except BlockingIOError:
                return out
            ihl = (head[VNET] & 0x0F) * 4
            tcp = VNET + ihl
            seq = int.from_bytes(head[tcp + 4:tcp + 8], "big")
            out.append((seq, n - tcp - (head[tcp + 12] >> 4) * 4))

    def download(self, total: int) -> int:
        """Move ``total`` bytes proxy -> app; returns the bytes the app acknowledged."""
        reads = [bytes(n) for n in READS]
        acked = 0
        i = 0
        while acked < total:
            self.flow.tunnel_data(reads[i % len(reads)])
            i += 1
            for seq, n in self.drain():
                if n > 0:
                    self.app_send(b"", (seq + n) & 0xFFFFFFFF)
                    acked += n
            if i % ACK_BATCH_READS == 0:
                self.engine._on_readable()
        self.engine._on_readable()
        return acked

    def upload(self, total: int) -> int:
        """Move ``total`` bytes app -> proxy; returns the bytes the sink took."""
        payload = bytes(SEG)
        while self.sink.received < total:
            for _ in range(4):
                self.app_send(payload, self.ack_in)
            self.engine._on_readable()
            self.drain()
        return self.sink.received

    def close(self) -> None:
        self._ours.close()
        self.tun.close()


async def _run(direction: str, total: int, pure: bool, sack: bool = True) -> dict:
    lab = Lab(pure, sack)
    lab.download(8 << 20) if direction == "down" else lab.upload(8 << 20)  # warm up
    t0, c0 = time.perf_counter(), time.process_time()
    moved = lab.download(total) if direction == "down" else lab.upload(total)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    stats = dict(lab.engine.stats)
    lab.close()
    return {"figure": f"hotpath_{direction}", "value": round(cpu / moved * 1e9, 4),
            "unit": "CPU·s/GB", "bytes": moved, "cpu_s": round(cpu, 3),
            "wall_s": round(wall, 3), "impl": lab.wire.IMPL,
            "packets_in": stats.get("packets_in", 0), "packets_out": stats.get("packets_out", 0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=2000, help="MB per direction and round [2000]")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the median is reported [5]")
    parser.add_argument("--directions", default="down,up")
    parser.add_argument("--pure-python", action="store_true", help="the Python twin of the fast path")
    parser.add_argument("--no-sack", action="store_true", help="the app's SYN offers no SACK")
    args = parser.parse_args(argv)
    for direction in args.directions.split(","):
        rounds = [asyncio.run(_run(direction, args.mb * 10**6, args.pure_python, not args.no_sack))
                  for _ in range(args.repeat)]
        values = sorted(r["value"] for r in rounds)
        line = {**rounds[0], "value": values[(len(values) - 1) // 2], "values": values}
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
