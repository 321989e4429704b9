"""The benchmark's lab: the test suite's three namespaces, tuned for load, and the three modes.

    client ns  --  router ns (squid / tinyproxy :3128)  --  server ns (pump serve :9000)

Modes (the same client program, the same server, the same proxy):
  direct    the client speaks CONNECT to the proxy itself: the limit.
  proxyvpn  the client connects to the server; `proxyvpn up` captures and relays.
  redsocks  the client connects to the server; nft REDIRECT -> redsocks (http-connect).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench import procstat

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "netns"))

from topology import (  # noqa: E402
    PROXY_PORT,
    ROUTER4_C,
    SERVER4,
    SERVER6,
    Lab,
    available_congestion,
    build_lab,
    host_congestion,
    remove_lab,
)

SERVER_PORT = 9000
REDSOCKS_PORT = 12345
MAX_FDS = 65536
"""File descriptors the proxy may use: 10,000 idle flows need 20,000 in the proxy."""

# Per-namespace sysctls so tens of thousands of connections fit: wide ephemeral port
# range, TIME-WAIT reuse for outgoing connections, deep accept queues.
NS_SYSCTLS = (
    "net.ipv4.ip_local_port_range=10000 64999",
    "net.ipv4.tcp_tw_reuse=1",
    "net.core.somaxconn=8192",
    "net.ipv4.tcp_max_syn_backlog=8192",
)

__all__ = ["PROXY_PORT", "ROUTER4_C", "SERVER4", "SERVER6", "BenchLab", "available_congestion",
           "host_congestion", "make_lab", "remove_lab"]


# TcpExt counters of segments the apps' kernel dropped (or ACKs it ignored): PAWS,
# receive-queue and out-of-order queue limits, data beyond a closed window.
_DROP_COUNTERS = (("PAWSEstab", "paws_estab"), ("TCPACKSkippedPAWS", "acks_skipped_paws"),
                  ("TCPRcvQDrop", "rcvq_drop"), ("TCPOFODrop", "ofo_drop"),
                  ("TCPZeroWindowDrop", "zero_window_drop"), ("RcvPruned", "rcv_pruned"),
                  ("TCPBacklogDrop", "backlog_drop"))


@dataclasses.dataclass
class BenchLab(Lab):
    """tests/netns/topology.Lab with proxy configs sized for 10,000 flows and quiet logs."""

    max_fds: int = MAX_FDS
    """File descriptors the proxy and redsocks may use (bounded by RLIMIT_NOFILE)."""
    squid_service: str = dataclasses.field(
        default_factory=lambda: f"pvbench{secrets.token_hex(3)}")
    """squid -n: names its SMP shared memory and IPC sockets, removed with the lab."""

    def start_squid(self, workers: int = 1) -> None:
        """squid on the router; workers > 1 (SMP) when one process cannot have enough fds."""
        self.stop_proxy()
        self.proxy_conf = {"kind": "squid", "workers": workers}
        d = self.workdir / "squid"
        d.mkdir(exist_ok=True)
        shutil.chown(d, "proxy", "proxy")
        conf = d / "squid.conf"
        conf.write_text(
            f"http_port {PROXY_PORT}\nhttp_access allow all\ncache deny all\n"
            f"access_log none\ncache_log {d}/cache.log\n"
            f"pid_filename {d}/squid.pid\ncoredump_dir {d}\nshutdown_lifetime 0 seconds\n"
            f"workers {workers}\ndns_v4_first on\npinger_enable off\n"
            f"max_filedescriptors {self.max_fds}\n"
            "client_persistent_connections off\nserver_persistent_connections off\n"
            f"hosts_file {d}/hosts\n"
        )
        # Squid looks up the client's name (PTR) per connection; answer from a file.
        (d / "hosts").write_text("127.0.0.1 localhost\n10.77.1.1 router\n10.77.1.2 client\n"
                                 "10.77.2.1 router-s\n10.77.2.2 server\n")
        self.proxy_log = d / "cache.log"
        # -N (no daemon) also means no SMP kids; --foreground keeps them.
        argv = (["squid", "-N"] if workers == 1 else
                ["squid", "--foreground", "-n", self.squid_service])
        self.proxy = self.router.popen(*argv, "-f", str(conf),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_port(self.router, ROUTER4_C, PROXY_PORT, timeout=20)
        if workers > 1:  # every kid must be listening, not just the first
            procstat_wait = time.monotonic() + 20
            while (len(procstat.tree(self.proxy.pid)) < workers + 2
                   and time.monotonic() < procstat_wait):
                time.sleep(0.1)
            time.sleep(1)

    def stop_proxy(self) -> None:
        """Kill the proxy and all its kids, and wait until every one is gone (SMP squid's
        kids outlive the master for a moment and would keep the port)."""
        pids = procstat.tree(self.proxy.pid) if self.proxy and self.proxy.poll() is None else []
        super().stop_proxy()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while any(procstat.alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._remove_squid_files()

    def _remove_squid_files(self) -> None:
        for pattern in (f"/dev/shm/{self.squid_service}-*", f"/run/squid/{self.squid_service}-*"):
            for path in glob.glob(pattern):
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def delete(self) -> None:
        super().delete()
        self._remove_squid_files()

    def forget_connections(self) -> None:
        """Empty the client namespace's conntrack table.

        A mode's entries outlive it: redsocks' REDIRECT leaves NAT'd ones, in FIN_WAIT or
        CLOSE_WAIT for up to 2 minutes, and tcp_tw_reuse=1 lets the next mode's client
        reuse their 4-tuples. A SYN does not reopen an entry in those states, so the new
        connection's first packets pass on the old entry, and each packet back to the app
        (server -> app, which the NAT'd entry does not expect) makes a new entry whose
        insert clashes with the old one: conntrack drops it (`conntrack -S`: insert_failed,
        drop). Seen as one or two 8-flow probe flows stuck at 64,512 bytes for ~100 s and
        connection-rate rounds at ~300/s with resets, only in proxyvpn rounds after a
        redsocks one (2026-12-07)."""
        out = self.client.run("conntrack", "-F", check=False)
        if out.returncode:
            print(f"bench: conntrack -F failed in the client namespace: {out.stderr.strip()}",
                  file=sys.stderr)

    def client_counters(self) -> dict[str, int]:
        """TCP retransmissions/RTO expiries of the client namespace (the apps' side) and
        drops on its TUN queue, if there is one: the usual reasons for a stalled flow; and
        its IPv6 packets in and out (which family the apps' flows were, with --ipv6)."""
        out = self.client.sh(
            "cat /proc/net/snmp /proc/net/netstat; echo TUN; "
            "cat /sys/class/net/tun0/statistics/tx_dropped 2>/dev/null || true; "
            "echo SNMP6; cat /proc/net/snmp6",
            check=False).stdout
        text, _, rest = out.partition("TUN")
        tun, _, snmp6 = rest.partition("SNMP6")
        counters: dict[str, int] = {}
        lines = text.splitlines()
        for names, values in zip(lines[::2], lines[1::2], strict=False):
            prefix, _, names = names.partition(":")
            _, _, values = values.partition(":")
            table = dict(zip(names.split(), values.split(), strict=False))
            if prefix == "Tcp":
                counters["retrans_segs"] = int(table.get("RetransSegs", 0))
                counters["in_csum_errors"] = int(table.get("InCsumErrors", 0))
            elif prefix == "TcpExt":
                counters["rto_timeouts"] = int(table.get("TCPTimeouts", 0))
                # Which kind of retransmission: a tail-loss probe fires when ACKs pause
                # for ~2 RTTs (no loss needed); a fast retransmit follows duplicate ACKs.
                counters["loss_probes"] = int(table.get("TCPLossProbes", 0))
                counters["fast_retrans"] = int(table.get("TCPFastRetrans", 0))
                # Why the apps' kernel threw a segment from the TUN away, if it did.
                for name, key in _DROP_COUNTERS:
                    counters[key] = int(table.get(name, 0))
        if tun.strip():
            counters["tun_tx_dropped"] = int(tun.split()[0])
        ip6 = dict(line.split()[:2] for line in snmp6.splitlines() if len(line.split()) >= 2)
        counters["ip6_in"] = int(ip6.get("Ip6InReceives", 0))
        counters["ip6_out"] = int(ip6.get("Ip6OutRequests", 0))
        return counters

    def save_logs(self, dest: Path) -> Path:
        """Copy every log of the run (proxy, proxyvpn, redsocks) to dest."""
        dest.mkdir(parents=True, exist_ok=True)
        for path in self.workdir.rglob("*.log"):
            with contextlib.suppress(OSError):
                shutil.copy(path, dest / path.name)
        return dest

    def start_tinyproxy(self, *, auth: tuple[str, str] | None = None,
                        connect_ports: tuple[int, ...] = ()) -> None:
        self.stop_proxy()
        self.proxy_conf = {"kind": "tinyproxy"}
        log = self.workdir / "tinyproxy.log"
        log.touch()
        log.chmod(0o666)
        conf = self.workdir / "tinyproxy.conf"
        conf.write_text("\n".join([
            "User nobody", "Group nogroup", f"Port {PROXY_PORT}", "Timeout 600",
            f"MaxClients {self.max_fds // 2}", f"LogFile \"{log}\"", "LogLevel Warning",
            "DisableViaHeader Yes",
        ]) + "\n")
        self.proxy_log = log
        self.proxy = self.router.popen("tinyproxy", "-d", "-c", str(conf),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_port(self.router, ROUTER4_C, PROXY_PORT)

    def start_proxy(self, kind: str, workers: int = 1) -> None:
        """(Re)start the proxy: squid with `workers` processes, or tinyproxy."""
        self.start_squid(workers) if kind == "squid" else self.start_tinyproxy()

    def ensure_proxy(self, kind: str, workers: int = 1) -> None:
        """Restart the proxy only if it is not running with this configuration."""
        want = {"kind": kind, "workers": workers} if kind == "squid" else {"kind": kind}
        if self.proxy is None or self.proxy.poll() is not None or self.proxy_conf != want:
            self.start_proxy(kind, workers)

    def tune(self) -> None:
        for ns in (self.client, self.router, self.server):
            for setting in NS_SYSCTLS:
                ns.run("sysctl", "-qw", setting, check=False)

    def established_at_proxy(self) -> int:
        """Established TCP connections of the router namespace (both proxy sides)."""
        out = self.router.run("ss", "-Htn", "state", "established", check=False).stdout
        return sum(1 for line in out.splitlines() if line.strip())


def make_lab(max_fds: int = MAX_FDS) -> BenchLab:
    """build_lab() from the test suite, as a BenchLab; removed by remove_lab()."""
    lab = build_lab()
    try:
        bench_lab = BenchLab(**{f.name: getattr(lab, f.name) for f in dataclasses.fields(Lab)},
                             max_fds=max_fds)
        bench_lab.tune()
        return bench_lab
    except BaseException:
        remove_lab(lab)
        raise


# --------------------------------------------------------------------------- modes


ENGINE_COUNTERS = ("packets_in", "packets_out", "tun_reads", "tun_writes", "retransmits",
                   "flows_stalled")
"""proxyvpn counters a bulk line reports (their ratios: packets per TUN read and write)."""


class Mode:
    """One way of getting the client's TCP to the server through the proxy."""

    name = ""
    label = ""

    def __init__(self, lab: BenchLab) -> None:
        self.lab = lab

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def client_args(self) -> list[str]:
        """pump options that make the client reach the server in this mode."""
        return []

    def main_pid(self) -> int:
        """The process whose CPU and RSS are this mode's headline (proxy-only for direct)."""
        raise NotImplementedError

    def pids(self) -> dict[str, int]:
        """Every process worth accounting CPU for while the mode runs."""
        assert self.lab.proxy
        return {"proxy": self.lab.proxy.pid}

    def active_flows(self) -> int:
        """Flows the mode's relay still holds (0 once everything has drained)."""
        return self.lab.established_at_proxy()

    def diagnostics(self) -> dict:
        return {}

    def engine_counters(self) -> dict[str, int]:
        """The relay's own packet counters, where it has any (proxyvpn's stats file)."""
        return {}


class Direct(Mode):
    name, label = "direct", "direct-CONNECT"

    def client_args(self) -> list[str]:
        return ["--proxy", f"{ROUTER4_C}:{PROXY_PORT}"]

    def main_pid(self) -> int:
        assert self.lab.proxy
        return self.lab.proxy.pid


class ProxyVpn(Mode):
    """`proxyvpn up` in the client namespace (the repo's code, started like the tests do).

    tun_route: an experiment, not how proxyvpn runs: also route the server's /32 via the
    TUN in the main table. proxyvpn captures by fwmark in an nft route hook, so an app's
    socket is first routed via the veth (MTU 1500) and keeps MSS 1460 after the re-route;
    with this route the socket sees the TUN's MTU at connect time (MSS 65495).
    """

    name, label = "proxyvpn", "proxyvpn"

    def __init__(self, lab: BenchLab, extra: tuple[str, ...] = (),
                 tun_route: bool = False) -> None:
        super().__init__(lab)
        self.extra = extra
        self.tun_route = tun_route
        if tun_route:
            self.label = "proxyvpn (TUN route, experiment)"

    def start(self) -> None:
        self.lab.start_vpn(*self.extra)
        if self.tun_route:
            tun = "tun0"
            if "--tun-name" in self.extra:
                tun = self.extra[self.extra.index("--tun-name") + 1]
            self.lab.client.run("ip", "route", "add", f"{SERVER4}/32", "dev", tun,
                                *self.lab.route_options())

    def stop(self) -> None:
        self.lab.stop_vpn()

    def main_pid(self) -> int:
        assert self.lab.vpn
        return self.lab.vpn.pid

    def pids(self) -> dict[str, int]:
        return {**super().pids(), "proxyvpn": self.main_pid()}

    def active_flows(self) -> int:
        try:
            flows = int(self.lab.stats().get("flows_active", 0))
        except (OSError, ValueError):
            flows = 0
        return flows + self.lab.established_at_proxy()

    def diagnostics(self) -> dict:
        try:
            return {"proxyvpn_stats": self.lab.stats()}
        except (OSError, ValueError):
            return {}

    def engine_counters(self) -> dict[str, int]:
        try:
            stats = self.lab.stats()
        except (OSError, ValueError):
            return {}
        return {k: int(stats.get(k, 0)) for k in ENGINE_COUNTERS}


class Redsocks(Mode):
    """redsocks 0.5 (C, libevent) in the client namespace, fed by an nft REDIRECT."""

    name, label = "redsocks", "redsocks"
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        exe = shutil.which("redsocks")
        if not exe:
            raise SystemExit("bench: redsocks is not installed (apt-get install -y redsocks)")
        lab = self.lab
        conf = lab.workdir / "redsocks.conf"
        conf.write_text(f"""base {{
    log_debug = off; log_info = off; log = stderr; daemon = off;
    redirector = iptables;
    rlimit_nofile = {lab.max_fds}; redsocks_conn_max = {lab.max_fds // 2};
}}
redsocks {{
    local_ip = 127.0.0.1; local_port = {REDSOCKS_PORT};
    ip = {ROUTER4_C}; port = {PROXY_PORT};
    type = http-connect;
    listenq = 4096;
}}
""")
        log = open(lab.workdir / "redsocks.log", "a")  # noqa: SIM115 (lives with the process)
        self.proc = lab.client.popen(exe, "-c", str(conf), stdout=log, stderr=subprocess.STDOUT)
        lab.wait_port(lab.client, "127.0.0.1", REDSOCKS_PORT)
        nft = json.dumps({"nftables": [
            {"table": {"family": "ip", "name": "bench_redsocks"}},
            {"chain": {"family": "ip", "table": "bench_redsocks", "name": "out", "type": "nat",
                       "hook": "output", "prio": -100, "policy": "accept"}},
            {"rule": {"family": "ip", "table": "bench_redsocks", "chain": "out", "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                           "right": SERVER4}},
                {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                           "right": SERVER_PORT}},
                {"redirect": {"port": REDSOCKS_PORT}},
            ]}},
        ]})
        lab.client.run("nft", "-j", "-f", "-", input=nft)

    def stop(self) -> None:
        self.lab.client.run("nft", "delete", "table", "ip", "bench_redsocks", check=False)
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def main_pid(self) -> int:
        assert self.proc
        return self.proc.pid

    def pids(self) -> dict[str, int]:
        return {**super().pids(), "redsocks": self.main_pid()}


MODES = {m.name: m for m in (Direct, ProxyVpn, Redsocks)}


def wait_settled(mode: Mode, timeout: float = 30.0) -> bool:
    """Wait until the relay and the proxy hold no flows (e.g. after a test closed them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mode.active_flows() == 0:
            return True
        time.sleep(0.25)
    return False


def check_alive(mode: Mode) -> None:
    for name, pid in mode.pids().items():
        if not procstat.alive(pid):
            raise RuntimeError(f"{name} (pid {pid}) died during the {mode.name} run")
