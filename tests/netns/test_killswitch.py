"""Leak tests: a real capture on the router's client-facing link proves what left the client.

Allowed out of the client: TCP to the proxy port, DNS to the allowed resolver (the
router, from the namespace's resolv.conf), and IPv6 neighbour discovery. Everything else
seen in the capture is a leak.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import signal
import subprocess
import time
from contextlib import contextmanager

import dpkt
import pytest
from nslib import assert_same_snapshot
from topology import (
    CLIENT4,
    CLIENT6,
    PROXY_PORT,
    PYTHON,
    ROUTER4_C,
    ROUTER6_C,
    SERVER4,
    SERVER6,
    TOOLS,
)

CLIENT_ADDRS = {ipaddress.ip_address(CLIENT4), ipaddress.ip_address(CLIENT6)}
PROXY_ADDRS = {ipaddress.ip_address(ROUTER4_C), ipaddress.ip_address(ROUTER6_C)}
MLD_TYPES = (131, 132, 143)  # listener report, done, MLDv2 report
LINK_SCOPE_MULTICAST6 = ipaddress.ip_network("ff02::/16")


@contextmanager
def capture(lab):
    """tcpdump on the router side of the client link; yields a list filled on exit."""
    pcap = lab.workdir / f"cap-{time.monotonic_ns()}.pcap"
    proc = lab.router.popen("tcpdump", "-i", lab.router_cif, "-n", "-U", "--immediate-mode", "-w", str(pcap),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # The file appears before capture starts; "listening on" is printed once it does.
    assert "listening on" in proc.stderr.readline(), "tcpdump did not start"
    time.sleep(0.2)
    packets: list[tuple] = []
    try:
        yield packets
    finally:
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(10)
        with open(pcap, "rb") as fh:
            for _, buf in dpkt.pcap.Reader(fh):
                eth = dpkt.ethernet.Ethernet(buf)
                ip = eth.data
                if not isinstance(ip, dpkt.ip.IP | dpkt.ip6.IP6):
                    continue
                packets.append(classify(ip))


def classify(ip) -> tuple:
    src = ipaddress.ip_address(ip.src)
    dst = ipaddress.ip_address(ip.dst)
    l4 = ip.data
    proto = type(l4).__name__
    dport = getattr(l4, "dport", None)
    icmp6_type = l4.type if isinstance(l4, dpkt.icmp6.ICMP6) else None
    return (src, dst, proto, dport, icmp6_type)


def client_sources(lab) -> set:
    """The client's addresses on the link, its link-local one included."""
    out = lab.client.run("ip", "-6", "-o", "addr", "show", "dev", lab.client_if, "scope", "link")
    link_local = {ipaddress.ip_address(line.split()[3].split("/")[0]) for line in out.stdout.splitlines()}
    return CLIENT_ADDRS | link_local


def leaks(packets: list[tuple], sources: set, allowed_dns=PROXY_ADDRS) -> list[tuple]:
    bad = []
    for src, dst, proto, dport, icmp6_type in packets:
        if src not in sources:
            continue  # replies and the router's own traffic
        if proto == "TCP" and dst in PROXY_ADDRS and dport == PROXY_PORT:
            continue
        if proto in ("UDP", "TCP") and dport == 53 and dst in allowed_dns:
            continue
        if proto == "ICMP6" and icmp6_type in (133, 135, 136):  # RS, NS, NA
            continue
        if proto == "ICMP6" and icmp6_type in MLD_TYPES and dst in LINK_SCOPE_MULTICAST6:
            continue
        bad.append((str(src), str(dst), proto, dport))
    return bad


ESCAPES = f"""
import socket, json
results = {{}}
def attempt(name, fn):
    try:
        fn(); results[name] = "sent"
    except OSError as e:
        results[name] = e.errno
def tcp(addr, family, mark):
    s = socket.socket(family); s.settimeout(2)
    if mark: s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    s.connect((addr, 9000)); s.close()
def udp(addr, family, port):
    u = socket.socket(family, socket.SOCK_DGRAM); u.sendto(b"leak?", (addr, port))
attempt("tcp4_bypass_mark", lambda: tcp("{SERVER4}", socket.AF_INET, 0x7077))
attempt("tcp6_bypass_mark", lambda: tcp("{SERVER6}", socket.AF_INET6, 0x7077))
attempt("udp4", lambda: udp("{SERVER4}", socket.AF_INET, 9999))
attempt("udp6", lambda: udp("{SERVER6}", socket.AF_INET6, 9999))
attempt("dns4_not_allowed", lambda: udp("{SERVER4}", socket.AF_INET, 53))
attempt("dns6_not_allowed", lambda: udp("{SERVER6}", socket.AF_INET6, 53))
# The DHCPv6 server port is open only towards the servers' multicast group.
attempt("udp6_to_dhcpv6_port", lambda: udp("{SERVER6}", socket.AF_INET6, 547))
print(json.dumps(results))
"""


def tcp_roundtrip(lab, host: str, timeout: float = 10) -> dict:
    result = lab.tool(lab.client, "client", "--host", host, "--up", "100000", "--down", "100000",
                      "--timeout", str(timeout), check=False, timeout=60)
    return json.loads(result.stdout.strip().splitlines()[-1])


BACKENDS = ["libnftables", "nft-binary", "iptables"]
"""Every firewall backend must pass the leak tests (--firewall-backend forces one)."""


def start_vpn_with(lab, backend: str, *extra: str):
    """`up` with the given firewall backend; checks the state file names it."""
    lab.start_vpn("--firewall-backend", backend, *extra)
    state = json.loads((lab.vpn_state / "state.json").read_text())
    assert state["firewall"] == backend, state.get("firewall")
    kinds = {op["kind"] for op in state["applied"]}
    assert ("LoadIptables" in kinds) == (backend == "iptables"), kinds
    assert ("LoadNftTable" in kinds) == (backend != "iptables"), kinds


@pytest.mark.parametrize("backend", BACKENDS)
def test_killswitch_blocks_everything_but_the_proxy(lab, backend):
    lab.start_server()
    start_vpn_with(lab, backend)
    with capture(lab) as packets:
        assert tcp_roundtrip(lab, SERVER4)["ok"]
        assert tcp_roundtrip(lab, SERVER6)["ok"]
        escapes = json.loads(lab.client.run(PYTHON, "-c", ESCAPES).stdout)
        ping4 = lab.client.run("ping", "-c", "1", "-W", "1", SERVER4, check=False)
        ping6 = lab.client.run("ping", "-6", "-c", "1", "-W", "1", SERVER6, check=False)
        dns_ok = lab.client.run(PYTHON, "-c", f"import socket;socket.socket(socket.AF_INET,"
                                f"socket.SOCK_DGRAM).sendto(b'q',('{ROUTER4_C}',53))", check=False)
    assert all(value != "sent" for value in escapes.values()), escapes
    assert escapes["tcp4_bypass_mark"] in (errno.ECONNREFUSED, errno.EPERM), escapes
    assert ping4.returncode != 0 and ping6.returncode != 0
    assert dns_ok.returncode == 0  # the allowed resolver stays reachable
    assert leaks(packets, client_sources(lab)) == []
    assert any(p[2] == "TCP" and p[3] == PROXY_PORT for p in packets), "no proxy traffic seen"


JOIN_GROUP = """
import socket, struct, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
group = socket.inet_pton(socket.AF_INET6, "ff02::1:ff77:77")
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
             group + struct.pack("@I", socket.if_nametoindex(sys.argv[1])))
time.sleep(0.2)
s.close()  # leaving sends a report too
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_multicast_listener_reports_pass_the_killswitch(lab, backend):
    """A switch that snoops MLD stops forwarding neighbour solicitations to a host it
    hears no reports from, which would cut the LAN (and the proxy) off."""
    start_vpn_with(lab, backend)
    with capture(lab) as packets:
        lab.client.run(PYTHON, "-c", JOIN_GROUP, lab.client_if)
    reports = [p for p in packets if p[0] in client_sources(lab) and p[4] == 143]
    assert reports and all(p[1] == ipaddress.ip_address("ff02::16") for p in reports), packets
    assert leaks(packets, client_sources(lab)) == []


def test_dead_proxy_fails_fast_without_leaking_then_recovers(lab):
    lab.start_server()
    lab.start_vpn()
    lab.stop_proxy()
    with capture(lab) as packets:
        out = tcp_roundtrip(lab, SERVER4)
    assert not out["ok"] and out["failures"][0]["errno"] == errno.ECONNREFUSED, out
    assert out["failures"][0]["seconds"] < 1.0
    assert leaks(packets, client_sources(lab)) == []
    lab.restart_proxy()
    assert tcp_roundtrip(lab, SERVER4)["ok"]
    assert lab.vpn.poll() is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_9_stays_closed_and_down_restores_snapshot(lab, backend):
    before = lab.client.snapshot()
    lab.start_server()
    start_vpn_with(lab, backend)
    lab.vpn.send_signal(signal.SIGKILL)
    lab.vpn.wait(10)
    with capture(lab) as packets:
        # Fail closed: captured TCP is dropped (reject is impossible in postrouting).
        out = tcp_roundtrip(lab, SERVER4, timeout=2)
        escapes = json.loads(lab.client.run(PYTHON, "-c", ESCAPES).stdout)
    assert not out["ok"]
    assert all(value != "sent" for value in escapes.values()), escapes
    assert leaks(packets, client_sources(lab)) == []
    result = lab.proxyvpn("down", "--state-dir", str(lab.vpn_state))
    assert result.returncode == 0, result.stderr
    assert_same_snapshot(before, lab.client.snapshot())
    assert tcp_roundtrip(lab, SERVER4)["ok"]  # direct again, as before `up`


@pytest.mark.parametrize("backend", ["libnftables", "iptables"])
def test_up_after_a_crash_keeps_the_host_closed_while_the_proxy_is_down(lab, backend):
    """Fail closed across restarts (systemd's Restart=): the next `up` reaches the proxy
    before it undoes what the dead one left, so a proxy that is down leaves its killswitch
    in place, with one line that says so; once the proxy is back, `up` takes over."""
    before = lab.client.snapshot()
    lab.start_server()
    start_vpn_with(lab, backend)
    lab.vpn.send_signal(signal.SIGKILL)
    lab.vpn.wait(10)
    lab.stop_proxy()
    again = lab.proxyvpn(*lab.vpn_argv("--firewall-backend", backend,
                                       "--connect-timeout", "2")[3:])
    assert again.returncode != 0 and "killswitch of a proxyvpn that died" in again.stderr, (
        again.stdout, again.stderr)
    assert len(again.stderr.strip().splitlines()) == 1, again.stderr
    escapes = json.loads(lab.client.run(PYTHON, "-c", ESCAPES).stdout)
    assert all(value != "sent" for value in escapes.values()), escapes
    assert not tcp_roundtrip(lab, SERVER4, timeout=2)["ok"]
    lab.restart_proxy()
    start_vpn_with(lab, backend)  # undoes the dead run's changes, then applies its own
    assert tcp_roundtrip(lab, SERVER4)["ok"]
    assert lab.stop_vpn() == 0
    assert_same_snapshot(before, lab.client.snapshot())


FAILING_UP = r"""
import os, sys
# A compiled class's methods cannot be replaced: run the engine from its source.
os.environ["PROXYVPN_INTERPRETED"] = "1"
from proxyvpn.aio import engine
assert engine.__file__.endswith(".py"), engine.__file__
calls = [0]
real = engine.Engine.snapshot_stats
def failing(self):  # the stats loop asks once a second: the third time, a bug strikes
    calls[0] += 1
    if calls[0] == 3:
        raise RuntimeError("injected engine failure")
    return real(self)
engine.Engine.snapshot_stats = failing
from proxyvpn.cli import main
sys.argv = ["proxyvpn", *sys.argv[1:]]
main()
"""


def test_an_internal_error_fails_closed_like_kill_9(lab):
    """A bug that ends `up` is a crash, not a stop: the killswitch stays (the TUN goes
    with the process) until `proxyvpn down`, which then restores the host exactly."""
    before = lab.client.snapshot()
    lab.start_server()
    vpn = lab.start_vpn(argv=[PYTHON, "-c", FAILING_UP, *lab.vpn_argv()[3:]])
    assert vpn.wait(15) == 1
    log = lab.vpn_log()
    assert "injected engine failure" in log and "the killswitch stays in place" in log, log
    assert "down: everything proxyvpn changed is undone" not in log
    assert (lab.vpn_state / "state.json").exists()
    escapes = json.loads(lab.client.run(PYTHON, "-c", ESCAPES).stdout)
    assert all(value != "sent" for value in escapes.values()), escapes
    assert not tcp_roundtrip(lab, SERVER4, timeout=2)["ok"]
    result = lab.proxyvpn("down", "--state-dir", str(lab.vpn_state))
    assert result.returncode == 0, result.stderr
    assert_same_snapshot(before, lab.client.snapshot())
    assert tcp_roundtrip(lab, SERVER4)["ok"]


@pytest.mark.parametrize("backend", ["libnftables", "iptables"])
def test_no_killswitch_lets_udp_out_but_tcp_still_uses_proxy(lab, backend):
    lab.start_server()
    start_vpn_with(lab, backend, "--no-killswitch")
    with capture(lab) as packets:
        assert tcp_roundtrip(lab, SERVER4)["ok"]
        lab.client.run(PYTHON, "-c", f"import socket;socket.socket(socket.AF_INET,"
                       f"socket.SOCK_DGRAM).sendto(b'x',('{SERVER4}',9999))")
    udp = [p for p in packets if p[2] == "UDP" and str(p[1]) == SERVER4]
    assert udp, "UDP should go out directly without the killswitch"
    direct_tcp = [p for p in packets if p[2] == "TCP" and str(p[1]) == SERVER4]
    assert direct_tcp == []
    assert SERVER4 in lab.proxy_log_text()


INBOUND = r"""
import json, socket, sys
out = {}
for host in sys.argv[1:]:
    try:
        s = socket.create_connection((host, 9200), timeout=3)
        s.sendall(b"ping" * 1000)
        got = b""
        while len(got) < 4000:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        out[host] = got == b"ping" * 1000
    except OSError as exc:
        out[host] = str(exc)
print(json.dumps(out))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_connections_from_outside_are_answered_with_the_killswitch_on(lab, backend):
    """A service on this host (an sshd) keeps answering connections other hosts open to
    it: `up` over SSH must not cut the session. Only answers pass, not new connections."""
    lab.client.popen(PYTHON, TOOLS, "serve", "--port", "9200", "--bind", "::", "--mode", "echo")
    lab.wait_port(lab.client, CLIENT4, 9200)
    start_vpn_with(lab, backend)
    result = lab.server.run(PYTHON, "-c", INBOUND, CLIENT4, CLIENT6, timeout=30)
    assert json.loads(result.stdout) == {CLIENT4: True, CLIENT6: True}, result.stdout
    escapes = json.loads(lab.client.run(PYTHON, "-c", ESCAPES).stdout)
    assert all(value != "sent" for value in escapes.values()), escapes
    assert lab.stop_vpn() == 0
