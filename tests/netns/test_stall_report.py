"""A flow whose app stops acknowledging what we send it is reported once, with the
connection's send state, and carries on intact when the app's side works again.

The segments towards the app are dropped in the client namespace's prerouting (on their
way in from tun0, before the app's TCP sees them): our stack retransmits on timeouts, as
it would behind any fault on the app side of the TUN. Only data segments are dropped
(longer than 200 bytes), so the handshake completes and the app's ACKs still flow."""

from __future__ import annotations

from topology import PYTHON, SERVER4, until

MB = 1 << 20
WARNING = "retransmission timeouts without an ACK from the app"
TABLE = "pvtest_stall"


# Reads at ~6 MB/s, so data is always in flight towards it; says "ready" after 1 MiB.
SLOW_CLIENT = r"""
import hashlib, socket, struct, sys, time
n = int(sys.argv[2])
s = socket.create_connection((sys.argv[1], 9000), timeout=60)
s.sendall(struct.pack("!QQ", 0, n))
data, said = bytearray(), False
while len(data) < n + 64:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
    if not said and len(data) >= 1 << 20:
        print("ready", flush=True)
        said = True
    time.sleep(0.01)
print("ok" if len(data) == n + 64 and hashlib.sha256(data[:n]).digest() == data[-32:]
      else f"bad {len(data)}", flush=True)
"""


def test_a_flow_the_app_stops_acknowledging_is_logged_once_and_recovers(lab):
    lab.start_server()
    lab.start_vpn()
    client = lab.client.popen(PYTHON, "-c", SLOW_CLIENT, SERVER4, str(8 * MB))
    try:
        assert client.stdout.readline().strip() == "ready"
        # Cut the app off from what we send.
        lab.client.run("nft", "-f", "-", input=(
            f"table inet {TABLE} {{ chain pre {{ type filter hook prerouting priority -300;"
            f' iifname "tun0" tcp sport 9000 meta length > 200 counter drop; }}; }}'))
        try:
            # Four timeouts from the 200 ms minimum: 0.2 + 0.4 + 0.8 + 1.6 s.
            assert until(lambda: WARNING in lab.vpn_log(), 15), lab.vpn_log()[-2000:]
            dropped = lab.client.run("nft", "-j", "list", "table", "inet", TABLE).stdout
            assert '"packets": 0' not in dropped, dropped
        finally:
            lab.client.run("nft", "delete", "table", "inet", TABLE)
        out, _ = client.communicate(timeout=90)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert out.strip() == "ok", out
    log = lab.vpn_log()
    line = next(x for x in log.splitlines() if WARNING in x)
    # The line names the flow and the state a capture would be read against.
    assert f"-> {SERVER4}:9000]" in line and "una=" in line and "in flight" in line, line
    assert log.count(WARNING) == 1, log
    assert until(lambda: lab.stats().get("flows_stalled") == 1, 5), lab.stats()
    assert lab.stop_vpn() == 0
