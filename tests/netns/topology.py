"""A three-namespace lab: client (runs proxyvpn) -- router (runs the proxy) -- server.

    client 10.77.1.2 / fd77:1::2  ==veth==  10.77.1.1 / fd77:1::1  router
    router 10.77.2.1 / fd77:2::1  ==veth==  10.77.2.2 / fd77:2::2  server

The router forwards, so anything that leaks around the proxy really reaches the server;
tests capture on the router's client-facing interface to see what left the client.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from nslib import REPO, Netns, veth, wait_for

PYTHON = os.environ.get("PROXYVPN_TEST_PYTHON", sys.executable)
TOOLS = str(Path(__file__).with_name("tools.py"))

CLIENT4, ROUTER4_C, ROUTER4_S, SERVER4 = "10.77.1.2", "10.77.1.1", "10.77.2.1", "10.77.2.2"
CLIENT6, ROUTER6_C, ROUTER6_S, SERVER6 = "fd77:1::2", "fd77:1::1", "fd77:2::1", "fd77:2::2"
PROXY_PORT = 3128

_CONGESTION = Path("/proc/sys/net/ipv4")


def available_congestion() -> list[str]:
    """The congestion controls the kernel has loaded (any namespace's routes may use them)."""
    try:
        return (_CONGESTION / "tcp_available_congestion_control").read_text().split()
    except OSError:
        return []


def host_congestion() -> str:
    """The host's default congestion control, which new namespaces inherit."""
    try:
        return (_CONGESTION / "tcp_congestion_control").read_text().strip()
    except OSError:
        return "?"


@dataclass
class Lab:
    client: Netns
    router: Netns
    server: Netns
    client_if: str
    router_cif: str
    workdir: Path
    proxy: subprocess.Popen | None = None
    proxy_log: Path | None = None
    proxy_conf: dict = field(default_factory=dict)
    vpn: subprocess.Popen | None = None
    vpn_state: Path | None = None
    congestion: str = "host"
    """The lab's TCP congestion control: set_congestion()'s, or "host" (the host's default)."""

    # ------------------------------------------------------------- TCP

    def set_congestion(self, algo: str) -> None:
        """Make every TCP socket of the lab use congestion control ``algo``.

        A namespace's sockets take the host's default (net.ipv4.tcp_congestion_control
        is copied from the host's namespace), and a namespace may only choose a default
        from tcp_allowed_congestion_control, which need not have cubic, Linux's own
        default. A route's ``congctl`` has no such limit, and connect() and accept()
        both take it from the route to the peer: so every route of the lab gets it
        (routes added later too: :meth:`route_options`).
        """
        self.congestion = algo
        for ns in (self.client, self.router, self.server):
            for family in ("-4", "-6"):
                routes = json.loads(ns.run("ip", "-j", family, "route", "show", "table", "all")
                                    .stdout or "[]")
                for route in routes:
                    kind = route.get("type", "unicast")
                    # Local routes too: they are what a socket accepted from this host's
                    # own address takes (redsocks' side of a redirected connection).
                    if kind not in ("unicast", "local") or route["dst"].startswith("fe80:"):
                        continue
                    spec = [kind, route["dst"]]
                    for key, word in (("gateway", "via"), ("dev", "dev"), ("table", "table"),
                                      ("protocol", "proto"), ("scope", "scope"),
                                      ("prefsrc", "src"), ("metric", "metric")):
                        if key in route:
                            spec += [word, str(route[key])]
                    ns.run("ip", family, "route", "replace", *spec, *self.route_options())

    def route_options(self) -> list[str]:
        """What a route added to the lab needs: its congestion control, if one is set."""
        return [] if self.congestion == "host" else ["congctl", self.congestion]

    # ------------------------------------------------------------- the proxy

    def start_tinyproxy(self, *, auth: tuple[str, str] | None = None,
                        connect_ports: tuple[int, ...] = ()) -> None:
        """Debian's tinyproxy on the router, listening on every address, port 3128."""
        self.stop_proxy()
        self.proxy_conf = {"kind": "tinyproxy", "auth": auth, "connect_ports": connect_ports}
        log = self.workdir / "tinyproxy.log"
        log.touch()
        os.chmod(log, 0o666)
        lines = [
            "User nobody", "Group nogroup", f"Port {PROXY_PORT}", "Timeout 600",
            "MaxClients 2000", f"LogFile \"{log}\"", "LogLevel Connect",
            "DisableViaHeader Yes",
        ]
        if auth:
            lines.append(f"BasicAuth {auth[0]} {auth[1]}")
        lines += [f"ConnectPort {p}" for p in connect_ports]
        conf = self.workdir / "tinyproxy.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.proxy_log = log
        self.proxy = self.router.popen("tinyproxy", "-d", "-c", str(conf),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_port(self.router, ROUTER4_C, PROXY_PORT)

    def start_squid(self) -> None:
        """Debian's squid on the router (the fast proxy: ~1 GB/s single flow here)."""
        self.stop_proxy()
        self.proxy_conf = {"kind": "squid"}
        d = self.workdir / "squid"
        d.mkdir(exist_ok=True)
        shutil.chown(d, "proxy", "proxy")
        conf = d / "squid.conf"
        conf.write_text(
            f"http_port {PROXY_PORT}\nhttp_access allow all\ncache deny all\n"
            f"access_log stdio:{d}/access.log\ncache_log {d}/cache.log\n"
            f"pid_filename {d}/squid.pid\ncoredump_dir {d}\nshutdown_lifetime 0 seconds\n"
            "workers 1\ndns_v4_first on\n"
        )
        self.proxy_log = d / "access.log"
        self.proxy = self.router.popen("squid", "-N", "-f", str(conf),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_port(self.router, ROUTER4_C, PROXY_PORT, timeout=20)

    def stop_proxy(self) -> None:
        if self.proxy and self.proxy.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proxy.pid, signal.SIGKILL)
            self.proxy.wait(10)
        self.proxy = None

    def restart_proxy(self) -> None:
        kind = self.proxy_conf.get("kind", "tinyproxy")
        if kind == "squid":
            self.start_squid()
        else:
            self.start_tinyproxy(auth=self.proxy_conf.get("auth"),
                                 connect_ports=self.proxy_conf.get("connect_ports", ()))

    def proxy_log_text(self) -> str:
        return self.proxy_log.read_text(errors="replace") if self.proxy_log else ""

    @staticmethod
    def wait_port(ns: Netns, host: str, port: int, timeout: float = 10) -> None:
        probe = f"import socket;socket.create_connection(({host!r},{port}),0.5)"  # either family
        wait_for(lambda: ns.run(PYTHON, "-c", probe, check=False).returncode == 0,
                 timeout=timeout, what=f"{host}:{port} to accept connections")

    # ------------------------------------------------------------- proxyvpn

    def vpn_argv(self, *extra: str, proxy_url: str | None = None) -> list[str]:
        self.vpn_state = self.vpn_state or Path(tempfile.mkdtemp(prefix="pvstate-", dir=self.workdir))
        url = proxy_url or f"http://{ROUTER4_C}:{PROXY_PORT}"
        return [PYTHON, "-m", "proxyvpn", "up", "--proxy-url", url,
                "--state-dir", str(self.vpn_state), *extra]

    def start_vpn(self, *extra: str, proxy_url: str | None = None, env: dict | None = None,
                  wait: bool = True, argv: list[str] | None = None) -> subprocess.Popen:
        """Run `proxyvpn up` (or `argv`, a wrapped one) in the client namespace; waits until
        this instance logged "up:"."""
        argv = argv or self.vpn_argv(*extra, proxy_url=proxy_url)
        # The log is appended to: an earlier instance's "up:" must not count as this one's
        # (a restarted proxyvpn was taken for ready before its capture existed).
        seen = len(self.vpn_log())
        log = open(self.workdir / "proxyvpn.log", "a")  # noqa: SIM115 (lives with the process)
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.vpn = self.client.popen(*argv, stdout=log, stderr=subprocess.STDOUT, env=full_env)
        if wait:
            def ready() -> bool:
                if self.vpn.poll() is not None:
                    raise AssertionError(f"proxyvpn exited {self.vpn.returncode}:\n{self.vpn_log()}")
                return "up:" in self.vpn_log()[seen:]
            wait_for(ready, timeout=20, what="proxyvpn up")
        return self.vpn

    def stop_vpn(self, timeout: float = 15) -> int:
        """SIGTERM proxyvpn and return its exit status."""
        if not self.vpn:
            return 0
        if self.vpn.poll() is None:
            self.vpn.send_signal(signal.SIGTERM)
        try:
            return self.vpn.wait(timeout)
        finally:
            self.vpn = None

    def vpn_log(self) -> str:
        path = self.workdir / "proxyvpn.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def proxyvpn(self, *args: str, check: bool = False, user: str | None = None,
                 timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a proxyvpn subcommand in the client namespace (not backgrounded)."""
        cmd = [PYTHON, "-m", "proxyvpn", *args]
        if user:
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
        return self.client.run("env", f"PYTHONPATH={REPO}", *cmd, check=check, timeout=timeout)

    def stats(self) -> dict:
        import json
        assert self.vpn_state
        path = self.vpn_state / "stats.json"
        return json.loads(path.read_text()) if path.exists() else {}

    # ------------------------------------------------------------- traffic

    def tool(self, ns: Netns, *args: str, timeout: float = 120, check: bool = True):
        return ns.run(PYTHON, TOOLS, *args, timeout=timeout, check=check)

    def start_server(self, *args: str, port: int = 9000) -> subprocess.Popen:
        proc = self.server.popen(PYTHON, TOOLS, "serve", "--port", str(port), *args,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_port(self.server, SERVER4, port)
        return proc

    def delete(self) -> None:
        with suppress(Exception):
            self.stop_vpn(timeout=10)
        for ns in (self.client, self.router, self.server):
            ns.delete()
        shutil.rmtree(self.workdir, ignore_errors=True)


def build_lab() -> Lab:
    client = Netns.create("pvc")
    router = server = None
    try:
        router = Netns.create("pvr")
        server = Netns.create("pvs")
        c_if, r_cif = veth(client, [f"{CLIENT4}/24", f"{CLIENT6}/64"],
                           router, [f"{ROUTER4_C}/24", f"{ROUTER6_C}/64"])
        veth(router, [f"{ROUTER4_S}/24", f"{ROUTER6_S}/64"],
             server, [f"{SERVER4}/24", f"{SERVER6}/64"])
        client.run("ip", "route", "add", "default", "via", ROUTER4_C)
        client.run("ip", "-6", "route", "add", "default", "via", ROUTER6_C)
        server.run("ip", "route", "add", "default", "via", ROUTER4_S)
        server.run("ip", "-6", "route", "add", "default", "via", ROUTER6_S)
        router.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        router.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        workdir = Path(tempfile.mkdtemp(prefix="pvlab-"))
        os.chmod(workdir, 0o755)
        lab = Lab(client, router, server, c_if, r_cif, workdir)
        # A resolv.conf for the client namespace (ip netns exec bind-mounts it).
        etc = Path("/etc/netns") / client.name
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {ROUTER4_C}\n")
        return lab
    except BaseException:
        for ns in (server, router, client):
            if ns:
                ns.delete()
        raise


def remove_lab(lab: Lab) -> None:
    etc = Path("/etc/netns") / lab.client.name
    lab.delete()
    shutil.rmtree(etc, ignore_errors=True)


def until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False
