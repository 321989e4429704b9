"""`proxyvpn status` and `proxyvpn selftest` against a running instance in the lab."""

from __future__ import annotations

import json
import subprocess

from topology import PROXY_PORT, PYTHON, ROUTER4_C, SERVER4, TOOLS


def test_status_reports_running_instance_and_counters(lab):
    state = str(lab.workdir / "st")
    idle = lab.proxyvpn("status", "--state-dir", state)
    assert idle.returncode == 3 and "not running" in idle.stdout
    lab.start_server()
    lab.vpn_state = lab.workdir / "st"
    lab.start_vpn(proxy_url=f"http://alice:hunter2@{ROUTER4_C}:{PROXY_PORT}")
    lab.tool(lab.client, "client", "--host", SERVER4, "--up", "1000", "--down", "1000")
    import time
    time.sleep(1.2)  # counters are published once a second
    running = lab.proxyvpn("status", "--state-dir", state)
    assert running.returncode == 0, running.stderr
    assert "proxyvpn is running" in running.stdout
    assert "http://alice:***@10.77.1.1:3128" in running.stdout
    assert "hunter2" not in running.stdout
    info = json.loads(lab.proxyvpn("status", "--state-dir", state, "--json").stdout)
    assert info["running"] and info["stats"]["flows_opened"] >= 1
    assert info["stats"]["fast_path"] == "c"
    state_text = "".join(p.read_text() for p in lab.vpn_state.iterdir() if p.is_file())
    assert "hunter2" not in state_text


def test_selftest_dns_direct_and_through_proxy(lab):
    lab.server.popen(PYTHON, TOOLS, "dns", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import time
    time.sleep(0.5)
    direct = lab.proxyvpn("selftest", "--server", SERVER4, "--name", "example.test", "--no-ip")
    assert direct.returncode == 0, direct.stdout + direct.stderr
    assert "OK 192.0.2.1" in direct.stdout
    via = lab.proxyvpn("selftest", "--server", SERVER4, "--name", "example.test", "--no-ip",
                       "--proxy-url", f"http://{ROUTER4_C}:{PROXY_PORT}")
    assert via.returncode == 0 and "TCP via proxy" in via.stdout and "OK 192.0.2.1" in via.stdout
    assert SERVER4 in lab.proxy_log_text()
    full = lab.proxyvpn("selftest", "--server", ROUTER4_C, "--timeout-ms", "300")
    assert full.returncode == 1 and "FAILED" in full.stdout  # nothing answers DNS there
    assert "ip rule show" in full.stdout


def test_status_and_selftest_show_the_iptables_backend(lab):
    lab.start_server()
    lab.vpn_state = lab.workdir / "st"
    lab.start_vpn("--firewall-backend", "iptables")
    running = lab.proxyvpn("status", "--state-dir", str(lab.vpn_state))
    assert running.returncode == 0 and "firewall:   iptables" in running.stdout, running.stdout
    full = lab.proxyvpn("selftest", "--server", ROUTER4_C, "--timeout-ms", "300")
    assert "$ iptables-save | grep PROXYVPN" in full.stdout
    assert "-A OUTPUT -j PROXYVPN" in full.stdout, full.stdout
    assert lab.stop_vpn() == 0
