"""The benchmark suite runs end to end (short mode): every mode moves data and every figure
is reported. Timings are not judged here (bench/README.md: measured, not timed in tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from nslib import REPO


def root_namespace_state() -> str:
    """Links, rules, routes and nft ruleset of the namespace the test runs in."""
    cmds = (["ip", "-o", "link"], ["ip", "rule"], ["ip", "-6", "rule"],
            ["ip", "route", "show", "table", "all"], ["nft", "list", "ruleset"])
    return "\n".join(subprocess.run(c, capture_output=True, text=True).stdout for c in cmds)


@pytest.mark.timeout(300)
def test_bench_quick_runs_every_mode(tmp_path):
    before = root_namespace_state()
    out = tmp_path / "results.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "bulk,lat,cps", "--json-out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    got = {(r.get("mode"), r["figure"]): r for r in rows if "mode" in r}
    for mode in ("direct", "proxyvpn", "redsocks"):
        for figure in ("bulk_down_1", "bulk_up_1", "bulk_down_8", "bulk_up_8", "rr_p50",
                       "cps_64", "cpu_conn", "cpu_conn_all"):
            row = got.get((mode, figure))
            assert row and row.get("value"), (mode, figure, row)
        row = got.get((mode, "rss_cps"))  # may be 0: a relay that keeps nothing
        assert row and row["value"] is not None and row["rss_after_mib"] > 0, (mode, row)
    assert "| Bulk download, 1 flow" in result.stdout  # the markdown table
    # The lab's congestion control is the bench's (Linux's default), not the host's.
    assert rows[0]["figure"] == "run" and rows[0]["congestion"] == "cubic"
    assert "- TCP congestion control in the lab: cubic (the host's default: " in result.stdout
    for mode in ("direct", "proxyvpn", "redsocks"):  # the sum covers every process
        row = got[(mode, "cpu_conn_all")]
        assert row["value"] == pytest.approx(sum(row["cpu_us_per_conn"].values()), abs=0.5)
        assert row["value"] > got[(mode, "cpu_conn")]["value"]
    assert root_namespace_state() == before  # the lab was built in namespaces and removed


# Both ends of a connection print the congestion control their socket got: the
# connecting side once connect() returned, the accepting side from accept().
_CC_SCRIPT = r"""
import socket, sys
def cc(s):
    return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()
role, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
if role == "serve":
    listener = socket.socket(family)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen()
    print("ready", flush=True)
    conn, _ = listener.accept()
    print(cc(conn), flush=True)
else:
    print(cc(socket.create_connection((host, port), timeout=10)), flush=True)
"""


def _congestion_of_both_ends(server_ns, client_ns, host: str, port: int) -> tuple[str, str]:
    server = server_ns.popen(sys.executable, "-c", _CC_SCRIPT, "serve", host, str(port))
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        client = client_ns.run(sys.executable, "-c", _CC_SCRIPT, "connect", host, str(port))
        return client.stdout.strip(), server.stdout.readline().strip()
    finally:
        server.kill()
        server.wait()


@pytest.mark.timeout(120)
def test_every_socket_of_the_lab_takes_the_congestion_control_it_was_given():
    from topology import CLIENT4, SERVER4, SERVER6, available_congestion, host_congestion

    from bench.lab import make_lab, remove_lab

    # One the namespaces would not have anyway: they inherit the host's default.
    algo = "reno" if host_congestion() != "reno" else "cubic"
    assert algo in available_congestion()
    lab = make_lab()
    try:
        lab.set_congestion(algo)
        # Through the router (default routes, v4 and v6) and, in one namespace, to its
        # own address (local routes: what redsocks accepts a redirected connection on).
        assert _congestion_of_both_ends(lab.server, lab.client, SERVER4, 9101) == (algo, algo)
        assert _congestion_of_both_ends(lab.server, lab.client, SERVER6, 9102) == (algo, algo)
        assert _congestion_of_both_ends(lab.client, lab.client, CLIENT4, 9103) == (algo, algo)
        # And the proxy's side: the router's connected routes.
        assert _congestion_of_both_ends(lab.router, lab.client, "10.77.1.1", 9104) == (algo, algo)
    finally:
        remove_lab(lab)


@pytest.mark.timeout(200)
def test_bench_ipv6_sends_the_apps_flows_to_the_servers_ipv6_address(tmp_path):
    """--ipv6: both modes move data, and through proxyvpn the apps' flows are IPv6: the
    client namespace moves the data in IPv6 packets (its
    only IPv6 traffic: direct-CONNECT's link to squid is IPv4, and so is proxyvpn's)."""
    before = root_namespace_state()
    out = tmp_path / "results.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--ipv6", "--only", "bulk",
         "--json-out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["ipv6"] is True
    got = {(r.get("mode"), r["figure"]): r for r in rows if "mode" in r}
    for mode in ("direct", "proxyvpn"):
        for figure in ("bulk_down_1", "bulk_up_1", "bulk_down_8", "bulk_up_8"):
            assert got.get((mode, figure), {}).get("value"), (mode, figure)
    assert not any(mode == "redsocks" for mode, _ in got)
    for direction in ("down", "up"):
        row = got[("proxyvpn", f"bulk_{direction}_1")]
        ns = row["client_ns"]
        # The data's packets: to the app no segment passes 512 KiB, from it 64 KiB.
        data = ns["ip6_in"] if direction == "down" else ns["ip6_out"]
        assert data >= row["bytes"] / (512 << 10 if direction == "down" else 64 << 10), ns
        assert min(ns["ip6_in"], ns["ip6_out"]) > 0, ns  # and the ACKs the other way
        direct = got[("direct", f"bulk_{direction}_1")]["client_ns"]
        assert direct["ip6_in"] < 100, direct  # at most the kernel's own (ND, MLD)
    assert root_namespace_state() == before


def test_bench_ipv6_refuses_redsocks_in_one_line():
    result = subprocess.run([sys.executable, "-m", "bench", "--ipv6", "--modes", "redsocks"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        "--ipv6 works with the direct and proxyvpn modes, without --tun-route")
