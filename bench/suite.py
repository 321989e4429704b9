"""The measurements: each runs the C client in the client namespace under one mode.

Every figure is a dict (one JSON line): figure, mode, value, unit, plus details (bytes,
seconds, CPU seconds of every process involved and their utilisation, so one can see
which process was the limit).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import procstat
from bench.lab import SERVER4, SERVER_PORT, BenchLab, Mode, check_alive, wait_settled

MB = 1e6
MiB = 1 << 20


@dataclass(frozen=True)
class Settings:
    """How long and how big; --quick shrinks everything."""

    bulk_seconds: float = 5.0
    """Target duration of one bulk transfer (sized from a shorter probe transfer)."""
    probe_bytes: int = 128 * MiB
    """Bytes (all flows together) of the probe transfer that sizes the measured one;
    0: no probe, fixed_bytes per flow instead."""
    fixed_bytes: tuple[int, int] = (256 * MiB, 16 * MiB)
    """Without a probe: bytes per flow for the 1-flow and the parallel transfers."""
    max_bytes: int = 16 << 30
    """Upper bound of one measured transfer, per flow."""
    parallel: int = 8
    cps_seconds: float = 8.0
    cps_clients: int = 64
    rr_count: int = 20000
    idle_flows: tuple[int, ...] = (1000, 10000)


FULL = Settings()
QUICK = Settings(probe_bytes=0, cps_seconds=1.5, rr_count=2000, idle_flows=(1000,))

# (figure id, title, unit, higher_is_better)
FIGURES: list[tuple[str, str, str, bool]] = [
    ("bulk_down_1", "Bulk download, 1 flow", "MB/s", True),
    ("bulk_up_1", "Bulk upload, 1 flow", "MB/s", True),
    ("bulk_down_8", "Bulk download, 8 flows (sum)", "MB/s", True),
    ("bulk_up_8", "Bulk upload, 8 flows (sum)", "MB/s", True),
    ("cps_64", "New connections/s, 64 clients (100 B req + 100 B reply)", "conn/s", True),
    ("rr_p50", "Request/response latency p50, established conn", "µs", False),
    ("rr_p99", "Request/response latency p99, established conn", "µs", False),
    ("cpu_down", "CPU per GB moved, 1-flow download", "CPU·s/GB", False),
    ("cpu_up", "CPU per GB moved, 1-flow upload", "CPU·s/GB", False),
    ("cpu_conn", "CPU per new connection (the cps test)", "µs", False),
    ("cpu_conn_all", "CPU per new connection, every process of the lab", "µs", False),
    ("rss_cps", "RSS growth over the cps test (its connections all closed)", "MiB", False),
    ("rss_0", "RSS, fresh process, no open flows", "MiB", False),
    ("rss_1000", "RSS with 1,000 idle open flows", "MiB", False),
    ("rss_10000", "RSS with 10,000 idle open flows", "MiB", False),
    ("rss_per_flow", "RSS per idle flow (largest count, minus no-flow RSS)", "KiB", False),
]
UNITS = {fid: unit for fid, _, unit, _ in FIGURES}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Runner:
    lab: BenchLab
    pump: Path
    settings: Settings
    emit: Callable[[dict], None]
    proxy_kind: str = "squid"
    profile: Callable[[str], contextlib.AbstractContextManager] | None = None
    results: list[dict] = field(default_factory=list)
    server: subprocess.Popen | None = None
    round: int = 0
    """Which round of ``--repeat`` is running (recorded in every figure)."""
    host: str = SERVER4
    """The server address the clients connect to (``--ipv6``: its IPv6 one)."""

    # ------------------------------------------------------------------ plumbing

    def start_server(self) -> None:
        self.server = self.lab.server.popen(str(self.pump), "serve", "--port", str(SERVER_PORT),
                                            stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
        self.lab.wait_port(self.lab.server, self.host, SERVER_PORT)

    def client(self, mode: Mode, cmd: str, *args: str, timeout: float = 300) -> dict:
        argv = [str(self.pump), cmd, "--host", self.host, "--port", str(SERVER_PORT),
                "--timeout", str(int(timeout)), *mode.client_args(), *args]
        proc = self.lab.client.run(*argv, check=False, timeout=timeout + 30)
        try:
            out = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            out = {"ok": False, "error": f"exit {proc.returncode}: {proc.stdout!r} {proc.stderr!r}"}
        return out

    def pids(self, mode: Mode) -> dict[str, int]:
        assert self.server
        return {**mode.pids(), "server": self.server.pid}

    @contextlib.contextmanager
    def cpu_meter(self, mode: Mode) -> Iterator[dict]:
        """CPU seconds each process used inside the block, and the wall time."""
        pids = self.pids(mode)
        net0 = self.lab.client_counters()
        engine0 = mode.engine_counters()
        before = {name: procstat.cpu_seconds(pid) for name, pid in pids.items()}
        t0 = time.monotonic()
        box: dict = {}
        yield box
        box["wall_s"] = time.monotonic() - t0
        box["cpu_s"] = {name: round(procstat.cpu_seconds(pid) - before[name], 3)
                        for name, pid in pids.items()}
        net1 = self.lab.client_counters()
        box["client_ns"] = {k: v - net0.get(k, 0) for k, v in net1.items()}
        # The stats file is rewritten once a second: these lag by up to that, so their
        # ratios (packets per TUN read or write) say more than their sums.
        engine1 = mode.engine_counters()
        if engine1:
            box["engine"] = {k: v - engine0.get(k, 0) for k, v in engine1.items()}

    def record(self, mode: Mode, figure: str, value: float | None, **details) -> dict:
        row = {"figure": figure, "mode": mode.name, "value": value, "unit": UNITS[figure],
               "round": self.round, **details}
        self.results.append(row)
        self.emit(row)
        return row

    # ------------------------------------------------------------------ figures

    def bulk(self, mode: Mode, direction: str, conns: int) -> dict:
        """One bulk transfer (sized from a probe to last ~bulk_seconds); MB/s of payload."""
        s = self.settings
        if s.probe_bytes:
            with self.cpu_meter(mode) as probe_meter:
                probe = self.client(mode, direction, "--bytes", str(s.probe_bytes // conns),
                                    "--conns", str(conns))
            if not probe.get("ok"):
                return {"ok": False, "error": probe.get("error", "probe failed"), "probe": probe}
            per_flow_rate = probe["bytes_per_s"] / conns
            size = int(min(s.max_bytes,
                           max(s.probe_bytes // conns, per_flow_rate * s.bulk_seconds)))
            size -= size % MiB
        else:
            size = s.fixed_bytes[0 if conns == 1 else 1]
        label = f"bulk_{direction}_{conns}"
        profiler = (self.profile(label) if self.profile and mode.name == "proxyvpn" and conns == 1
                    else None)
        with profiler or contextlib.nullcontext(), self.cpu_meter(mode) as meter:
            out = self.client(mode, direction, "--bytes", str(size), "--conns", str(conns))
        out["cpu_s"] = meter["cpu_s"]
        out["client_ns"] = meter["client_ns"]
        if "engine" in meter:
            out["engine"] = meter["engine"]
        out["wall_s"] = round(meter["wall_s"], 3)
        if s.probe_bytes:
            # A stall in the probe (its slowest flow) shows here, not in the figure.
            out["probe"] = {"seconds": probe.get("seconds"), "client_ns": probe_meter["client_ns"],
                            **({"engine": probe_meter["engine"]} if "engine" in probe_meter
                               else {})}
        if out.get("ok"):
            secs = out["seconds"]
            out["cpu_util"] = {k: round(v / secs, 2) for k, v in meter["cpu_s"].items()}
            out["cpu_s"]["client"] = round(out.pop("client_cpu_s"), 3)
            out["cpu_util"]["client"] = round(out["cpu_s"]["client"] / secs, 2)
        return out

    def run_bulk(self, mode: Mode) -> None:
        for conns in (1, self.settings.parallel):
            for direction in ("down", "up"):
                figure = f"bulk_{direction}_{1 if conns == 1 else 8}"
                log(f"{mode.name}: {figure}")
                out = self.bulk(mode, direction, conns)
                if not out.get("ok"):
                    self.record(mode, figure, None, error=out.get("error"), detail=out)
                    continue
                gb = out["bytes"] / 1e9
                self.record(mode, figure, round(out["bytes_per_s"] / MB, 1), bytes=out["bytes"],
                            seconds=out["seconds"], flows=conns, cpu_s=out["cpu_s"],
                            cpu_util=out["cpu_util"], client_ns=out["client_ns"],
                            **({"engine": out["engine"]} if "engine" in out else {}),
                            **({"probe": out["probe"]} if "probe" in out else {}))
                if conns == 1:
                    per_gb = {k: round(v / gb, 3) for k, v in out["cpu_s"].items()}
                    main = "proxy" if mode.name == "direct" else mode.name
                    self.record(mode, f"cpu_{direction}", per_gb.get(main), process=main,
                                cpu_s_per_gb=per_gb)
                check_alive(mode)

    def run_latency(self, mode: Mode) -> None:
        log(f"{mode.name}: request/response latency")
        profiler = self.profile("rr") if self.profile and mode.name == "proxyvpn" else None
        with profiler or contextlib.nullcontext():
            out = self.client(mode, "lat", "--count", str(self.settings.rr_count), "--size", "100")
        if not out.get("ok"):
            for fig in ("rr_p50", "rr_p99"):
                self.record(mode, fig, None, error=out.get("error"))
            return
        detail = {k: out[k] for k in ("count", "p90_us", "p999_us", "mean_us", "min_us", "max_us")}
        self.record(mode, "rr_p50", out["p50_us"], size=100, **detail)
        self.record(mode, "rr_p99", out["p99_us"], size=100, **detail)

    def run_cps(self, mode: Mode) -> None:
        s = self.settings
        log(f"{mode.name}: connections per second ({s.cps_clients} clients, {s.cps_seconds:g} s)")
        profiler = self.profile("cps_64") if self.profile and mode.name == "proxyvpn" else None
        main_pid = mode.main_pid()
        rss0 = procstat.tree_rss_bytes(main_pid)
        with profiler or contextlib.nullcontext(), self.cpu_meter(mode) as meter:
            out = self.client(mode, "rr", "--conns", str(s.cps_clients), "--seconds",
                              str(s.cps_seconds), "--req", "100", "--resp", "100")
        if not out.get("ok"):
            self.record(mode, "cps_64", None, error=out.get("error"), detail=out)
            return
        # What a relay keeps of connections that are over: garbage the cyclic collector
        # has not reached yet, or a leak (proxyvpn had both until 3991afa: 41 -> 261 MiB
        # over 196,000 connections). The high-water of the allocators counts too.
        rss1 = procstat.tree_rss_bytes(main_pid)
        self.record(mode, "rss_cps", round((rss1 - rss0) / MiB, 1), conns=out["conns"],
                    rss_before_mib=round(rss0 / MiB, 1), rss_after_mib=round(rss1 / MiB, 1))
        secs = out["seconds"]
        cpu = {**meter["cpu_s"], "client": round(out["client_cpu_s"], 3)}
        self.record(mode, "cps_64", out["conns_per_s"], conns=out["conns"],
                    errors=out["errors"], first_error=out.get("first_error") or None,
                    seconds=secs, conn_p50_us=out["conn_p50_us"], conn_p99_us=out["conn_p99_us"],
                    cpu_s=cpu, cpu_util={k: round(v / secs, 2) for k, v in cpu.items()},
                    client_ns=meter["client_ns"])
        if out["conns"]:
            per_conn = {k: round(v / out["conns"] * 1e6, 1) for k, v in cpu.items()}
            main = "proxy" if mode.name == "direct" else mode.name
            self.record(mode, "cpu_conn", per_conn.get(main), process=main,
                        cpu_us_per_conn=per_conn)
            # The lab's processes share the host's CPUs: when they are all busy, this
            # sum, not the relay's own share, sets the connection rate.
            self.record(mode, "cpu_conn_all", round(sum(per_conn.values()), 1),
                        cpu_us_per_conn=per_conn)
        check_alive(mode)

    def run_idle(self, mode: Mode) -> None:
        """RSS of a fresh relay process (and a fresh proxy) holding N idle flows.

        Each count gets its own restart, so earlier tests' garbage does not hide the
        growth. The proxy needs two fds per flow: when RLIMIT_NOFILE cannot cover the
        largest count, squid runs with enough SMP workers (recorded as proxy_workers).
        """
        biggest = max(self.settings.idle_flows)
        workers = 1
        if self.proxy_kind == "squid":
            while 2 * biggest // workers + 512 > self.lab.max_fds:
                workers += 1
        per_flow = None
        for i, n in enumerate(self.settings.idle_flows):
            log(f"{mode.name}: {n} idle flows (fresh {mode.name} and proxy, "
                f"{workers} proxy worker(s))")
            mode.stop()
            self.lab.start_proxy(self.proxy_kind, workers)
            mode.start()
            self.warm_up(mode)
            time.sleep(1)
            pid = mode.main_pid()
            rss0 = procstat.tree_rss_bytes(pid)
            if i == 0:
                self.record(mode, "rss_0", round(rss0 / MiB, 1), flows=0, proxy_workers=workers,
                            **self._other_rss(mode))
            out = self._hold_idle(mode, n, pid)
            if out.get("opened"):
                rss = out.pop("rss")
                self.record(mode, f"rss_{n}", round(rss / MiB, 1), flows=out["opened"],
                            failed=out.get("failed"), open_seconds=out.get("seconds"),
                            first_error=out.get("first_error") or None, proxy_workers=workers,
                            rss_fresh_mib=round(rss0 / MiB, 1), rss_mib=out["rss_mib"])
                per_flow = ((rss - rss0) / out["opened"] / 1024, n, out["opened"])
            else:
                self.record(mode, f"rss_{n}", None, error=out.get("error"), detail=out)
            check_alive(mode)
        if per_flow:
            self.record(mode, "rss_per_flow", round(per_flow[0], 2), idle_flows=per_flow[1],
                        opened=per_flow[2])

    def _hold_idle(self, mode: Mode, n: int, pid: int) -> dict:
        """Open n idle flows, measure while they are held, then close them."""
        argv = [str(self.pump), "idle", "--host", self.host, "--port", str(SERVER_PORT),
                "--conns", str(n), "--parallel", "32", "--timeout", "300", *mode.client_args()]
        proc = self.lab.client.popen(*argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        try:
            line = proc.stdout.readline() if proc.stdout else ""
            try:
                out = json.loads(line)
            except ValueError:
                return {"ok": False, "error": f"idle client said {line!r}"}
            if out.get("opened"):
                time.sleep(1.0)  # let the relay finish its bookkeeping
                out["rss"] = procstat.tree_rss_bytes(pid)
                out.update(self._other_rss(mode))
            return out
        finally:
            if proc.stdin:
                proc.stdin.close()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def _other_rss(self, mode: Mode) -> dict:
        rss = {name: round(procstat.tree_rss_bytes(p) / MiB, 1)
               for name, p in mode.pids().items()}
        return {"rss_mib": rss}

    def warm_up(self, mode: Mode) -> None:
        warm = self.client(mode, "down", "--bytes", str(4 * MiB), "--conns", "1", timeout=60)
        if not warm.get("ok"):
            raise RuntimeError(f"{mode.name}: the path does not work: {warm}")

    # ------------------------------------------------------------------ a mode

    def ensure_clean(self) -> None:
        """After a mode (even a failed one): the server is up, the proxy is the default one,
        and the client namespace tracks no connection of the mode that ran."""
        if self.server is None or self.server.poll() is not None:
            self.start_server()
        self.lab.ensure_proxy(self.proxy_kind)
        self.lab.forget_connections()

    def run_mode(self, mode: Mode, only: set[str]) -> None:
        log(f"{mode.name}: starting")
        self.lab.ensure_proxy(self.proxy_kind)
        try:
            mode.start()
            self.warm_up(mode)
            if "bulk" in only:
                self.run_bulk(mode)
            if "lat" in only:
                self.run_latency(mode)
            if "cps" in only:
                self.run_cps(mode)
            if "idle" in only:
                self.run_idle(mode)
            diag = mode.diagnostics()
            if diag:
                self.emit({"figure": "diagnostics", "mode": mode.name, **diag})
        finally:
            mode.stop()
            wait_settled(mode, timeout=30)
