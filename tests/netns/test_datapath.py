"""The data path end to end: real kernel TCP clients in a namespace, proxyvpn's TUN and
userspace stack, a real proxy (tinyproxy), a real server; every byte checked with sha256."""

from __future__ import annotations

import errno
import json
import time

import pytest
from topology import PROXY_PORT, ROUTER4_C, ROUTER6_C, SERVER4, SERVER6

MB = 1 << 20


def client_json(lab, *args, check=True, timeout=180):
    result = lab.tool(lab.client, "client", *args, check=False, timeout=timeout)
    out = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}
    if check:
        assert result.returncode == 0 and out.get("ok"), (
            f"client failed: {result.stdout}\n{result.stderr}\n--- proxyvpn log:\n{lab.vpn_log()[-3000:]}")
    return out


def through_proxy(lab, host: str) -> bool:
    return host in lab.proxy_log_text()


def test_bidirectional_64mb_each_way_v4(lab):
    lab.start_server()
    lab.start_vpn()
    client_json(lab, "--host", SERVER4, "--up", str(64 * MB), "--down", str(64 * MB))
    assert through_proxy(lab, SERVER4), lab.proxy_log_text()
    assert lab.stop_vpn() == 0


def test_curl_fetches_50mb_file(lab, tmp_path):
    blob = lab.workdir / "blob.bin"
    blob.write_bytes(bytes(range(256)) * (50 * MB // 256))
    import hashlib
    want = hashlib.sha256(blob.read_bytes()).hexdigest()
    lab.server.popen("python3", "-m", "http.server", "8080", "--bind", "::", "--directory",
                     str(lab.workdir))
    lab.wait_port(lab.server, SERVER4, 8080)
    lab.start_vpn()
    out = lab.workdir / "got.bin"
    lab.client.run("curl", "-sS", "--fail", "-o", str(out), f"http://{SERVER4}:8080/blob.bin",
                   timeout=120)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == want
    assert through_proxy(lab, SERVER4)


def test_200_concurrent_connections(lab):
    lab.start_server()
    lab.start_vpn()
    out = client_json(lab, "--host", SERVER4, "--conns", "200", "--up", str(64 * 1024),
                      "--down", str(256 * 1024))
    assert out["passed"] == 200


def test_server_closes_first(lab):
    lab.start_server("--mode", "close-first", port=9001)
    lab.start_vpn()
    client_json(lab, "--host", SERVER4, "--port", "9001", "--mode", "close-first",
                "--up", "0", "--down", str(8 * MB))


def test_client_reset_is_relayed_and_flow_forgotten(lab):
    lab.start_server()
    lab.start_vpn()
    lab.tool(lab.client, "reset", "--host", SERVER4)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and lab.stats().get("flows_active", 1) != 0:
        time.sleep(0.2)
    assert lab.stats().get("flows_active") == 0, lab.stats()
    # proxyvpn still serves new flows afterwards
    client_json(lab, "--host", SERVER4, "--up", "1000", "--down", "1000")


def test_proxy_403_refuses_fast(lab):
    lab.start_tinyproxy(connect_ports=(9,))  # CONNECT to any other port is a 403
    lab.start_server()
    lab.start_vpn()
    out = client_json(lab, "--host", SERVER4, "--up", "10", "--down", "10", check=False)
    failure = out["failures"][0]
    assert failure["errno"] == errno.ECONNREFUSED, out
    assert failure["seconds"] < 1.0, out
    assert "proxy refused: 403" in lab.vpn_log()


def test_proxy_unreachable_fails_within_timeout(lab):
    lab.start_server()
    lab.start_vpn("--connect-timeout", "2")
    lab.stop_proxy()
    # Drop (not refuse) SYNs to the proxy so only the timeout can end the attempt.
    lab.router.run("nft", "add table inet t; add chain inet t in { type filter hook input priority 0; }; "
                   f"add rule inet t in tcp dport {PROXY_PORT} drop")
    out = client_json(lab, "--host", SERVER4, "--up", "10", "--down", "10", check=False)
    failure = out["failures"][0]
    assert failure["errno"] == errno.ECONNREFUSED, out
    assert 1.5 < failure["seconds"] < 4.0, out


def test_wrong_password_is_refused_and_reported(lab):
    lab.start_tinyproxy(auth=("alice", "s3cret"))
    lab.start_server()
    lab.start_vpn(proxy_url=f"http://alice:wrong@{ROUTER4_C}:{PROXY_PORT}")
    out = client_json(lab, "--host", SERVER4, "--up", "10", "--down", "10", check=False)
    assert out["failures"][0]["errno"] == errno.ECONNREFUSED, out
    assert "proxy authentication failed" in lab.vpn_log()
    assert "wrong" not in lab.vpn_log()


def test_right_password_works(lab):
    lab.start_tinyproxy(auth=("alice", "s3cret"))
    lab.start_server()
    lab.start_vpn(proxy_url=f"http://alice:s3cret@{ROUTER4_C}:{PROXY_PORT}")
    client_json(lab, "--host", SERVER4, "--up", str(MB), "--down", str(MB))


def _netem(ns, dev):
    ns.run("tc", "qdisc", "add", "dev", dev, "root", "netem", "loss", "5%", "delay", "1ms",
           "reorder", "25%", "50%", "duplicate", "1%")


@pytest.mark.timeout(300)
def test_loss_reorder_duplication_v4(lab):
    lab.start_server()
    lab.start_vpn()
    _netem(lab.client, "tun0")          # app -> proxyvpn direction
    _netem(lab.client, lab.client_if)   # proxy link, client side
    _netem(lab.router, lab.router_cif)  # proxy link, router side
    client_json(lab, "--host", SERVER4, "--up", str(8 * MB), "--down", str(8 * MB),
                "--conns", "4", timeout=240)


def test_ipv6_bidirectional(lab):
    lab.start_server()
    lab.start_vpn(proxy_url=f"http://[{ROUTER6_C}]:{PROXY_PORT}")
    client_json(lab, "--host", SERVER6, "--up", str(16 * MB), "--down", str(16 * MB),
                "--conns", "2")
    assert through_proxy(lab, SERVER6) or through_proxy(lab, f"[{SERVER6}]")


@pytest.mark.timeout(300)
def test_ipv6_loss_reorder_duplication(lab):
    lab.start_server()
    lab.start_vpn()
    _netem(lab.client, "tun0")
    _netem(lab.router, lab.router_cif)
    client_json(lab, "--host", SERVER6, "--up", str(4 * MB), "--down", str(4 * MB),
                "--conns", "2", timeout=240)
