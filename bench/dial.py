"""`python -m bench.dial`: CPU per proxy dial, ours against plain asyncio streams.

A dial is what every captured connection costs on the proxy side: TCP connect, the
CONNECT request, the 200, and a close. Both modes dial, 64 at a time, the same
answer-200 proxy on loopback (a child process, so its CPU is not counted) and report
this process's CPU µs per dial. The asyncio-streams mode is the naive implementation
(open_connection, write, readuntil, close): the ratio says what proxyvpn's dial
machinery costs against it (relay/dial.py and relay/transport.py: open_tunnel, the
coroutine over the engine's start_tunnel). Loopback only; no namespaces or privileges
needed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

from proxyvpn.relay.connect import build_connect_request
from proxyvpn.relay.dial import ProxyEndpoint, TunnelProtocol, open_tunnel

TARGET = ("192.0.2.1", 80)  # never connected to: the fake proxy answers 200 to anything

FAKE_PROXY = r'''
import asyncio
async def handle(reader, writer):
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await reader.read()
    except (OSError, asyncio.IncompleteReadError):
        pass
    writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
asyncio.run(main())
'''


async def _ours(endpoint: ProxyEndpoint) -> None:
    protocol = TunnelProtocol(*TARGET, None)
    await open_tunnel(endpoint, *TARGET, mark=None, timeout=5, protocol=protocol)
    protocol.close()


async def _streams(endpoint: ProxyEndpoint) -> None:
    reader, writer = await asyncio.open_connection(endpoint.addresses[0], endpoint.port)
    writer.write(build_connect_request(*TARGET, None))
    await reader.readuntil(b"\r\n\r\n")
    writer.close()


MODES: dict[str, Callable[[ProxyEndpoint], Awaitable[None]]] = {
    "proxyvpn": _ours, "asyncio-streams": _streams}


async def _run(mode: str, endpoint: ProxyEndpoint, dials: int, concurrency: int) -> dict:
    dial = MODES[mode]
    left = dials

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await dial(endpoint)

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await asyncio.sleep(0.05)  # let the last closes run
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"figure": "dial_cpu", "mode": mode, "value": round(cpu / dials * 1e6, 1),
            "unit": "µs CPU/dial", "dials": dials, "dials_per_s": round(dials / wall)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dial", description=__doc__.split("\n")[0])
    parser.add_argument("--dials", type=int, default=5000, help="dials per mode and round [5000]")
    parser.add_argument("--concurrency", type=int, default=64, help="dials in flight [64]")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, modes interleaved [3]")
    args = parser.parse_args(argv)
    proxy = subprocess.Popen([sys.executable, "-c", FAKE_PROXY], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proxy.stdout.readline())  # type: ignore[union-attr]
        endpoint = ProxyEndpoint(scheme="http", host="127.0.0.1", port=port,
                                 addresses=("127.0.0.1",))
        values: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(args.repeat):
            for mode in MODES:
                row = asyncio.run(_run(mode, endpoint, args.dials, args.concurrency))
                values[mode].append(row["value"])
                print(json.dumps(row, ensure_ascii=False), flush=True)
    finally:
        proxy.kill()
        proxy.wait()
    med = {mode: sorted(v)[(len(v) - 1) // 2] for mode, v in values.items()}
    print(json.dumps({"figure": "dial_cpu_median", "unit": "µs CPU/dial", **med,
                      "ratio": round(med["proxyvpn"] / med["asyncio-streams"], 2)},
                     ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
